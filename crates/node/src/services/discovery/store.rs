//! The `dht_records` table: the records this node holds for the DHT, so that
//! they survive a restart (DHT key → the record's value; each is checked
//! again when loaded, and the expired ones dropped).

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use crate::store::{Store, StoreError};

const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dht_records");

/// A DHT key and the record's value.
pub type Row = (Vec<u8>, Vec<u8>);

/// Every held record.
pub fn load(store: &Store) -> Result<Vec<Row>, StoreError> {
    let txn = store.db()?.begin_read()?;
    let table = match txn.open_table(RECORDS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for row in table.iter()? {
        let (key, value) = row?;
        out.push((key.value().to_vec(), value.value().to_vec()));
    }
    Ok(out)
}

/// Writes (or replaces) a record.
pub fn put(txn: &WriteTransaction, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
    txn.open_table(RECORDS)?.insert(key, value)?;
    Ok(())
}

/// Forgets records.
pub fn delete(txn: &WriteTransaction, keys: &[Vec<u8>]) -> Result<(), StoreError> {
    let mut table = txn.open_table(RECORDS)?;
    for key in keys {
        table.remove(key.as_slice())?;
    }
    Ok(())
}
