//! The node's embedded ACID database (redb): identity metadata and known peers.
//!
//! Known peers live in two tables kept in step by every write: `peers` (entity
//! id → record) and `peers_by_seen`, keyed by the record's `last_seen_ms`
//! (big-endian) followed by its entity id, so that the least recently seen peer
//! is the index's first key and recording a peer takes O(log n).
//!
//! The node records peer sightings through a [`Writer`]: a thread of its own
//! that writes them in batches, so the node actor never waits for the disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use peer_core::EntityId;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::stats::StoreCounters;

/// How long [`Store::reopen`] waits for the database's other users.
const REOPEN_WAIT: Duration = Duration::from_secs(5);

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const PEERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("peers");
/// The index of `PEERS` by last sighting: one key per row of `PEERS`.
const PEERS_BY_SEEN: TableDefinition<&SeenKey, ()> = TableDefinition::new("peers_by_seen");

/// `last_seen_ms` (big-endian) ‖ entity id: sorts by sighting, oldest first.
type SeenKey = [u8; 40];

fn seen_key(last_seen_ms: u64, entity: &[u8; 32]) -> SeenKey {
    let mut key = [0u8; 40];
    key[..8].copy_from_slice(&last_seen_ms.to_be_bytes());
    key[8..].copy_from_slice(entity);
    key
}

/// The sighting a stored record is indexed under; a record that no longer
/// parses is indexed as seen at 0, so it is the first to be forgotten.
fn stored_seen(value: &[u8]) -> u64 {
    serde_json::from_slice::<PeerRecord>(value).map_or(0, |p| p.last_seen_ms)
}

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
#[derive(Debug, Clone, thiserror::Error)]
#[error("database error: {0}")]
pub struct StoreError(String);

impl StoreError {
    /// The writer thread that would have done the work has ended: it lives as
    /// long as the node's handles, so it failed.
    pub(crate) fn stopped() -> Self {
        Self("the database writer has stopped".into())
    }

    /// A stored value is not what this version wrote.
    pub(crate) fn corrupt(what: &str) -> Self {
        Self(format!("corrupt data: {what}"))
    }
}

impl From<String> for StoreError {
    fn from(e: String) -> Self {
        Self(e)
    }
}

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
    serde_json::Error,
    std::io::Error
);

/// Settings of the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Most bytes of the database's pages kept in memory, read and written
    /// (default 32 MiB, at least 1 MiB); writes beyond half of it go to the
    /// file before their transaction commits.
    pub cache_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            cache_bytes: 32 << 20,
        }
    }
}

impl StoreConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), String> {
        if self.cache_bytes < 1 << 20 {
            return Err(format!(
                "store.cache_bytes is {}; it must be at least 1 MiB (1048576)",
                self.cache_bytes
            ));
        }
        Ok(())
    }
}

/// The database handle. After an I/O error (a full disk) redb refuses every
/// operation until the database is reopened ([`Store::reopen`]), which the
/// inbox writer does before its next batch.
#[derive(Debug)]
pub struct Store {
    /// The open database; `None` while it is being reopened, or a reopen
    /// failed.
    db: RwLock<Option<Arc<Database>>>,
    path: PathBuf,
    cache_bytes: usize,
    dir: PathBuf,
}

impl Store {
    /// Opens (or creates) the database file at `path` and its tables with
    /// the default settings.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, &StoreConfig::default())
    }

    /// Opens (or creates) the database file at `path` and its tables. A
    /// database written before the peer index existed gets it built here, once.
    pub fn open_with(path: &Path, config: &StoreConfig) -> Result<Self, StoreError> {
        let db = create(path, config.cache_bytes)?;
        let txn = db.begin_write()?;
        txn.open_table(META)?;
        {
            let peers = txn.open_table(PEERS)?;
            let mut index = txn.open_table(PEERS_BY_SEEN)?;
            if index.len()? != peers.len()? {
                index.retain(|_, ()| false)?;
                for row in peers.iter()? {
                    let (k, v) = row?;
                    let entity: &[u8; 32] = k.value().try_into().map_err(|_| {
                        StoreError(format!("peer key of {} bytes", k.value().len()))
                    })?;
                    index.insert(&seen_key(stored_seen(v.value()), entity), ())?;
                }
            }
        }
        txn.commit()?;
        let dir = path.parent().map_or_else(PathBuf::new, Path::to_path_buf);
        Ok(Self {
            db: RwLock::new(Some(Arc::new(db))),
            path: path.to_path_buf(),
            cache_bytes: config.cache_bytes,
            dir,
        })
    }

    /// The database, for the modules that keep tables of their own; an error
    /// while it could not be reopened. Hold it no longer than it takes to
    /// begin a transaction.
    pub(crate) fn db(&self) -> Result<Arc<Database>, StoreError> {
        let slot = self.db.read().unwrap_or_else(PoisonError::into_inner);
        slot.clone().ok_or_else(|| {
            StoreError("the database is closed after a failed write, until it is reopened".into())
        })
    }

    /// Closes the database and opens it again: after an I/O error redb
    /// refuses every operation ("Previous I/O error occurred") until then.
    /// Meanwhile [`Store::db`] answers an error at once; the close waits up to
    /// [`REOPEN_WAIT`] for the transactions still open to end. If the open
    /// fails, there is no database until a reopen succeeds.
    pub(crate) fn reopen(&self) -> Result<(), StoreError> {
        let deadline = Instant::now() + REOPEN_WAIT;
        let slot = || self.db.write().unwrap_or_else(PoisonError::into_inner);
        let taken = slot().take();
        if let Some(mut db) = taken {
            // Others hold a clone only while they begin a transaction.
            loop {
                match Arc::try_unwrap(db) {
                    Ok(db) => break drop(db),
                    Err(held) if Instant::now() < deadline => {
                        db = held;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(held) => {
                        *slot() = Some(held);
                        return Err(StoreError("the database is in use; not reopened".into()));
                    }
                }
            }
        }
        // A transaction begun before still holds the file until it ends.
        let db = loop {
            match create(&self.path, self.cache_bytes) {
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                other => break other?,
            }
        };
        *slot() = Some(Arc::new(db));
        Ok(())
    }

    /// The directory the database file is in, where modules keep files of
    /// their own.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(META)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Sets a metadata value.
    pub fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write()?;
        txn.open_table(META)?.insert(key, value)?;
        txn.commit()?;
        Ok(())
    }

    /// Sets a metadata value, in one transaction with reading the one it
    /// replaces, unless `keep` says that one stays; whether it was set.
    pub fn replace_meta(
        &self,
        key: &str,
        value: &[u8],
        keep: impl FnOnce(&[u8]) -> bool,
    ) -> Result<bool, StoreError> {
        let txn = self.db()?.begin_write()?;
        let set = {
            let mut table = txn.open_table(META)?;
            let kept = table.get(key)?.is_some_and(|old| keep(old.value()));
            if !kept {
                table.insert(key, value)?;
            }
            !kept
        };
        txn.commit()?;
        Ok(set)
    }

    /// Records a peer (replacing what was known of it), then forgets the least
    /// recently seen peers until at most `max_peers` (at least 1) are known; the
    /// peer just recorded is forgotten too if it is the least recently seen.
    /// O(log n).
    pub fn upsert_peer(&self, peer: &PeerRecord, max_peers: usize) -> Result<(), StoreError> {
        self.upsert_peers(std::slice::from_ref(peer), max_peers)
    }

    /// Records `peers` as [`Store::upsert_peer`] does, in one transaction.
    pub fn upsert_peers(&self, peers: &[PeerRecord], max_peers: usize) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write()?;
        upsert(&txn, peers, max_peers)?;
        txn.commit()?;
        Ok(())
    }

    /// Every known peer.
    pub fn peers(&self) -> Result<Vec<PeerRecord>, StoreError> {
        let txn = self.db()?.begin_read()?;
        let table = txn.open_table(PEERS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (_, v) = row?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }
}

/// Opens (or creates) the database file at `path` with a page cache of
/// `cache_bytes`.
fn create(path: &Path, cache_bytes: usize) -> Result<Database, redb::DatabaseError> {
    Database::builder().set_cache_size(cache_bytes).create(path)
}

fn upsert(
    txn: &WriteTransaction,
    peers: &[PeerRecord],
    max_peers: usize,
) -> Result<(), StoreError> {
    let mut table = txn.open_table(PEERS)?;
    let mut index = txn.open_table(PEERS_BY_SEEN)?;
    for peer in peers {
        let entity = &peer.entity_id.0;
        let old = table.get(&entity[..])?.map(|v| stored_seen(v.value()));
        if let Some(seen) = old {
            index.remove(&seen_key(seen, entity))?;
        }
        table.insert(&entity[..], serde_json::to_vec(peer)?.as_slice())?;
        index.insert(&seen_key(peer.last_seen_ms, entity), ())?;
        forget_oldest(&mut table, &mut index, max_peers.max(1))?;
    }
    Ok(())
}

/// Forgets the least recently seen peers until at most `max_peers` are known.
fn forget_oldest(
    table: &mut Table<'_, &'static [u8], &'static [u8]>,
    index: &mut Table<'_, &'static SeenKey, ()>,
    max_peers: usize,
) -> Result<(), StoreError> {
    while table.len()? > max_peers as u64 {
        let Some((key, _)) = index.pop_first()? else {
            break;
        };
        table.remove(&key.value()[8..])?;
    }
    Ok(())
}

/// Writes peer sightings to the database on a thread of its own, so the node
/// actor never waits for the disk. Cheap to clone; the thread ends when the
/// last clone is dropped, after writing every sighting still queued.
#[derive(Debug, Clone)]
pub struct Writer {
    tx: SyncSender<PeerRecord>,
    counters: StoreCounters,
}

impl Writer {
    /// Starts the writer thread. At most `capacity` (at least 1) sightings wait
    /// for it; each batch it writes keeps at most `max_peers` peers known (see
    /// [`Store::upsert_peer`]). The thread's handle is for waiting until it
    /// has written everything, once every `Writer` is dropped.
    pub fn spawn(
        store: Arc<Store>,
        capacity: usize,
        max_peers: usize,
    ) -> Result<(Self, JoinHandle<()>), StoreError> {
        let (writer, rx) = Self::channel(capacity);
        let counters = writer.counters.clone();
        let thread = std::thread::Builder::new()
            .name("peer-store".into())
            .spawn(move || write_batches(&store, &rx, capacity, max_peers, &counters))?;
        Ok((writer, thread))
    }

    fn channel(capacity: usize) -> (Self, Receiver<PeerRecord>) {
        let (tx, rx) = sync_channel(capacity.max(1));
        let writer = Self {
            tx,
            counters: StoreCounters::default(),
        };
        (writer, rx)
    }

    /// Queues a sighting of a peer without waiting. If `capacity` sightings are
    /// already queued it is dropped and counted (`peer_store_dropped_total`):
    /// a sighting is advisory, and the peer's next connection records it again.
    pub fn record_peer(&self, record: PeerRecord) {
        if self.tx.try_send(record).is_err() {
            self.counters.dropped.inc();
        }
    }

    /// The writer's counters, for the node's metrics.
    pub fn counters(&self) -> &StoreCounters {
        &self.counters
    }
}

/// The writer thread: waits for a sighting, takes those queued behind it (at
/// most `max_batch` in all), keeps the latest of each peer and writes them in
/// one transaction. Returns once every [`Writer`] is dropped and the queue is
/// empty. A failed write is logged and its batch lost.
fn write_batches(
    store: &Store,
    rx: &Receiver<PeerRecord>,
    max_batch: usize,
    max_peers: usize,
    counters: &StoreCounters,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = HashMap::from([(first.entity_id, first)]);
        let mut taken = 1;
        while taken < max_batch
            && let Ok(record) = rx.try_recv()
        {
            batch.insert(record.entity_id, record);
            taken += 1;
        }
        let records: Vec<PeerRecord> = batch.into_values().collect();
        match store.upsert_peers(&records, max_peers) {
            Ok(()) => _ = counters.commits.inc(),
            Err(e) => tracing::error!(error = %e, peers = records.len(), "cannot record peers"),
        }
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

    #[test]
    fn at_the_bound_the_least_recently_seen_are_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("node.redb")).expect("open");
        let known = |s: &Store| {
            let mut ids: Vec<u8> = s
                .peers()
                .expect("peers")
                .iter()
                .map(|p| p.entity_id.0[0])
                .collect();
            ids.sort();
            ids
        };
        for b in 1..=3 {
            s.upsert_peer(&peer(b, u64::from(b) * 10), 3).expect("fill");
        }
        // Seeing 1 again makes it the most recent; the bound is not crossed.
        s.upsert_peer(&peer(1, 40), 3).expect("update");
        assert_eq!(known(&s), vec![1, 2, 3]);
        // A newcomer at the bound forgets the least recently seen: 2 (seen at 20).
        s.upsert_peer(&peer(4, 50), 3).expect("newcomer");
        assert_eq!(known(&s), vec![1, 3, 4]);
        // A newcomer seen before everyone known is itself the one forgotten.
        s.upsert_peer(&peer(5, 1), 3).expect("old newcomer");
        assert_eq!(known(&s), vec![1, 3, 4]);
        // A lower bound takes effect at the next write.
        s.upsert_peer(&peer(1, 60), 1).expect("lower bound");
        assert_eq!(known(&s), vec![1]);
        assert_index_agrees(&s);
    }

    #[test]
    fn a_database_without_the_index_gets_it_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.redb");
        {
            let s = Store::open(&path).expect("open");
            for b in 1..=3 {
                s.upsert_peer(&peer(b, u64::from(b)), 3).expect("fill");
            }
            // As written by a version without the index.
            let txn = s.db().expect("db").begin_write().expect("txn");
            txn.delete_table(PEERS_BY_SEEN).expect("delete");
            txn.commit().expect("commit");
        }
        let s = Store::open(&path).expect("reopen");
        assert_index_agrees(&s);
        s.upsert_peer(&peer(4, 4), 3).expect("newcomer");
        let mut ids: Vec<u8> = s
            .peers()
            .expect("peers")
            .iter()
            .map(|p| p.entity_id.0[0])
            .collect();
        ids.sort();
        assert_eq!(ids, vec![2, 3, 4], "1 was the least recently seen");
    }

    /// Checks that the index holds exactly one key per peer, at its sighting.
    fn assert_index_agrees(s: &Store) -> Vec<PeerRecord> {
        let txn = s.db().expect("db").begin_read().expect("txn");
        let index = txn.open_table(PEERS_BY_SEEN).expect("index");
        let keys: Vec<SeenKey> = index
            .iter()
            .expect("iter")
            .map(|row| *row.expect("row").0.value())
            .collect();
        let peers = s.peers().expect("peers");
        let mut expected: Vec<SeenKey> = peers
            .iter()
            .map(|p| seen_key(p.last_seen_ms, &p.entity_id.0))
            .collect();
        expected.sort();
        assert_eq!(keys, expected);
        peers
    }

    #[test]
    fn the_writer_coalesces_queued_sightings_by_peer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("node.redb")).expect("open");
        let (writer, rx) = Writer::channel(1024);
        // 300 sightings of 3 peers: the last of each is the latest.
        for n in 0..300u64 {
            writer.record_peer(peer((n % 3) as u8, n));
        }
        let counters = writer.counters().clone();
        drop(writer);
        write_batches(&store, &rx, 1024, 10, &counters);
        assert_eq!(counters.commits.get(), 1, "one transaction for all");
        let mut seen: Vec<(u8, u64)> = store
            .peers()
            .expect("peers")
            .iter()
            .map(|p| (p.entity_id.0[0], p.last_seen_ms))
            .collect();
        seen.sort();
        assert_eq!(seen, vec![(0, 297), (1, 298), (2, 299)]);

        // A batch takes at most `max_batch` sightings off the queue.
        let (writer, rx) = Writer::channel(1024);
        for n in 0..300u64 {
            writer.record_peer(peer((n % 3) as u8, 1000 + n));
        }
        let counters = writer.counters().clone();
        drop(writer);
        write_batches(&store, &rx, 100, 10, &counters);
        assert_eq!(counters.commits.get(), 3);
        assert_eq!(store.peers().expect("peers").len(), 3);
    }

    #[test]
    fn at_the_queue_bound_sightings_are_dropped_and_counted() {
        let (writer, rx) = Writer::channel(2);
        for b in 1..=3 {
            writer.record_peer(peer(b, 1));
        }
        let counters = writer.counters().clone();
        assert_eq!(counters.dropped.get(), 1);
        let text = crate::stats::Metrics::new(&counters, &Default::default(), &Default::default())
            .encode();
        assert!(text.contains("peer_store_dropped_total 1"), "{text}");
        assert!(text.contains("peer_store_commits_total 0"), "{text}");
        drop(writer);
        let queued: Vec<u8> = rx.iter().map(|p| p.entity_id.0[0]).collect();
        assert_eq!(
            queued,
            vec![1, 2],
            "the queued ones stay, the third is dropped"
        );
    }

    #[test]
    fn a_sighting_is_readable_once_the_writer_has_written_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(&dir.path().join("node.redb")).expect("open"));
        let (writer, thread) = Writer::spawn(store.clone(), 16, 10).expect("spawn");
        let counters = writer.counters().clone();
        let copy = writer.clone();
        writer.record_peer(peer(7, 70));
        drop(writer);
        copy.record_peer(peer(8, 80));
        // The thread ends once the last writer is gone, after writing both.
        drop(copy);
        thread.join().expect("writer thread");
        let mut ids: Vec<u8> = store
            .peers()
            .expect("peers")
            .iter()
            .map(|p| p.entity_id.0[0])
            .collect();
        ids.sort();
        assert_eq!(ids, vec![7, 8]);
        assert!((1..=2).contains(&counters.commits.get()));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any sequence of batches keeps the index in step with the table, the
        /// table within its bound, and the peers known those a model keeps: the
        /// most recently seen, by (last seen, entity id).
        #[test]
        fn the_index_agrees_and_the_bound_holds(
            batches in proptest::collection::vec(
                (proptest::collection::vec((0u8..8, 0u64..20), 1..5), 1usize..6),
                1..20,
            )
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let s = Store::open(&dir.path().join("node.redb")).expect("open");
            let mut model: std::collections::BTreeMap<u8, u64> = Default::default();
            for (records, max) in batches {
                let records: Vec<PeerRecord> =
                    records.iter().map(|&(b, seen)| peer(b, seen)).collect();
                s.upsert_peers(&records, max).expect("upsert");
                for r in &records {
                    model.insert(r.entity_id.0[0], r.last_seen_ms);
                    while model.len() > max {
                        let oldest = model
                            .iter()
                            .map(|(&b, &seen)| (seen, b))
                            .min()
                            .map(|(_, b)| b)
                            .expect("not empty");
                        model.remove(&oldest);
                    }
                }
                let peers = assert_index_agrees(&s);
                proptest::prop_assert!(peers.len() <= max);
                let mut stored: Vec<(u8, u64)> =
                    peers.iter().map(|p| (p.entity_id.0[0], p.last_seen_ms)).collect();
                stored.sort();
                let expected: Vec<(u8, u64)> = model.iter().map(|(&b, &s)| (b, s)).collect();
                proptest::prop_assert_eq!(stored, expected);
            }
        }
    }
}
