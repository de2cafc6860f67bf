//! The durable inbox: the events an agent must not miss (messages, task
//! updates) are written to the node's database before their sender is told
//! "accepted", and stay there until the agent acknowledges them.
//!
//! The actor reserves room for an event when a service delivers it (refusing
//! the sender with `INBOX_FULL` past the bounds), and hands it, once it is
//! released in its session's order, to the inbox writer: a thread of its own
//! that takes every event queued, gives each the next id, writes them in one
//! transaction and commits (group commit: one disk sync for the whole batch).
//! Only then are the waiting senders answered (through the actor) and the
//! events published to live readers. An agent's acknowledgement
//! (`POST /v1/inbox/ack`) goes through the same thread and frees the room.
//!
//! Each row of the `inbox` table is keyed by the event id and holds the
//! sender (if any), the bytes reserved and the event's JSON, as served; the
//! JSON of an event with a payload of 1 MiB or more is kept in a file of its
//! own instead ([`files`]).

mod files;

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use peer_core::{EntityId, ErrorCode, Rejection};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};

use crate::node::Event;
use crate::service::{Refused, ServiceId};
use crate::store::{Store, StoreError};
use files::{Files, OWN_FILE_FROM};

const INBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("inbox");
/// The next event id, kept so that ids are never given twice: once every
/// event is acknowledged the table alone would start again from 1.
const NEXT_ID: TableDefinition<&str, u64> = TableDefinition::new("inbox_next_id");
const NEXT_ID_KEY: &str = "next";

/// Bytes a row takes beyond its event's payload, as reserved: the rest of the
/// event's JSON (ids, type) and the row's header.
const ROW_OVERHEAD: u64 = 256;

/// The shortest time between two reopenings of the database by the writer.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// Most events one `GET /v1/inbox` page holds.
pub const MAX_PAGE: usize = 1000;

/// A page ends once its events' reserved bytes reach this (it holds at least
/// one event): a page of large messages read from their files is held whole.
const MAX_PAGE_BYTES: u64 = 64 << 20;

/// Bounds of the inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboxConfig {
    /// Most events held in all (default 100,000).
    pub max_events: usize,
    /// Most bytes held in all (default 1 GiB).
    pub max_bytes: u64,
    /// Most events held from one sender (default 10,000).
    pub max_events_per_sender: usize,
    /// Most bytes held from one sender (default 256 MiB; at least
    /// `transfer.max_message_size`, so one largest message fits).
    pub max_bytes_per_sender: u64,
    /// The wait a sender refused `INBOX_FULL` is told to keep, in seconds
    /// (default 5).
    pub retry_after_secs: u64,
    /// Most events written in one transaction (default 4,096).
    pub max_batch: usize,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            max_events: 100_000,
            max_bytes: 1 << 30,
            max_events_per_sender: 10_000,
            max_bytes_per_sender: 256 << 20,
            retry_after_secs: 5,
            max_batch: 4096,
        }
    }
}

impl InboxConfig {
    /// Checks the bounds against the largest message the node takes.
    pub fn validate(&self, max_message_size: u64) -> Result<(), String> {
        if self.max_events == 0 || self.max_events_per_sender == 0 || self.max_batch == 0 {
            return Err("inbox.max_events, inbox.max_events_per_sender and inbox.max_batch must be at least 1".into());
        }
        let largest = max_message_size + ROW_OVERHEAD;
        if self.max_bytes_per_sender < largest || self.max_bytes < self.max_bytes_per_sender {
            return Err(format!(
                "inbox.max_bytes ({}) >= inbox.max_bytes_per_sender ({}) >= transfer.max_message_size + {ROW_OVERHEAD} ({largest}) is required",
                self.max_bytes, self.max_bytes_per_sender
            ));
        }
        Ok(())
    }
}

/// A sender's answer the pipeline holds until its event is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AckId(pub(crate) u64);

/// An event on its way to the agent: reserved in the inbox if durable, with
/// the sender's answer that waits for it.
#[derive(Debug)]
pub struct Delivery {
    /// The event.
    pub event: Event,
    /// Its room in the inbox (durable events only).
    pub(crate) room: Option<Room>,
    /// The sender's answer, held until the event is committed.
    pub(crate) ack: Option<AckId>,
}

impl Delivery {
    /// An event that is not stored (progress, connections).
    pub fn ephemeral(event: Event) -> Self {
        Self {
            event,
            room: None,
            ack: None,
        }
    }

    /// Whether it goes to the inbox (it has room reserved there).
    pub fn is_durable(&self) -> bool {
        self.room.is_some()
    }

    /// Bytes of payload it holds in memory while it waits (reorder buffers
    /// count them).
    pub fn held_bytes(&self) -> u64 {
        self.event.payload_len()
    }
}

/// Room reserved in the inbox for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Room {
    from: Option<EntityId>,
    bytes: u64,
}

/// What the inbox holds, and what is reserved on its way there.
#[derive(Debug, Default)]
struct Usage {
    events: usize,
    bytes: u64,
    by_sender: HashMap<EntityId, (usize, u64)>,
}

impl Usage {
    fn add(&mut self, room: Room) {
        self.events += 1;
        self.bytes += room.bytes;
        if let Some(from) = room.from {
            let row = self.by_sender.entry(from).or_default();
            row.0 += 1;
            row.1 += room.bytes;
        }
    }

    fn remove(&mut self, room: Room) {
        self.events = self.events.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(room.bytes);
        if let Some(from) = room.from
            && let Some(row) = self.by_sender.get_mut(&from)
        {
            row.0 = row.0.saturating_sub(1);
            row.1 = row.1.saturating_sub(room.bytes);
            if row.0 == 0 {
                self.by_sender.remove(&from);
            }
        }
    }
}

/// The inbox's counters, served on `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct InboxCounters {
    /// Events held (and reserved).
    pub(crate) events: Gauge,
    /// Bytes held (and reserved).
    pub(crate) bytes: Gauge,
    /// Transactions committed.
    pub(crate) commits: Counter,
    /// Events written.
    pub(crate) written: Counter,
    /// Senders refused `INBOX_FULL`.
    pub(crate) refused: Counter,
}

/// A write of a service's own records, run by the inbox writer in order with
/// the events (so an event written after it finds it stored).
pub type StoreOp = Box<dyn FnOnce(&redb::WriteTransaction) -> Result<(), StoreError> + Send>;

/// What the writer thread takes.
enum Entry {
    Write {
        op: StoreOp,
        /// Who is told once it is committed, and with what token.
        done: Option<(ServiceId, u64)>,
    },
    Append {
        event: Event,
        room: Room,
        ack: Option<AckId>,
    },
    Ack {
        up_to: u64,
        reply: oneshot::Sender<Result<Acked, StoreError>>,
    },
}

/// One batch, written: the answers it releases and the services it tells,
/// or why it failed.
#[derive(Debug)]
pub(crate) struct Committed {
    pub acks: Vec<AckId>,
    pub done: Vec<(ServiceId, u64)>,
    pub result: Result<(), String>,
}

/// The answer to an agent's acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Acked {
    /// Events released.
    pub acked: usize,
    /// Events still held.
    pub remaining: usize,
}

/// One stored event, as `GET /v1/inbox` serves it.
#[derive(Debug, Clone, Serialize)]
pub struct Stored {
    /// Its id.
    pub id: u64,
    /// The event's JSON, as written.
    pub event: Box<serde_json::value::RawValue>,
}

/// The actor's and handles' side of the inbox. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Inbox {
    tx: Sender<Entry>,
    usage: Arc<Mutex<Usage>>,
    config: Arc<InboxConfig>,
    counters: InboxCounters,
    store: Arc<Store>,
    files: Arc<Files>,
}

impl Inbox {
    /// Opens the inbox of `store` (counting what it holds) and starts its
    /// writer thread, which reports each batch to `committed` and publishes
    /// the events it wrote on `events`. The thread ends once every `Inbox` is
    /// dropped, after writing what was queued.
    pub(crate) fn start(
        store: Arc<Store>,
        config: InboxConfig,
        committed: tokio::sync::mpsc::Sender<Committed>,
        events: broadcast::Sender<Event>,
    ) -> Result<Self, StoreError> {
        let files = Arc::new(Files::open(store.dir().join("inbox"))?);
        let (usage, next_id) = load(&store, &files)?;
        let counters = InboxCounters::default();
        counters.events.set(usage.events as i64);
        counters.bytes.set(usage.bytes as i64);
        let usage = Arc::new(Mutex::new(usage));
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = Writer {
            store: store.clone(),
            files: files.clone(),
            usage: usage.clone(),
            counters: counters.clone(),
            committed,
            events,
            next_id,
            max_batch: config.max_batch,
            reopen: false,
            last_reopen: None,
            resync_ids: false,
        };
        std::thread::Builder::new()
            .name("peer-inbox".into())
            .spawn(move || writer.run(&rx))?;
        Ok(Self {
            tx,
            usage,
            config: Arc::new(config),
            counters,
            store,
            files,
        })
    }

    /// The inbox's counters.
    pub fn counters(&self) -> &InboxCounters {
        &self.counters
    }

    fn usage(&self) -> std::sync::MutexGuard<'_, Usage> {
        // A panic while the lock was held left counts, not broken invariants.
        self.usage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves room for `event` (from `from`, if a peer sent it), or refuses
    /// the sender `INBOX_FULL` with the configured wait when the sender's or
    /// the whole inbox's bounds would be crossed. Events no peer sent (task
    /// updates of this node) are never refused: the tasks' own bounds bound them.
    pub(crate) fn reserve(
        &self,
        event: Event,
        from: Option<EntityId>,
    ) -> Result<Delivery, Refused> {
        let room = Room {
            from,
            bytes: event.payload_len() + ROW_OVERHEAD,
        };
        let mut usage = self.usage();
        if let Some(sender) = from {
            let c = &self.config;
            let (n, b) = usage.by_sender.get(&sender).copied().unwrap_or_default();
            let full = if n + 1 > c.max_events_per_sender || b + room.bytes > c.max_bytes_per_sender
            {
                Some("this sender's share")
            } else if usage.events + 1 > c.max_events || usage.bytes + room.bytes > c.max_bytes {
                Some("the inbox")
            } else {
                None
            };
            if let Some(what) = full {
                drop(usage);
                self.counters.refused.inc();
                let wait = Duration::from_secs(c.retry_after_secs);
                return Err(Refused {
                    rejection: Rejection::new(
                        ErrorCode::InboxFull,
                        format!(
                            "{what} of the recipient's inbox is full until its agent reads; retry after {} ms",
                            wait.as_millis()
                        ),
                    ),
                    retry_after: Some(wait),
                });
            }
        }
        usage.add(room);
        self.counters.events.set(usage.events as i64);
        self.counters.bytes.set(usage.bytes as i64);
        Ok(Delivery {
            event,
            room: Some(room),
            ack: None,
        })
    }

    /// Queues a write of a service's records; `done` names the service and
    /// token told once it is committed (or failed).
    pub(crate) fn write(&self, op: StoreOp, done: Option<(ServiceId, u64)>) {
        // As for `append`.
        _ = self.tx.send(Entry::Write { op, done });
    }

    /// Queues a reserved event for the writer.
    pub(crate) fn append(&self, event: Event, room: Room, ack: Option<AckId>) {
        // Fails only when the writer thread is gone, which happens only as
        // the node stops.
        _ = self.tx.send(Entry::Append { event, room, ack });
    }

    /// Releases every event with an id up to `up_to`.
    pub async fn ack(&self, up_to: u64) -> Result<Acked, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Entry::Ack { up_to, reply })
            .map_err(|_| StoreError::stopped())?;
        rx.await.map_err(|_| StoreError::stopped())?
    }

    /// Up to `limit` (at most [`MAX_PAGE`]) stored events after id `after`,
    /// oldest first, fewer once they hold 64 MiB. Reads the database and the
    /// inbox's files: call it off the runtime's workers.
    pub fn page(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StoreError> {
        self.page_within(after, limit, MAX_PAGE_BYTES)
    }

    fn page_within(
        &self,
        after: u64,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<Stored>, StoreError> {
        let txn = self.store.db()?.begin_read()?;
        let table = txn.open_table(INBOX)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for row in table
            .range(after.saturating_add(1)..)?
            .take(limit.min(MAX_PAGE))
        {
            if bytes >= max_bytes {
                break;
            }
            let (id, value) = row?;
            let id = id.value();
            let (room, body) = decode(value.value())?;
            bytes += room.bytes;
            let json = match body {
                Body::Inline(json) => json.to_owned(),
                Body::File => match self.files.read(id)? {
                    Some(json) => json,
                    // Acknowledged since this snapshot was taken: the writer
                    // removes the file once the row's removal is committed.
                    None if !self.holds(id)? => continue,
                    None => {
                        return Err(StoreError::corrupt(&format!(
                            "the file of inbox event {id} is missing"
                        )));
                    }
                },
            };
            let event = serde_json::value::RawValue::from_string(json)?;
            out.push(Stored { id, event });
        }
        Ok(out)
    }

    /// Whether event `id` is stored now.
    fn holds(&self, id: u64) -> Result<bool, StoreError> {
        let txn = self.store.db()?.begin_read()?;
        Ok(txn.open_table(INBOX)?.get(id)?.is_some())
    }
}

/// Counts what the inbox holds, by sender, and the next free id; removes the
/// files no row names (a crash came between writing one and its row, or
/// between a row's removal and its file's).
fn load(store: &Store, files: &Files) -> Result<(Usage, u64), StoreError> {
    let txn = store.db()?.begin_write()?;
    let mut usage = Usage::default();
    let mut in_files = HashSet::new();
    let next_id;
    {
        let table = txn.open_table(INBOX)?;
        for row in table.iter()? {
            let (id, value) = row?;
            let (room, body) = decode(value.value())?;
            usage.add(room);
            if body == Body::File {
                in_files.insert(id.value());
            }
        }
        let after_rows = table.last()?.map_or(1, |(k, _)| k.value() + 1);
        let kept = txn
            .open_table(NEXT_ID)?
            .get(NEXT_ID_KEY)?
            .map_or(1, |v| v.value());
        next_id = after_rows.max(kept);
    }
    txn.commit()?;
    let removed = files.remove_others(&in_files)?;
    if removed > 0 {
        tracing::info!(removed, "removed inbox files left by an interrupted write");
    }
    Ok((usage, next_id))
}

/// Flags of a row's first byte.
const HAS_SENDER: u8 = 1;
const IN_FILE: u8 = 2;

/// Where a row's event JSON is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body<'a> {
    /// In the row.
    Inline(&'a str),
    /// In the event's own file.
    File,
}

/// A row: flags (1 byte: sender present, JSON in a file), sender (32 bytes,
/// zero if none), bytes reserved (8 bytes, big-endian), then the event's
/// JSON, or nothing if it is in a file.
fn encode(room: Room, body: Body<'_>) -> Vec<u8> {
    let (flag, json) = match body {
        Body::Inline(json) => (0, json),
        Body::File => (IN_FILE, ""),
    };
    let mut row = Vec::with_capacity(41 + json.len());
    row.push(flag | if room.from.is_some() { HAS_SENDER } else { 0 });
    row.extend_from_slice(&room.from.map_or([0; 32], |e| e.0));
    row.extend_from_slice(&room.bytes.to_be_bytes());
    row.extend_from_slice(json.as_bytes());
    row
}

fn decode(row: &[u8]) -> Result<(Room, Body<'_>), StoreError> {
    if row.len() < 41 {
        return Err(StoreError::corrupt("inbox row shorter than its header"));
    }
    if row[0] & !(HAS_SENDER | IN_FILE) != 0 {
        return Err(StoreError::corrupt("inbox row with unknown flags"));
    }
    let from = (row[0] & HAS_SENDER != 0).then(|| {
        let mut id = [0; 32];
        id.copy_from_slice(&row[1..33]);
        EntityId(id)
    });
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&row[33..41]);
    let body = if row[0] & IN_FILE != 0 {
        Body::File
    } else {
        Body::Inline(
            std::str::from_utf8(&row[41..])
                .map_err(|_| StoreError::corrupt("inbox row is not UTF-8 JSON"))?,
        )
    };
    Ok((
        Room {
            from,
            bytes: u64::from_be_bytes(bytes),
        },
        body,
    ))
}

/// The writer thread's state.
struct Writer {
    store: Arc<Store>,
    files: Arc<Files>,
    usage: Arc<Mutex<Usage>>,
    counters: InboxCounters,
    committed: tokio::sync::mpsc::Sender<Committed>,
    events: broadcast::Sender<Event>,
    next_id: u64,
    max_batch: usize,
    /// Whether the last batch failed: the next one first reopens the
    /// database, at most every [`REOPEN_EVERY`] (redb refuses every operation
    /// after an I/O error until it is reopened).
    reopen: bool,
    last_reopen: Option<Instant>,
    /// Whether a commit failed: it may have landed after all, so the next
    /// batch first takes its ids after the last one the database holds.
    resync_ids: bool,
}

impl Writer {
    fn run(mut self, rx: &Receiver<Entry>) {
        loop {
            // While the database waits to be reopened, it is tried again
            // every `REOPEN_EVERY` even if nothing comes to write.
            let first = if self.reopen {
                match rx.recv_timeout(REOPEN_EVERY) {
                    Ok(entry) => entry,
                    Err(RecvTimeoutError::Timeout) => {
                        self.reopen_if_due();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(entry) => entry,
                    Err(_) => return,
                }
            };
            let mut batch = vec![first];
            while batch.len() < self.max_batch
                && let Ok(entry) = rx.try_recv()
            {
                batch.push(entry);
            }
            self.write(batch);
        }
    }

    /// Writes one batch in one transaction, then answers and publishes.
    /// Every entry's waiter is answered and every reserved room accounted for,
    /// those of entries after one that failed too: a failed batch fails whole.
    fn write(&mut self, batch: Vec<Entry>) {
        self.reopen_if_due();
        if self.resync_ids
            && let Ok(next_id) = stored_next_id(&self.store)
        {
            self.next_id = self.next_id.max(next_id);
            self.resync_ids = false;
        }
        let first_id = self.next_id;
        let mut acks = Vec::new();
        let mut done = Vec::new();
        let mut replies = Vec::new();
        let mut rooms = Vec::new();
        let work: Vec<Work> = batch
            .into_iter()
            .map(|entry| match entry {
                Entry::Write { op, done: tell } => {
                    done.extend(tell);
                    Work::Write(op)
                }
                Entry::Append { event, room, ack } => {
                    acks.extend(ack);
                    rooms.push(room);
                    Work::Append(event, room)
                }
                Entry::Ack { up_to, reply } => {
                    replies.push(reply);
                    Work::Ack(up_to)
                }
            })
            .collect();
        let mut appended = Vec::new();
        // Per acknowledgement, the events it released.
        let mut released = Vec::new();
        let mut freed = Vec::new();
        // Events written to files of their own, and files to remove once
        // their rows' removal is committed.
        let mut written = Vec::new();
        let mut unlinked = Vec::new();
        // Whether the error, if any, came from the commit itself, whose
        // outcome is then unknown.
        let mut committing = false;
        let result = (|| -> Result<(), StoreError> {
            let txn = self.store.db()?.begin_write()?;
            {
                let mut table = txn.open_table(INBOX)?;
                for item in work {
                    match item {
                        Work::Write(op) => op(&txn)?,
                        Work::Append(mut event, room) => {
                            event.set_event_id(self.next_id);
                            let row = if event.payload_len() >= OWN_FILE_FROM {
                                written.push(self.next_id);
                                self.files.write(self.next_id, &event)?;
                                encode(room, Body::File)
                            } else {
                                encode(room, Body::Inline(&serde_json::to_string(&event)?))
                            };
                            table.insert(self.next_id, row.as_slice())?;
                            self.next_id += 1;
                            appended.push(event);
                        }
                        Work::Ack(up_to) => {
                            let before = freed.len();
                            let mut bad = None;
                            table.retain_in(..=up_to, |id, row| {
                                match decode(row) {
                                    Ok((room, body)) => {
                                        freed.push(room);
                                        if body == Body::File {
                                            unlinked.push(id);
                                        }
                                    }
                                    Err(e) => bad = Some(e),
                                }
                                false
                            })?;
                            if let Some(e) = bad {
                                return Err(e);
                            }
                            released.push(freed.len() - before);
                        }
                    }
                }
            }
            if !written.is_empty() {
                self.files.sync_dir()?;
            }
            if !appended.is_empty() {
                txn.open_table(NEXT_ID)?.insert(NEXT_ID_KEY, self.next_id)?;
            }
            committing = true;
            txn.commit()?;
            Ok(())
        })();
        self.reopen = result.is_err();
        self.resync_ids |= result.is_err() && committing;
        let mut usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        // Files to remove: those of acknowledged events once their rows'
        // removal is committed; those of events whose rows were not written
        // (their ids are given again). If the commit itself failed, the rows
        // may have landed after all: every file stays, and the next start
        // removes those no row names (as it does any that cannot be removed).
        let remove = match &result {
            Ok(()) => {
                for room in freed {
                    usage.remove(room);
                }
                unlinked
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    events = rooms.len(),
                    "cannot write to the inbox; every write of this batch is refused"
                );
                self.next_id = first_id;
                for room in rooms {
                    usage.remove(room);
                }
                if committing { Vec::new() } else { written }
            }
        };
        let remaining = usage.events;
        self.counters.events.set(usage.events as i64);
        self.counters.bytes.set(usage.bytes as i64);
        drop(usage);
        for id in remove {
            self.files.remove(id);
        }
        match &result {
            Ok(()) => {
                for (reply, acked) in replies.into_iter().zip(released) {
                    _ = reply.send(Ok(Acked { acked, remaining }));
                }
            }
            Err(e) => {
                for reply in replies {
                    _ = reply.send(Err(e.clone()));
                }
            }
        }
        if result.is_ok() {
            self.counters.commits.inc();
            self.counters.written.inc_by(appended.len() as u64);
            for event in appended {
                _ = self.events.send(event);
            }
        }
        if !acks.is_empty() || !done.is_empty() {
            let committed = Committed {
                acks,
                done,
                result: result.map_err(|e| e.to_string()),
            };
            // Fails only when the actor has stopped; nobody waits then.
            _ = self.committed.blocking_send(committed);
        }
    }
}

impl Writer {
    /// After a failed batch, at most every [`REOPEN_EVERY`]: reopens the
    /// database if it refuses to begin a transaction (redb does after an I/O
    /// error).
    fn reopen_if_due(&mut self) {
        if !self.reopen || self.last_reopen.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
            return;
        }
        self.last_reopen = Some(Instant::now());
        // A failure that left the database working (an event's own file that
        // could not be written) does not close it.
        let working = (|| -> Result<(), StoreError> {
            let txn = self.store.db()?.begin_write()?;
            txn.open_table(INBOX)?;
            Ok(())
        })();
        let ready = match working {
            Ok(()) => Ok(()),
            Err(_) => self.store.reopen().inspect(|()| {
                tracing::warn!("database reopened after a failed write");
            }),
        };
        match ready {
            Ok(()) => self.reopen = false,
            Err(e) => tracing::error!(error = %e, "cannot reopen the database"),
        }
    }
}

/// The next event id by the database: after its last row and after the
/// id it kept.
fn stored_next_id(store: &Store) -> Result<u64, StoreError> {
    let txn = store.db()?.begin_read()?;
    let after_rows = txn
        .open_table(INBOX)?
        .last()?
        .map_or(1, |(k, _)| k.value() + 1);
    let kept = match txn.open_table(NEXT_ID) {
        Ok(table) => table.get(NEXT_ID_KEY)?.map_or(1, |v| v.value()),
        Err(redb::TableError::TableDoesNotExist(_)) => 1,
        Err(e) => return Err(e.into()),
    };
    Ok(after_rows.max(kept))
}

/// An entry's work in the batch's transaction, its waiter set aside.
enum Work {
    Write(StoreOp),
    Append(Event, Room),
    Ack(u64),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::RawJson;

    fn message(from: u8, n: u64) -> Event {
        Event::Message {
            event_id: None,
            message_id: format!("m{n}"),
            from: EntityId([from; 32]),
            msg_type: "message".into(),
            payload: RawJson::parse(format!("{{\"n\":{n}}}").into_bytes(), 8).expect("json"),
        }
    }

    fn inbox(
        dir: &tempfile::TempDir,
        config: InboxConfig,
    ) -> (Inbox, tokio::sync::mpsc::Receiver<Committed>) {
        let store = Arc::new(Store::open(&dir.path().join("db")).expect("store"));
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (events, _) = broadcast::channel(16);
        (Inbox::start(store, config, tx, events).expect("inbox"), rx)
    }

    #[test]
    fn rows_keep_their_sender_and_reservation() {
        for from in [None, Some(EntityId([7; 32]))] {
            let room = Room { from, bytes: 300 };
            let body = Body::Inline(r#"{"type":"message"}"#);
            assert_eq!(decode(&encode(room, body)).expect("decodes"), (room, body));
            let row = encode(room, Body::File);
            assert_eq!(row.len(), 41);
            assert_eq!(decode(&row).expect("decodes"), (room, Body::File));
        }
        assert!(decode(&[1; 40]).is_err(), "shorter than the header");
        assert!(decode(&[4; 41]).is_err(), "unknown flags");
    }

    #[tokio::test]
    async fn the_whole_inbox_is_bounded_but_this_nodes_own_events_are_not_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = InboxConfig {
            max_events: 3,
            ..InboxConfig::default()
        };
        let (inbox, mut committed) = inbox(&dir, config);
        for n in 0..3 {
            let d = inbox
                .reserve(message(n as u8, n), Some(EntityId([n as u8; 32])))
                .expect("room");
            inbox.append(d.event, d.room.expect("reserved"), Some(AckId(n)));
        }
        let refused = inbox
            .reserve(message(9, 9), Some(EntityId([9; 32])))
            .expect_err("full");
        assert_eq!(refused.rejection.code, ErrorCode::InboxFull);
        assert!(
            refused.rejection.reason.contains("the inbox"),
            "{}",
            refused.rejection.reason
        );
        assert_eq!(refused.retry_after, Some(Duration::from_secs(5)));
        // An event no peer sent (a task update of this node) still gets room.
        assert!(inbox.reserve(message(0, 10), None).is_ok());

        // Every answer is released once its event is committed.
        let mut acks = Vec::new();
        while acks.len() < 3 {
            let c = committed.recv().await.expect("committed");
            assert!(c.result.is_ok());
            acks.extend(c.acks);
        }
        assert_eq!(acks, vec![AckId(0), AckId(1), AckId(2)]);
        let page = tokio::task::spawn_blocking({
            let inbox = inbox.clone();
            move || inbox.page(0, 10)
        })
        .await
        .expect("join")
        .expect("page");
        assert_eq!(page.iter().map(|s| s.id).collect::<Vec<_>>(), vec![1, 2, 3]);

        // Acknowledging frees room for senders again.
        let acked = inbox.ack(2).await.expect("ack");
        assert_eq!(acked.acked, 2);
        assert!(
            inbox
                .reserve(message(9, 9), Some(EntityId([9; 32])))
                .is_ok()
        );
    }

    /// Appends `events` from sender 1 and waits until they are committed.
    async fn append_all(
        inbox: &Inbox,
        committed: &mut tokio::sync::mpsc::Receiver<Committed>,
        events: Vec<Event>,
    ) {
        let n = events.len();
        for (i, event) in events.into_iter().enumerate() {
            let d = inbox.reserve(event, Some(EntityId([1; 32]))).expect("room");
            inbox.append(d.event, d.room.expect("reserved"), Some(AckId(i as u64)));
        }
        let mut acks = 0;
        while acks < n {
            let c = committed.recv().await.expect("committed");
            assert!(c.result.is_ok(), "{:?}", c.result);
            acks += c.acks.len();
        }
    }

    fn large(n: u64) -> Event {
        let text = format!("\"{}\"", "x".repeat(OWN_FILE_FROM as usize));
        let mut event = message(1, n);
        if let Event::Message { payload, .. } = &mut event {
            *payload = RawJson::parse(text.into_bytes(), 8).expect("json");
        }
        event
    }

    fn ids(page: &[Stored]) -> Vec<u64> {
        page.iter().map(|s| s.id).collect()
    }

    #[tokio::test]
    async fn a_failed_batch_answers_every_entry_and_gives_back_every_room() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (inbox, mut committed) = inbox(&dir, InboxConfig::default());
        // A first batch holds the writer, so that the entries below are
        // queued before it takes them, as one batch.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, holding) = std::sync::mpsc::channel::<()>();
        let hold: StoreOp = Box::new(move |_| {
            _ = started.send(());
            // Released, or the test ended: either way the batch goes on.
            _ = held.recv();
            Ok(())
        });
        inbox.write(hold, None);
        // Once the writer runs it, it has taken its batch: what follows waits.
        holding.recv().expect("the writer runs the first batch");
        // A write that fails, and an event and an acknowledgement behind it.
        let failing: StoreOp = Box::new(|_| Err(StoreError::corrupt("injected")));
        inbox.write(failing, Some((ServiceId(3), 9)));
        let d = inbox
            .reserve(message(1, 1), Some(EntityId([1; 32])))
            .expect("room");
        inbox.append(d.event, d.room.expect("reserved"), Some(AckId(7)));
        let (reply, acked) = oneshot::channel();
        inbox
            .tx
            .send(Entry::Ack { up_to: 5, reply })
            .expect("writer");
        assert_eq!(inbox.usage().events, 1);
        release.send(()).expect("held");

        let c = tokio::time::timeout(Duration::from_secs(10), committed.recv())
            .await
            .expect("the failed batch is told, not dropped")
            .expect("committed");
        assert_eq!(c.acks, vec![AckId(7)], "the event's sender is answered");
        assert_eq!(c.done, vec![(ServiceId(3), 9)], "the service is told");
        assert!(c.result.expect_err("failed").contains("injected"));
        let e = acked.await.expect("the acknowledgement is answered");
        assert!(e.expect_err("failed").to_string().contains("injected"));
        assert_eq!(inbox.usage().events, 0, "the event's room is given back");
        // The writer goes on: the next event takes id 1.
        append_all(&inbox, &mut committed, vec![message(1, 2)]).await;
        assert_eq!(ids(&inbox.page(0, 10).expect("page")), vec![1]);
    }

    #[tokio::test]
    async fn ids_are_never_given_twice_even_once_everything_is_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(&dir.path().join("db")).expect("store"));
        let start = || {
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let (events, _) = broadcast::channel(16);
            let inbox = Inbox::start(store.clone(), InboxConfig::default(), tx, events);
            (inbox.expect("inbox"), rx)
        };
        let (inbox, mut committed) = start();
        append_all(&inbox, &mut committed, vec![message(1, 1), message(1, 2)]).await;
        assert_eq!(inbox.ack(2).await.expect("ack").remaining, 0);
        drop(inbox);
        // Started again on the empty inbox: ids go on from 3, so a reader
        // resuming after 2 misses nothing.
        let (inbox, mut committed) = start();
        append_all(&inbox, &mut committed, vec![message(1, 3)]).await;
        assert_eq!(ids(&inbox.page(0, 10).expect("page")), vec![3]);
    }

    #[tokio::test]
    async fn a_page_stops_at_its_byte_bound_and_a_lost_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (inbox, mut committed) = inbox(&dir, InboxConfig::default());
        append_all(
            &inbox,
            &mut committed,
            vec![large(1), large(2), message(1, 3)],
        )
        .await;
        let one = OWN_FILE_FROM + 2 + ROW_OVERHEAD;
        assert_eq!(ids(&inbox.page_within(0, 10, one).expect("page")), vec![1]);
        assert_eq!(
            ids(&inbox.page_within(0, 10, one + 1).expect("page")),
            vec![1, 2]
        );
        assert_eq!(
            ids(&inbox.page_within(0, 10, 1).expect("page")),
            vec![1],
            "at least one"
        );
        assert_eq!(ids(&inbox.page(0, 10).expect("page")), vec![1, 2, 3]);
        // A file removed behind the node's back, its row still there.
        std::fs::remove_file(dir.path().join("inbox").join("2.json")).expect("remove");
        let err = inbox.page(0, 10).expect_err("missing");
        assert!(err.to_string().contains("event 2 is missing"), "{err}");
        // Acknowledged, its row goes too, and so does the error.
        inbox.ack(2).await.expect("ack");
        assert_eq!(ids(&inbox.page(0, 10).expect("page")), vec![3]);
        assert!(!dir.path().join("inbox").join("1.json").exists());
    }

    #[test]
    fn the_bounds_must_fit_the_largest_message() {
        let c = InboxConfig::default();
        c.validate(64 << 20)
            .expect("the defaults fit the default largest message");
        let err = c
            .validate(1 << 30)
            .expect_err("a 1 GiB message does not fit");
        assert!(err.contains("inbox.max_bytes_per_sender"), "{err}");
        let zero = InboxConfig {
            max_events: 0,
            ..InboxConfig::default()
        };
        assert!(zero.validate(1).is_err());
    }
}
