//! The node's embedded ACID database (redb): identity metadata and known peers.

use std::path::Path;

use peer_core::EntityId;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const PEERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("peers");

/// What the database remembers about a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The peer's entity id.
    pub entity_id: EntityId,
    /// Its libp2p peer id (base58).
    pub peer_id: String,
    /// Addresses it was reached at.
    pub addrs: Vec<String>,
    /// When it was last connected, ms since the Unix epoch.
    pub last_seen_ms: u64,
}

/// A storage failure. The node reports it and keeps running.
#[derive(Debug, thiserror::Error)]
#[error("database error: {0}")]
pub struct StoreError(String);

macro_rules! store_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                Self(e.to_string())
            }
        }
    )*};
}
store_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);

/// The database handle.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the database file at `path` and its tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(META)?;
        txn.open_table(PEERS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(META)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Sets a metadata value.
    pub fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert(key, value)?;
        txn.commit()?;
        Ok(())
    }

    /// Records a peer. When `max_peers` are known and this one is new, the least
    /// recently seen peer is forgotten first.
    pub fn upsert_peer(&self, peer: &PeerRecord, max_peers: usize) -> Result<(), StoreError> {
        let value = serde_json::to_vec(peer)?;
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(PEERS)?;
            let is_new = table.get(&peer.entity_id.0[..])?.is_none();
            if is_new && table.len()? >= max_peers.max(1) as u64 {
                let mut oldest: Option<(u64, Vec<u8>)> = None;
                for row in table.iter()? {
                    let (k, v) = row?;
                    let seen = serde_json::from_slice::<PeerRecord>(v.value())
                        .map_or(0, |p| p.last_seen_ms);
                    if oldest.as_ref().is_none_or(|(s, _)| seen < *s) {
                        oldest = Some((seen, k.value().to_vec()));
                    }
                }
                if let Some((_, key)) = oldest {
                    table.remove(key.as_slice())?;
                }
            }
            table.insert(&peer.entity_id.0[..], value.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Every known peer.
    pub fn peers(&self) -> Result<Vec<PeerRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PEERS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (_, v) = row?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(b: u8, seen: u64) -> PeerRecord {
        PeerRecord {
            entity_id: EntityId([b; 32]),
            peer_id: format!("p{b}"),
            addrs: vec![format!("/ip4/127.0.0.1/tcp/{b}")],
            last_seen_ms: seen,
        }
    }

    #[test]
    fn peers_survive_reopening_and_are_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.redb");
        {
            let s = Store::open(&path).expect("open");
            s.upsert_peer(&peer(1, 10), 2).expect("1");
            s.upsert_peer(&peer(2, 5), 2).expect("2");
            s.upsert_peer(&peer(1, 20), 2).expect("update 1 keeps 2");
            assert_eq!(s.peers().expect("peers").len(), 2);
            // A third evicts the least recently seen (2).
            s.upsert_peer(&peer(3, 30), 2).expect("3");
            s.set_meta("k", b"v").expect("meta");
        }
        let s = Store::open(&path).expect("reopen");
        let mut ids: Vec<u8> = s
            .peers()
            .expect("peers")
            .iter()
            .map(|p| p.entity_id.0[0])
            .collect();
        ids.sort();
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(s.meta("k").expect("meta"), Some(b"v".to_vec()));
    }
}
