//! The `tasks` table: task id → the task as JSON.

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::task::Task;
use crate::store::{Store, StoreError};

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");

/// Every stored task.
pub fn load(store: &Store) -> Result<Vec<Task>, StoreError> {
    let txn = store.db()?.begin_read()?;
    let table = match txn.open_table(TASKS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for row in table.iter()? {
        let (_, value) = row?;
        out.push(serde_json::from_slice(value.value())?);
    }
    Ok(out)
}

/// Writes (or replaces) a task.
pub fn put(txn: &WriteTransaction, task: &Task) -> Result<(), StoreError> {
    let json = serde_json::to_vec(task)?;
    txn.open_table(TASKS)?
        .insert(task.task_id.as_str(), json.as_slice())?;
    Ok(())
}

/// Forgets a task.
pub fn delete(txn: &WriteTransaction, task_id: &str) -> Result<(), StoreError> {
    txn.open_table(TASKS)?.remove(task_id)?;
    Ok(())
}
