//! Chunked transfer: splitting large payloads and reassembling them with bounded memory.
//!
//! A message too large for one envelope travels as a *transfer*: one `chunk_manifest`
//! payload announcing it, then `chunk` payloads carrying its bytes, each in its own
//! envelope from the same peer. The receiver may ask for missing chunks with a
//! `chunk_resend` payload. All three are fixed-layout binary payloads (integers
//! big-endian, see [`crate::codec`]):
//!
//! ```text
//! chunk_manifest                       chunk                          chunk_resend
//! transfer_id  16 bytes                transfer_id  16 bytes          transfer_id  16 bytes
//! total_len    u64                     index        u32               count        u16 (<= 1024)
//! chunk_size   u32                     data         u32 len + bytes  index        u32 × count,
//! chunk_count  u32                                                                 strictly increasing
//! sha256       32 bytes (whole message)
//! msg_type     u8 len + ASCII (the reassembled message's type)
//! ```
//!
//! Chunk `i` holds bytes `i × chunk_size ..` of the message: `chunk_size` bytes, except
//! the last, which holds the rest. `chunk_count` is `ceil(total_len / chunk_size)`,
//! and 1 for an empty message (one empty chunk), so every transfer ends with a chunk.
//!
//! The sender side is [`split`]; the receiver side is [`Reassembler`]. The reassembler
//! is keyed by peer *and* transfer id, so transfer ids are a per-peer namespace and a
//! reassembled message is attributed to the peer whose envelopes carried every piece.
//! It refuses a transfer before buffering anything (size, consistency and concurrency
//! limits are checked on the manifest), allocates the message's buffer on the first
//! chunk, writes chunks into place, and returns the message only if its SHA-256
//! matches the manifest. See [`Reassembler`] for each refusal and its error code.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use sha2::{Digest, Sha256};

use crate::codec::{DecodeError, Reader, Writer};
use crate::error::{ErrorCode, Rejection};
use crate::identity::EntityId;
use crate::msg_type::MsgType;

/// The msg_type of a [`Manifest`] payload.
pub const MSG_MANIFEST: &str = "chunk_manifest";
/// The msg_type of a [`Chunk`] payload.
pub const MSG_CHUNK: &str = "chunk";
/// The msg_type of a [`ResendRequest`] payload.
pub const MSG_RESEND: &str = "chunk_resend";

/// Chunk size a sender uses unless it has a reason not to (32 KiB).
pub const DEFAULT_CHUNK_SIZE: usize = 32 * 1024;

/// Most chunk indexes one [`ResendRequest`] carries (and [`Reassembler::missing`] lists).
pub const MAX_RESEND_INDEXES: usize = 1024;

/// Bytes a [`Manifest`] encoding takes beyond its msg_type's characters.
pub const MANIFEST_FIXED_LEN: usize = 16 + 8 + 4 + 4 + 32 + 1;

/// Bytes a [`Chunk`] encoding takes beyond its data.
pub const CHUNK_OVERHEAD: usize = 16 + 4 + 4;

/// Whether `msg_type` is one of the chunked-transfer message types. A transfer never
/// carries one of these (no nested transfers).
pub fn is_chunk_msg_type(msg_type: &str) -> bool {
    [MSG_MANIFEST, MSG_CHUNK, MSG_RESEND].contains(&msg_type)
}

/// A transfer id: a UUID v4 chosen by the sender, unique among its open transfers to
/// one receiver; shown hyphenated.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferId(pub [u8; 16]);

impl TransferId {
    /// A random (version 4) UUID made from 16 caller-supplied random bytes.
    pub fn from_random(bytes: [u8; 16]) -> Self {
        Self(*uuid::Builder::from_random_bytes(bytes).as_uuid().as_bytes())
    }

    const MIN: Self = Self([0; 16]);
    const MAX: Self = Self([0xff; 16]);
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&uuid::Uuid::from_bytes(self.0).hyphenated(), f)
    }
}

impl fmt::Debug for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TransferId({self})")
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn read_msg_type(r: &mut Reader<'_>) -> Result<MsgType, DecodeError> {
    std::str::from_utf8(r.short_bytes("msg_type")?)
        .ok()
        .and_then(|s| s.parse::<MsgType>().ok())
        .ok_or(DecodeError::Invalid {
            field: "msg_type",
            why: "1 to 64 characters of a-z, 0-9, '_' and '.'",
        })
}

/// The `chunk_manifest` payload: announces a transfer before its chunks.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Manifest {
    /// The transfer this manifest opens.
    pub transfer_id: TransferId,
    /// Length of the whole message, in bytes.
    pub total_len: u64,
    /// Length of every chunk but the last, in bytes.
    pub chunk_size: u32,
    /// Number of chunks: [`Manifest::expected_chunk_count`] of the two fields above.
    pub chunk_count: u32,
    /// SHA-256 of the whole message.
    pub sha256: [u8; 32],
    /// The msg_type of the reassembled message.
    pub msg_type: MsgType,
}

impl Manifest {
    /// The chunk count a message of `total_len` bytes cut in `chunk_size` pieces has:
    /// `ceil(total_len / chunk_size)`, and 1 for an empty message. `None` if
    /// `chunk_size` is 0 or the count does not fit a u32.
    pub fn expected_chunk_count(total_len: u64, chunk_size: u32) -> Option<u32> {
        if chunk_size == 0 {
            return None;
        }
        let count = total_len.div_ceil(u64::from(chunk_size)).max(1);
        u32::try_from(count).ok()
    }

    /// Whether `chunk_count` agrees with `total_len` and `chunk_size`.
    pub fn is_consistent(&self) -> bool {
        Self::expected_chunk_count(self.total_len, self.chunk_size) == Some(self.chunk_count)
    }

    /// The length chunk `index` must have: `chunk_size`, or for the last chunk
    /// `total_len − (chunk_count − 1) × chunk_size`. `None` if `index` is out of range
    /// or the manifest is not consistent.
    pub fn chunk_len(&self, index: u32) -> Option<u64> {
        if !self.is_consistent() || index >= self.chunk_count {
            return None;
        }
        if index + 1 < self.chunk_count {
            return Some(u64::from(self.chunk_size));
        }
        self.total_len
            .checked_sub(u64::from(index) * u64::from(self.chunk_size))
    }

    /// The bytes of the message chunk `index` holds; `None` if `index` is out of
    /// range or the manifest is not consistent.
    pub fn chunk_range(&self, index: u32) -> Option<std::ops::Range<usize>> {
        let len = usize::try_from(self.chunk_len(index)?).ok()?;
        let start = usize::try_from(index)
            .ok()?
            .checked_mul(usize::try_from(self.chunk_size).ok()?)?;
        Some(start..start.checked_add(len)?)
    }

    /// Length of [`Manifest::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        MANIFEST_FIXED_LEN + self.msg_type.as_str().len()
    }

    /// The canonical wire encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(self.encoded_len());
        w.raw(&self.transfer_id.0)
            .u64(self.total_len)
            .u32(self.chunk_size)
            .u32(self.chunk_count)
            .raw(&self.sha256)
            .short_bytes(self.msg_type.as_str().as_bytes());
        w.into_vec()
    }

    /// Decodes a manifest. Only the layout and the msg_type's alphabet are checked
    /// here; [`Reassembler::begin`] checks consistency and limits.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let transfer_id = TransferId(r.array("transfer_id")?);
        let total_len = r.u64("total_len")?;
        let chunk_size = r.u32("chunk_size")?;
        let chunk_count = r.u32("chunk_count")?;
        let sha256 = r.array("sha256")?;
        let msg_type = read_msg_type(&mut r)?;
        r.finish()?;
        Ok(Self {
            transfer_id,
            total_len,
            chunk_size,
            chunk_count,
            sha256,
            msg_type,
        })
    }
}

/// The `chunk` payload: one piece of a transfer.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Chunk {
    /// The transfer this chunk belongs to.
    pub transfer_id: TransferId,
    /// Position of the chunk, from 0.
    pub index: u32,
    /// The chunk's bytes. No checksum of its own: the `chunk` envelope's
    /// signature covers them (PROTOCOL.md section 9.9).
    pub data: Vec<u8>,
}

impl Chunk {
    /// A chunk carrying `data`.
    pub fn new(transfer_id: TransferId, index: u32, data: Vec<u8>) -> Self {
        Self {
            transfer_id,
            index,
            data,
        }
    }

    /// Length of [`Chunk::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        CHUNK_OVERHEAD + self.data.len()
    }

    /// The canonical wire encoding. `data` must be shorter than 4 GiB (chunks made by
    /// [`split`] are at most `u32::MAX` bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(self.encoded_len());
        w.raw(&self.transfer_id.0)
            .u32(self.index)
            .long_bytes(&self.data);
        w.into_vec()
    }

    /// Decodes a chunk. Only the layout is checked here; [`Reassembler::add`] checks
    /// the chunk against its transfer.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let transfer_id = TransferId(r.array("transfer_id")?);
        let index = r.u32("index")?;
        let data = r.long_bytes("data")?.to_vec();
        r.finish()?;
        Ok(Self {
            transfer_id,
            index,
            data,
        })
    }
}

/// The `chunk_resend` payload: the receiver asks for chunks again.
///
/// Its indexes are strictly increasing and at most [`MAX_RESEND_INDEXES`]; the
/// constructor guarantees it, so every value encodes to decodable bytes.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ResendRequest {
    /// The transfer the chunks belong to.
    pub transfer_id: TransferId,
    indexes: Vec<u32>,
}

impl ResendRequest {
    /// A request for the lowest [`MAX_RESEND_INDEXES`] distinct `indexes` (sorted
    /// and deduplicated here).
    pub fn new(transfer_id: TransferId, indexes: impl IntoIterator<Item = u32>) -> Self {
        let mut indexes: Vec<u32> = indexes.into_iter().collect();
        indexes.sort_unstable();
        indexes.dedup();
        indexes.truncate(MAX_RESEND_INDEXES);
        Self {
            transfer_id,
            indexes,
        }
    }

    /// The requested chunk indexes, strictly increasing.
    pub fn indexes(&self) -> &[u32] {
        &self.indexes
    }

    /// Length of [`ResendRequest::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        16 + 2 + 4 * self.indexes.len()
    }

    /// The canonical wire encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(self.encoded_len());
        // At most MAX_RESEND_INDEXES (1024) by construction.
        let count = u16::try_from(self.indexes.len()).unwrap_or(u16::MAX);
        w.raw(&self.transfer_id.0).raw(&count.to_be_bytes());
        for &i in &self.indexes {
            w.u32(i);
        }
        w.into_vec()
    }

    /// Decodes a resend request: more than [`MAX_RESEND_INDEXES`] indexes, or indexes
    /// not strictly increasing, are invalid.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let transfer_id = TransferId(r.array("transfer_id")?);
        let count = usize::from(u16::from_be_bytes(r.array("count")?));
        if count > MAX_RESEND_INDEXES {
            return Err(DecodeError::Invalid {
                field: "count",
                why: "at most 1024 indexes",
            });
        }
        let mut indexes: Vec<u32> = Vec::with_capacity(count.min(r.remaining() / 4));
        for _ in 0..count {
            let i = r.u32("index")?;
            if indexes.last().is_some_and(|&prev| i <= prev) {
                return Err(DecodeError::Invalid {
                    field: "index",
                    why: "indexes must be strictly increasing",
                });
            }
            indexes.push(i);
        }
        r.finish()?;
        Ok(Self {
            transfer_id,
            indexes,
        })
    }
}

/// Why [`split`] cannot cut a payload. These are caller mistakes, never peer input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SplitError {
    /// A chunk size of 0.
    #[error("chunk size must be at least 1 byte")]
    ZeroChunkSize,
    /// A chunk size that does not fit the u32 `chunk_size` field.
    #[error("chunk size {0} does not fit the u32 chunk_size field")]
    ChunkSizeTooLarge(usize),
    /// More chunks than the u32 `chunk_count` field can count.
    #[error("{0} chunks do not fit the u32 chunk_count field")]
    TooManyChunks(u64),
}

/// Cuts `payload` into chunks of `chunk_size` bytes (usually [`DEFAULT_CHUNK_SIZE`])
/// for transfer `transfer_id` (fresh per transfer, e.g. [`TransferId::from_random`]).
///
/// Returns the manifest to send first and the chunks, in order. Keep the [`Chunks`]
/// (it is cheap to clone) to answer [`ResendRequest`]s with [`Chunks::resend`].
/// The receiver's `max_chunk_size` (default 1 MiB) and envelope size limit bound
/// the chunk size a sender can use.
pub fn split(
    msg_type: MsgType,
    payload: &[u8],
    chunk_size: usize,
    transfer_id: TransferId,
) -> Result<(Manifest, Chunks<'_>), SplitError> {
    let size = u32::try_from(chunk_size).map_err(|_| SplitError::ChunkSizeTooLarge(chunk_size))?;
    let total_len = payload.len() as u64;
    let chunk_count = match Manifest::expected_chunk_count(total_len, size) {
        Some(n) => n,
        None if size == 0 => return Err(SplitError::ZeroChunkSize),
        None => {
            return Err(SplitError::TooManyChunks(
                total_len.div_ceil(u64::from(size)),
            ));
        }
    };
    let manifest = Manifest {
        transfer_id,
        total_len,
        chunk_size: size,
        chunk_count,
        sha256: sha256(payload),
        msg_type,
    };
    let chunks = Chunks {
        payload,
        chunk_size,
        chunk_count,
        transfer_id,
        next: 0,
    };
    Ok((manifest, chunks))
}

/// The chunks of one payload, made by [`split`]: an iterator over them in order, and
/// random access for resends.
#[derive(Debug, Clone)]
pub struct Chunks<'a> {
    payload: &'a [u8],
    chunk_size: usize,
    chunk_count: u32,
    transfer_id: TransferId,
    next: u32,
}

impl Chunks<'_> {
    /// The transfer these chunks belong to.
    pub fn transfer_id(&self) -> TransferId {
        self.transfer_id
    }

    /// Number of chunks in the transfer (not only those the iterator has left).
    pub fn chunk_count(&self) -> u32 {
        self.chunk_count
    }

    /// Chunk `index`, or `None` if the transfer has no such chunk.
    pub fn get(&self, index: u32) -> Option<Chunk> {
        if index >= self.chunk_count {
            return None;
        }
        let start = usize::try_from(index).ok()?.checked_mul(self.chunk_size)?;
        let end = start
            .saturating_add(self.chunk_size)
            .min(self.payload.len());
        let data = self.payload.get(start..end).unwrap_or_default();
        Some(Chunk::new(self.transfer_id, index, data.to_vec()))
    }

    /// The chunks `request` asks for, skipping indexes out of range. Nothing if the
    /// request is for another transfer.
    pub fn resend<'r>(&'r self, request: &'r ResendRequest) -> impl Iterator<Item = Chunk> + 'r {
        let ours = request.transfer_id == self.transfer_id;
        request
            .indexes()
            .iter()
            .filter(move |_| ours)
            .filter_map(|&i| self.get(i))
    }
}

impl Iterator for Chunks<'_> {
    type Item = Chunk;

    fn next(&mut self) -> Option<Chunk> {
        let chunk = self.get(self.next)?;
        self.next += 1;
        Some(chunk)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.chunk_count - self.next).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

impl ExactSizeIterator for Chunks<'_> {}

/// Reassembly limits. The size and count limits are checked on the manifest, before
/// any chunk is buffered; the expiry by [`Reassembler::expire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Largest message a transfer may carry, in bytes (default 64 MiB). Larger:
    /// `MESSAGE_TOO_LARGE`.
    pub max_message_size: u64,
    /// Largest `chunk_size` accepted (default 1 MiB).
    pub max_chunk_size: u32,
    /// Smallest `chunk_size` accepted for a message of more than one chunk
    /// (default 1,024): each chunk costs the receiver an envelope's checks, so
    /// tiny chunks would make one transfer cost millions of them.
    pub min_chunk_size: u32,
    /// Most transfers open at once from one peer (default 4).
    pub max_transfers_per_peer: usize,
    /// Most transfers open at once from all peers together (default 1024).
    pub max_transfers: usize,
    /// Most bytes reserved at once by open transfers from all peers, counting each
    /// transfer's `total_len` from its manifest on (default 1 GiB).
    pub max_buffered_bytes: u64,
    /// A transfer with no new chunk for longer than this is dropped by
    /// [`Reassembler::expire`] (default 30 min).
    pub expiry_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_message_size: 64 * 1024 * 1024,
            max_chunk_size: 1024 * 1024,
            min_chunk_size: 1024,
            max_transfers_per_peer: 4,
            max_transfers: 1024,
            max_buffered_bytes: 1024 * 1024 * 1024,
            expiry_ms: 30 * 60 * 1000,
        }
    }
}

/// How far a transfer has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Distinct chunks received.
    pub received_chunks: u32,
    /// Chunks in the transfer.
    pub chunk_count: u32,
    /// Bytes of the distinct chunks received.
    pub received_bytes: u64,
    /// Length of the whole message.
    pub total_len: u64,
}

/// What [`Reassembler::add`] did with an accepted chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The chunk is stored (or was already); chunks are still missing.
    Partial(Status),
    /// The transfer was completed a short while ago (it is among the last
    /// `max_transfers` completed): a late repeat of one of its chunks, for
    /// instance resent because the answer to it was lost. Changes nothing.
    AlreadyComplete,
    /// That was the last missing chunk and the message's SHA-256 matches the
    /// manifest. The transfer is closed.
    Complete {
        /// The reassembled message's type, from the manifest.
        msg_type: MsgType,
        /// The reassembled message.
        payload: Vec<u8>,
    },
}

struct Transfer {
    manifest: Manifest,
    /// `now_ms` of `begin`, then of the last chunk that added data.
    last_progress_ms: u64,
    /// Resend requests made since the last progress, and when the last was made.
    resend_requests: u32,
    last_request_ms: u64,
    /// The message, `total_len` bytes; allocated on the first chunk.
    data: Vec<u8>,
    /// One bit per chunk received; allocated on the first chunk.
    have: Vec<u64>,
    /// SHA-256 of the chunks received in order from the first, so the
    /// whole message is hashed while it arrives, not all at the end.
    hasher: Sha256,
    /// The first chunk not yet in `hasher`.
    hashed: u32,
    status: Status,
}

impl Transfer {
    fn has(&self, index: u32) -> bool {
        usize::try_from(index / 64)
            .ok()
            .and_then(|w| self.have.get(w))
            .is_some_and(|word| word & (1u64 << (index % 64)) != 0)
    }

    /// Feeds the hasher the chunks that now follow on from what it has.
    fn hash_in_order(&mut self) {
        while self.hashed < self.manifest.chunk_count && self.has(self.hashed) {
            let size = u64::from(self.manifest.chunk_size);
            let len = self.manifest.chunk_len(self.hashed).unwrap_or(0);
            let start = u64::from(self.hashed) * size;
            let range = usize::try_from(start)
                .ok()
                .zip(usize::try_from(start + len).ok())
                .and_then(|(a, b)| self.data.get(a..b));
            if let Some(bytes) = range {
                self.hasher.update(bytes);
            }
            self.hashed += 1;
        }
    }
}

impl fmt::Debug for Transfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transfer")
            .field("manifest", &self.manifest)
            .field("last_progress_ms", &self.last_progress_ms)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Transfer {
    /// The lowest [`MAX_RESEND_INDEXES`] indexes not yet received, in order.
    fn missing(&self) -> Vec<u32> {
        let count = self.manifest.chunk_count;
        if self.have.is_empty() {
            return (0..count).take(MAX_RESEND_INDEXES).collect();
        }
        let mut out = Vec::new();
        for (w, &word) in (0u64..).zip(&self.have) {
            let mut free = !word;
            while free != 0 {
                let i = w * 64 + u64::from(free.trailing_zeros());
                let Some(i) = u32::try_from(i).ok().filter(|&i| i < count) else {
                    return out;
                };
                if out.len() == MAX_RESEND_INDEXES {
                    return out;
                }
                out.push(i);
                free &= free - 1;
            }
        }
        out
    }
}

fn chunk_error(reason: impl Into<String>) -> Rejection {
    Rejection::new(ErrorCode::ChunkError, reason)
}

/// The receiver side of chunked transfer: open transfers per `(peer, transfer id)`.
///
/// `P` identifies the peer whose authenticated envelopes carry the transfer
/// ([`EntityId`] by default; a `(EntityId, SessionId)` pair would scope transfers to
/// a session). Call [`Reassembler::begin`] for each `chunk_manifest`,
/// [`Reassembler::add`] for each `chunk`, [`Reassembler::expire`] at
/// [`Reassembler::next_expiry`] (or periodically), and send
/// [`Reassembler::resend_request`] when a transfer stalls.
///
/// Refusals, all before anything is buffered, each with a reason for humans:
///
/// | call | refusal | code |
/// |---|---|---|
/// | `begin` | transfer id already open from this peer with a different manifest | `CHUNK_ERROR` |
/// | `begin` | msg_type is a chunked-transfer type (no nesting) | `CHUNK_ERROR` |
/// | `begin` | `total_len` > `max_message_size` | `MESSAGE_TOO_LARGE` |
/// | `begin` | `chunk_size` is 0 or > `max_chunk_size`, or < `min_chunk_size` with more than one chunk | `CHUNK_ERROR` |
/// | `begin` | `chunk_count` ≠ `max(1, ceil(total_len / chunk_size))` | `CHUNK_ERROR` |
/// | `begin` | the peer has `max_transfers_per_peer` transfers open | `CHUNK_ERROR` |
/// | `begin` | `max_transfers` open, or `max_buffered_bytes` would be exceeded | `CHUNK_ERROR` |
/// | `add` | no open transfer with this id from this peer (but a chunk of one of the last `max_transfers` transfers completed is [`Progress::AlreadyComplete`]) | `CHUNK_ERROR` |
/// | `add` | index ≥ `chunk_count` | `CHUNK_ERROR` |
/// | `add` | data length ≠ the chunk's length | `CHUNK_ERROR` |
/// | `add` | index already received with different data | `CHUNK_ERROR` |
/// | `add` | last chunk in, message SHA-256 ≠ manifest's: transfer dropped | `CHUNK_ERROR` |
///
/// A refused chunk leaves its transfer as it was (the right chunk can still come),
/// except the last row. A manifest identical to an open one, and a chunk identical
/// to one received, are accepted again and change nothing.
#[derive(Debug)]
pub struct Reassembler<P = EntityId> {
    config: Config,
    transfers: BTreeMap<(P, TransferId), Transfer>,
    reserved_bytes: u64,
    /// The last `max_transfers` transfers completed, oldest first.
    completed: VecDeque<(P, TransferId)>,
}

impl<P: Ord + Clone> Reassembler<P> {
    /// No open transfers.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            transfers: BTreeMap::new(),
            reserved_bytes: 0,
            completed: VecDeque::new(),
        }
    }

    /// The limits in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Number of open transfers, from all peers.
    pub fn len(&self) -> usize {
        self.transfers.len()
    }

    /// Whether no transfer is open.
    pub fn is_empty(&self) -> bool {
        self.transfers.is_empty()
    }

    /// Sum of the open transfers' `total_len`: the most memory their buffers can take.
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved_bytes
    }

    /// Number of transfers open from `peer`.
    pub fn transfers_of(&self, peer: &P) -> usize {
        self.transfers
            .range((peer.clone(), TransferId::MIN)..=(peer.clone(), TransferId::MAX))
            .count()
    }

    /// Opens a transfer announced by `peer`'s `chunk_manifest`. Checks the manifest
    /// against the limits and itself before anything is buffered (see the table on
    /// [`Reassembler`]); nothing is allocated until the first chunk. Returns
    /// whether this call opened it: a manifest identical to an already open
    /// transfer's, or for one of the last `max_transfers` transfers completed (a
    /// late copy), is accepted and changes nothing.
    pub fn begin(&mut self, now_ms: u64, peer: &P, manifest: &Manifest) -> Result<bool, Rejection> {
        let id = manifest.transfer_id;
        if self.completed.contains(&(peer.clone(), id)) {
            return Ok(false);
        }
        if let Some(open) = self.transfers.get(&(peer.clone(), id)) {
            if open.manifest == *manifest {
                return Ok(false);
            }
            return Err(chunk_error(format!(
                "transfer {id} is already open with a different manifest"
            )));
        }
        if is_chunk_msg_type(manifest.msg_type.as_str()) {
            return Err(chunk_error(format!(
                "transfer {id}: a transfer cannot carry a {} message",
                manifest.msg_type
            )));
        }
        let c = &self.config;
        if manifest.total_len > c.max_message_size || usize::try_from(manifest.total_len).is_err() {
            return Err(Rejection::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "transfer {id}: message of {} bytes exceeds this receiver's limit of {} bytes",
                    manifest.total_len, c.max_message_size
                ),
            ));
        }
        if manifest.chunk_size == 0 {
            return Err(chunk_error(format!("transfer {id}: chunk_size is 0")));
        }
        if manifest.chunk_size < c.min_chunk_size
            && manifest.total_len > u64::from(manifest.chunk_size)
        {
            return Err(chunk_error(format!(
                "transfer {id}: chunk_size {} is below this receiver's minimum of {} bytes for a message of more than one chunk",
                manifest.chunk_size, c.min_chunk_size
            )));
        }
        if manifest.chunk_size > c.max_chunk_size {
            return Err(chunk_error(format!(
                "transfer {id}: chunk_size {} exceeds this receiver's limit of {} bytes",
                manifest.chunk_size, c.max_chunk_size
            )));
        }
        if !manifest.is_consistent() {
            let expected = manifest
                .total_len
                .div_ceil(u64::from(manifest.chunk_size))
                .max(1);
            return Err(chunk_error(format!(
                "transfer {id}: chunk_count {} does not match total_len {} in chunks of {} bytes ({expected} chunks)",
                manifest.chunk_count, manifest.total_len, manifest.chunk_size
            )));
        }
        let open = self.transfers_of(peer);
        if open >= c.max_transfers_per_peer {
            return Err(chunk_error(format!(
                "too many concurrent transfers: this peer already has {open} open, the limit is {}; finish or wait for one first",
                c.max_transfers_per_peer
            )));
        }
        if self.transfers.len() >= c.max_transfers {
            return Err(chunk_error(format!(
                "receiver busy: {} transfers open from all peers, the limit is {}; retry later",
                self.transfers.len(),
                c.max_transfers
            )));
        }
        let reserved = self.reserved_bytes.saturating_add(manifest.total_len);
        if reserved > c.max_buffered_bytes {
            return Err(chunk_error(format!(
                "receiver busy: {} bytes already reserved by open transfers, {} more would exceed the budget of {} bytes; retry later",
                self.reserved_bytes, manifest.total_len, c.max_buffered_bytes
            )));
        }
        self.reserved_bytes = reserved;
        let status = Status {
            received_chunks: 0,
            chunk_count: manifest.chunk_count,
            received_bytes: 0,
            total_len: manifest.total_len,
        };
        self.transfers.insert(
            (peer.clone(), id),
            Transfer {
                manifest: manifest.clone(),
                last_progress_ms: now_ms,
                resend_requests: 0,
                last_request_ms: 0,
                data: Vec::new(),
                have: Vec::new(),
                hasher: Sha256::new(),
                hashed: 0,
                status,
            },
        );
        Ok(true)
    }

    /// Stores a `chunk` from `peer` in its transfer (see the table on [`Reassembler`]
    /// for refusals). When it was the last one missing, the transfer closes and the
    /// message is returned if its SHA-256 matches the manifest; if not, the transfer
    /// is dropped and the error is `CHUNK_ERROR`.
    pub fn add(&mut self, now_ms: u64, peer: &P, chunk: &Chunk) -> Result<Progress, Rejection> {
        let id = chunk.transfer_id;
        let key = (peer.clone(), id);
        let Some(t) = self.transfers.get_mut(&key) else {
            if self.completed.contains(&key) {
                return Ok(Progress::AlreadyComplete);
            }
            return Err(chunk_error(format!(
                "no open transfer {id} from this peer (never begun, already complete, aborted or expired)"
            )));
        };
        let index = chunk.index;
        let Some(len) = t.manifest.chunk_len(index) else {
            return Err(chunk_error(format!(
                "transfer {id}: chunk index {index} is out of range ({} chunks)",
                t.manifest.chunk_count
            )));
        };
        if chunk.data.len() as u64 != len {
            return Err(chunk_error(format!(
                "transfer {id}: chunk {index} carries {} bytes, expected {len}",
                chunk.data.len()
            )));
        }
        if t.have.is_empty() {
            // First chunk: total_len fits usize (checked by `begin`).
            let total = usize::try_from(t.manifest.total_len).unwrap_or(0);
            let words = usize::try_from(t.manifest.chunk_count.div_ceil(64)).unwrap_or(0);
            t.data = vec![0; total];
            t.have = vec![0; words];
        }
        let start = u64::from(index) * u64::from(t.manifest.chunk_size);
        let slot = usize::try_from(start)
            .ok()
            .and_then(|s| Some(s..s.checked_add(chunk.data.len())?))
            .and_then(|range| t.data.get_mut(range));
        let word = t
            .have
            .get_mut(usize::try_from(index / 64).unwrap_or(usize::MAX));
        let (Some(slot), Some(word)) = (slot, word) else {
            return Err(chunk_error(format!(
                "transfer {id}: chunk {index} does not fit the message"
            )));
        };
        let bit = 1u64 << (index % 64);
        if *word & bit != 0 {
            if *slot == chunk.data[..] {
                return Ok(Progress::Partial(t.status));
            }
            return Err(chunk_error(format!(
                "transfer {id}: chunk {index} was already received with different data"
            )));
        }
        slot.copy_from_slice(&chunk.data);
        *word |= bit;
        t.status.received_chunks += 1;
        t.status.received_bytes += len;
        t.last_progress_ms = now_ms;
        t.resend_requests = 0;
        t.hash_in_order();
        if t.status.received_chunks < t.status.chunk_count {
            return Ok(Progress::Partial(t.status));
        }
        let Some(t) = self.transfers.remove(&key) else {
            return Err(chunk_error(format!("transfer {id} vanished")));
        };
        self.reserved_bytes = self.reserved_bytes.saturating_sub(t.manifest.total_len);
        // Every chunk is in, so the hasher has had them all, in order.
        let whole: [u8; 32] = t.hasher.finalize().into();
        if whole != t.manifest.sha256 {
            return Err(chunk_error(format!(
                "transfer {id}: the reassembled message does not match the manifest's sha256; transfer dropped"
            )));
        }
        if self.completed.len() >= self.config.max_transfers.max(1) {
            self.completed.pop_front();
        }
        self.completed.push_back(key);
        Ok(Progress::Complete {
            msg_type: t.manifest.msg_type,
            payload: t.data,
        })
    }

    /// How far transfer `id` from `peer` has come; `None` if it is not open.
    pub fn status(&self, peer: &P, id: TransferId) -> Option<Status> {
        self.transfers.get(&(peer.clone(), id)).map(|t| t.status)
    }

    /// The lowest [`MAX_RESEND_INDEXES`] chunk indexes not yet received, in
    /// increasing order; empty if the transfer is not open.
    pub fn missing(&self, peer: &P, id: TransferId) -> Vec<u32> {
        self.transfers
            .get(&(peer.clone(), id))
            .map(Transfer::missing)
            .unwrap_or_default()
    }

    /// A `chunk_resend` payload for the chunks [`Reassembler::missing`] lists;
    /// `None` if the transfer is not open.
    pub fn resend_request(&self, peer: &P, id: TransferId) -> Option<ResendRequest> {
        self.transfers
            .contains_key(&(peer.clone(), id))
            .then(|| ResendRequest {
                transfer_id: id,
                indexes: self.missing(peer, id),
            })
    }

    /// Resend requests for the open transfers that are stalled: no progress for
    /// more than `idle_ms`, nor a request for more than `idle_ms` since the last
    /// one, and fewer than `max_requests` requests made since their last progress.
    /// Each is counted as made at `now_ms`; the caller sends them to their peers.
    pub fn resend_due(
        &mut self,
        now_ms: u64,
        idle_ms: u64,
        max_requests: u32,
    ) -> Vec<(P, ResendRequest)> {
        let mut due = Vec::new();
        for ((peer, id), t) in &mut self.transfers {
            let quiet_since = t.last_progress_ms.max(t.last_request_ms);
            if now_ms.saturating_sub(quiet_since) <= idle_ms || t.resend_requests >= max_requests {
                continue;
            }
            t.resend_requests += 1;
            t.last_request_ms = now_ms;
            due.push((
                peer.clone(),
                ResendRequest {
                    transfer_id: *id,
                    indexes: t.missing(),
                },
            ));
        }
        due
    }

    /// Drops the open transfers that got `max_requests` resend requests (see
    /// [`Reassembler::resend_due`]) with no progress since, the last more than
    /// `idle_ms` ago: their sender has given up. Returns them in `(peer, id)`
    /// order.
    pub fn drop_stalled(
        &mut self,
        now_ms: u64,
        idle_ms: u64,
        max_requests: u32,
    ) -> Vec<(P, TransferId)> {
        let mut dropped = Vec::new();
        let mut freed = 0u64;
        self.transfers.retain(|(peer, id), t| {
            let stalled = t.resend_requests >= max_requests
                && now_ms.saturating_sub(t.last_request_ms) > idle_ms;
            if stalled {
                dropped.push((peer.clone(), *id));
                freed = freed.saturating_add(t.manifest.total_len);
            }
            !stalled
        });
        self.reserved_bytes = self.reserved_bytes.saturating_sub(freed);
        dropped
    }

    /// Drops transfer `id` from `peer` and its buffer, or forgets that it was
    /// completed (for a message refused after reassembly, so that a repeat of its
    /// chunks is not taken as delivered). Returns whether it was open.
    pub fn abort(&mut self, peer: &P, id: TransferId) -> bool {
        let key = (peer.clone(), id);
        self.completed.retain(|k| *k != key);
        match self.transfers.remove(&key) {
            Some(t) => {
                self.reserved_bytes = self.reserved_bytes.saturating_sub(t.manifest.total_len);
                true
            }
            None => false,
        }
    }

    /// Drops every transfer that has had no new chunk (nor, before its first chunk,
    /// its manifest) for more than `expiry_ms`, and returns them in `(peer, id)`
    /// order. Only this call expires transfers: call it at
    /// [`Reassembler::next_expiry`], or periodically.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(P, TransferId)> {
        let expiry_ms = self.config.expiry_ms;
        let mut dropped = Vec::new();
        let mut freed = 0u64;
        self.transfers.retain(|(peer, id), t| {
            let keep = now_ms.saturating_sub(t.last_progress_ms) <= expiry_ms;
            if !keep {
                dropped.push((peer.clone(), *id));
                freed = freed.saturating_add(t.manifest.total_len);
            }
            keep
        });
        self.reserved_bytes = self.reserved_bytes.saturating_sub(freed);
        dropped
    }

    /// The earliest `now_ms` at which [`Reassembler::expire`] would drop a transfer;
    /// `None` if none is open.
    pub fn next_expiry(&self) -> Option<u64> {
        self.transfers
            .values()
            .map(|t| {
                t.last_progress_ms
                    .saturating_add(self.config.expiry_ms)
                    .saturating_add(1)
            })
            .min()
    }

    /// The earliest `now_ms` at which [`Reassembler::expire`],
    /// [`Reassembler::resend_due`] or [`Reassembler::drop_stalled`] (called with
    /// `idle_ms` and `max_requests`) would act; `None` if no transfer is open.
    pub fn poll_timeout(&self, idle_ms: u64, max_requests: u32) -> Option<u64> {
        self.transfers
            .values()
            .map(|t| {
                let expiry = t.last_progress_ms.saturating_add(self.config.expiry_ms);
                let quiet = if t.resend_requests < max_requests {
                    t.last_progress_ms.max(t.last_request_ms)
                } else {
                    t.last_request_ms
                };
                expiry.min(quiet.saturating_add(idle_ms)).saturating_add(1)
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: u64 = 1_800_000_000_000;

    /// xorshift64*: a tiny deterministic generator for payloads and orders.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Self(seed | 1)
        }
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }
        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                v.swap(i, self.below(i + 1));
            }
        }
    }

    fn payload(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = Rng::new(seed);
        (0..len).map(|_| rng.next_u64() as u8).collect()
    }

    fn mt(s: &str) -> MsgType {
        s.parse().expect("valid msg_type")
    }

    fn peer(b: u8) -> EntityId {
        EntityId([b; 32])
    }

    fn tid(b: u8) -> TransferId {
        TransferId::from_random([b; 16])
    }

    /// The default limits, but chunks of any size (the tests use tiny ones).
    fn config() -> Config {
        Config {
            min_chunk_size: 1,
            ..Config::default()
        }
    }

    fn reassembler() -> Reassembler {
        Reassembler::new(config())
    }

    fn manifest(total_len: u64, chunk_size: u32, b: u8) -> Manifest {
        Manifest {
            transfer_id: tid(b),
            total_len,
            chunk_size,
            chunk_count: Manifest::expected_chunk_count(total_len, chunk_size).expect("count"),
            sha256: [0; 32],
            msg_type: mt("message"),
        }
    }

    fn assert_refused<T: fmt::Debug>(r: Result<T, Rejection>, code: ErrorCode, needle: &str) {
        let e = r.expect_err("refused");
        assert_eq!(e.code, code, "{e}");
        assert!(
            e.reason.contains(needle),
            "reason {:?} lacks {needle:?}",
            e.reason
        );
    }

    /// A transfer of `data` in `size`-byte chunks, begun at T0 from peer 1.
    fn begun(r: &mut Reassembler, data: &[u8], size: usize, b: u8) -> (Manifest, Vec<Chunk>) {
        let (m, chunks) = split(mt("message"), data, size, tid(b)).expect("split");
        r.begin(T0, &peer(1), &m).expect("begin");
        (m, chunks.collect())
    }

    #[test]
    fn transfer_ids_are_uuid_v4_shown_hyphenated() {
        let s = TransferId::from_random([0xff; 16]).to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(format!("{:?}", TransferId([0; 16])).starts_with("TransferId(00000000-"));
    }

    #[test]
    fn split_cuts_into_equal_chunks_and_a_shorter_last() {
        let data = payload(10, 1);
        let (m, chunks) = split(mt("message"), &data, 4, tid(1)).expect("split");
        assert_eq!((m.total_len, m.chunk_size, m.chunk_count), (10, 4, 3));
        assert_eq!(m.sha256, sha256(&data));
        assert_eq!(chunks.len(), 3);
        let chunks: Vec<Chunk> = chunks.collect();
        let lens: Vec<usize> = chunks.iter().map(|c| c.data.len()).collect();
        assert_eq!(lens, [4, 4, 2]);
        assert_eq!(chunks.concat_data(), data);
        assert_eq!(
            (0..3).map(|i| m.chunk_len(i)).collect::<Vec<_>>(),
            [Some(4), Some(4), Some(2)]
        );
        assert_eq!(m.chunk_len(3), None);
    }

    trait ConcatData {
        fn concat_data(&self) -> Vec<u8>;
    }
    impl ConcatData for Vec<Chunk> {
        fn concat_data(&self) -> Vec<u8> {
            self.iter().flat_map(|c| c.data.iter().copied()).collect()
        }
    }

    #[test]
    fn an_empty_message_is_one_empty_chunk() {
        let (m, chunks) = split(mt("message"), &[], DEFAULT_CHUNK_SIZE, tid(1)).expect("split");
        assert_eq!((m.total_len, m.chunk_count), (0, 1));
        let chunks: Vec<Chunk> = chunks.collect();
        assert_eq!(chunks.len(), 1);
        assert!(chunks[0].data.is_empty());
        let mut r = reassembler();
        r.begin(T0, &peer(1), &m).expect("begin");
        assert_eq!(r.missing(&peer(1), m.transfer_id), [0]);
        assert_eq!(
            r.add(T0, &peer(1), &chunks[0]),
            Ok(Progress::Complete {
                msg_type: mt("message"),
                payload: vec![]
            })
        );
        assert!(r.is_empty());
    }

    #[test]
    fn split_refuses_impossible_sizes() {
        assert_eq!(
            split(mt("m"), b"x", 0, tid(1)).map(|_| ()),
            Err(SplitError::ZeroChunkSize)
        );
        if let Ok(big) = usize::try_from(u64::from(u32::MAX) + 1) {
            assert_eq!(
                split(mt("m"), b"x", big, tid(1)).map(|_| ()),
                Err(SplitError::ChunkSizeTooLarge(big))
            );
        }
        assert_eq!(Manifest::expected_chunk_count(u64::MAX, 1), None);
        assert_eq!(Manifest::expected_chunk_count(5, 0), None);
    }

    // ---- begin: every refusal ----

    #[test]
    fn begin_refuses_a_message_over_the_size_limit() {
        let mut r = reassembler();
        let limit = Config::default().max_message_size;
        let m = manifest(limit + 1, 1024 * 1024, 1);
        assert_refused(
            r.begin(T0, &peer(1), &m),
            ErrorCode::MessageTooLarge,
            "limit",
        );
        assert!(r.is_empty());
        r.begin(T0, &peer(1), &manifest(limit, 1024 * 1024, 1))
            .expect("exactly the limit is fine");
        assert_eq!(r.reserved_bytes(), limit);
    }

    #[test]
    fn begin_refuses_a_zero_or_oversized_chunk_size() {
        let mut r = reassembler();
        let mut m = manifest(10, 4, 1);
        m.chunk_size = 0;
        assert_refused(
            r.begin(T0, &peer(1), &m),
            ErrorCode::ChunkError,
            "chunk_size is 0",
        );
        let max = Config::default().max_chunk_size;
        let m = manifest(10, max + 1, 1);
        assert_refused(r.begin(T0, &peer(1), &m), ErrorCode::ChunkError, "exceeds");
        r.begin(T0, &peer(1), &manifest(10, max, 1))
            .expect("max ok");
    }

    #[test]
    fn begin_refuses_a_chunk_count_that_does_not_match() {
        let mut r = reassembler();
        for (total, size, count) in [(10, 4, 2), (10, 4, 4), (8, 4, 3), (0, 4, 0), (0, 4, 2)] {
            let mut m = manifest(total, size, 1);
            m.chunk_count = count;
            assert_refused(
                r.begin(T0, &peer(1), &m),
                ErrorCode::ChunkError,
                "chunk_count",
            );
        }
        assert!(r.is_empty());
    }

    #[test]
    fn begin_refuses_a_nested_transfer() {
        let mut r = reassembler();
        for t in [MSG_MANIFEST, MSG_CHUNK, MSG_RESEND] {
            let mut m = manifest(10, 4, 1);
            m.msg_type = mt(t);
            assert_refused(
                r.begin(T0, &peer(1), &m),
                ErrorCode::ChunkError,
                "cannot carry",
            );
        }
    }

    #[test]
    fn begin_is_idempotent_for_the_same_manifest_and_refuses_a_different_one() {
        let mut r = reassembler();
        let m = manifest(10, 4, 1);
        r.begin(T0, &peer(1), &m).expect("first");
        r.begin(T0 + 5, &peer(1), &m).expect("same again");
        assert_eq!(r.len(), 1);
        assert_eq!(r.reserved_bytes(), 10);
        let mut other = m.clone();
        other.sha256 = [1; 32];
        assert_refused(
            r.begin(T0, &peer(1), &other),
            ErrorCode::ChunkError,
            "different manifest",
        );
        // Transfer ids are per peer: another peer may use the same id.
        r.begin(T0, &peer(2), &other).expect("other peer");
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn begin_refuses_more_than_the_per_peer_limit() {
        let mut r = reassembler();
        for b in 0..4 {
            r.begin(T0, &peer(1), &manifest(10, 4, b))
                .expect("within limit");
        }
        assert_refused(
            r.begin(T0, &peer(1), &manifest(10, 4, 9)),
            ErrorCode::ChunkError,
            "too many concurrent transfers",
        );
        assert_eq!(r.transfers_of(&peer(1)), 4);
        r.begin(T0, &peer(2), &manifest(10, 4, 9))
            .expect("other peer");
        assert!(r.abort(&peer(1), tid(0)));
        assert!(!r.abort(&peer(1), tid(0)));
        r.begin(T0, &peer(1), &manifest(10, 4, 9))
            .expect("room again");
    }

    #[test]
    fn begin_refuses_beyond_the_global_limits() {
        let mut r = Reassembler::new(Config {
            max_transfers: 2,
            ..config()
        });
        r.begin(T0, &peer(1), &manifest(10, 4, 1)).expect("1");
        r.begin(T0, &peer(2), &manifest(10, 4, 1)).expect("2");
        assert_refused(
            r.begin(T0, &peer(3), &manifest(10, 4, 1)),
            ErrorCode::ChunkError,
            "receiver busy",
        );

        let mut r = Reassembler::new(Config {
            max_buffered_bytes: 100,
            ..config()
        });
        r.begin(T0, &peer(1), &manifest(60, 4, 1)).expect("60");
        assert_refused(
            r.begin(T0, &peer(2), &manifest(41, 4, 1)),
            ErrorCode::ChunkError,
            "budget",
        );
        r.begin(T0, &peer(2), &manifest(40, 4, 1))
            .expect("exactly fills");
        assert_eq!(r.reserved_bytes(), 100);
        r.abort(&peer(1), tid(1));
        assert_eq!(r.reserved_bytes(), 40);
    }

    // ---- add: every refusal ----

    #[test]
    fn add_refuses_a_chunk_of_an_unknown_transfer() {
        let mut r = reassembler();
        let data = payload(10, 1);
        let (_, chunks) = begun(&mut r, &data, 4, 1);
        assert_refused(
            r.add(T0, &peer(2), &chunks[0]),
            ErrorCode::ChunkError,
            "no open transfer",
        );
        let mut c = chunks[0].clone();
        c.transfer_id = tid(2);
        assert_refused(
            r.add(T0, &peer(1), &c),
            ErrorCode::ChunkError,
            "no open transfer",
        );
    }

    #[test]
    fn add_refuses_an_index_out_of_range() {
        let mut r = reassembler();
        let data = payload(10, 1);
        let (_, chunks) = begun(&mut r, &data, 4, 1);
        let c = Chunk::new(tid(1), 3, chunks[2].data.clone());
        assert_refused(
            r.add(T0, &peer(1), &c),
            ErrorCode::ChunkError,
            "out of range",
        );
        let c = Chunk::new(tid(1), u32::MAX, vec![]);
        assert_refused(
            r.add(T0, &peer(1), &c),
            ErrorCode::ChunkError,
            "out of range",
        );
    }

    #[test]
    fn add_refuses_a_wrong_length() {
        let mut r = reassembler();
        let data = payload(10, 1);
        let (_, chunks) = begun(&mut r, &data, 4, 1);
        // A middle chunk must be chunk_size long.
        let c = Chunk::new(tid(1), 1, data[4..7].to_vec());
        assert_refused(
            r.add(T0, &peer(1), &c),
            ErrorCode::ChunkError,
            "carries 3 bytes, expected 4",
        );
        // The last chunk must be exactly the rest.
        let c = Chunk::new(tid(1), 2, data[6..10].to_vec());
        assert_refused(r.add(T0, &peer(1), &c), ErrorCode::ChunkError, "expected 2");
        let c = Chunk::new(tid(1), 2, data[9..10].to_vec());
        assert_refused(r.add(T0, &peer(1), &c), ErrorCode::ChunkError, "expected 2");
        assert_eq!(r.status(&peer(1), tid(1)).expect("open").received_chunks, 0);
        r.add(T0, &peer(1), &chunks[2]).expect("the right one");
    }

    #[test]
    fn a_duplicate_chunk_is_idempotent_and_a_conflicting_one_refused() {
        let mut r = reassembler();
        let data = payload(10, 1);
        let (_, chunks) = begun(&mut r, &data, 4, 1);
        let first = r.add(T0, &peer(1), &chunks[1]).expect("first");
        let again = r.add(T0, &peer(1), &chunks[1]).expect("duplicate");
        assert_eq!(first, again);
        let Progress::Partial(s) = again else {
            panic!("partial")
        };
        assert_eq!((s.received_chunks, s.received_bytes), (1, 4));
        let conflicting = Chunk::new(tid(1), 1, vec![0xee; 4]);
        assert_refused(
            r.add(T0, &peer(1), &conflicting),
            ErrorCode::ChunkError,
            "already received with different data",
        );
        r.add(T0, &peer(1), &chunks[0]).expect("0");
        let done = r.add(T0, &peer(1), &chunks[2]).expect("2");
        assert_eq!(
            done,
            Progress::Complete {
                msg_type: mt("message"),
                payload: data
            }
        );
    }

    #[test]
    fn a_message_whose_hash_does_not_match_is_refused_and_dropped() {
        let mut r = reassembler();
        let data = payload(10, 1);
        let (mut m, chunks) = split(mt("message"), &data, 4, tid(1)).expect("split");
        m.sha256[0] ^= 1;
        r.begin(T0, &peer(1), &m).expect("begin");
        r.add(T0, &peer(1), &chunks.get(0).expect("0")).expect("0");
        r.add(T0, &peer(1), &chunks.get(1).expect("1")).expect("1");
        assert_refused(
            r.add(T0, &peer(1), &chunks.get(2).expect("2")),
            ErrorCode::ChunkError,
            "does not match the manifest's sha256",
        );
        assert!(r.is_empty());
        assert_eq!(r.reserved_bytes(), 0);
        assert_refused(
            r.add(T0, &peer(1), &chunks.get(2).expect("2")),
            ErrorCode::ChunkError,
            "no open transfer",
        );
    }

    // ---- expiry, missing, resend ----

    #[test]
    fn transfers_idle_for_more_than_the_expiry_are_dropped() {
        let mut r = reassembler();
        let expiry = Config::default().expiry_ms;
        assert_eq!(expiry, 1_800_000);
        let data = payload(10, 1);
        let (_, chunks) = begun(&mut r, &data, 4, 1);
        r.begin(T0 + 1000, &peer(2), &manifest(10, 4, 2))
            .expect("other");
        assert_eq!(r.next_expiry(), Some(T0 + expiry + 1));
        // A new chunk is progress and restarts the clock; a duplicate is not.
        r.add(T0 + 2000, &peer(1), &chunks[0]).expect("0");
        r.add(T0 + 3000, &peer(1), &chunks[0]).expect("dup");
        assert_eq!(r.next_expiry(), Some(T0 + 1000 + expiry + 1));
        assert!(
            r.expire(T0 + 1000 + expiry).is_empty(),
            "exactly the expiry is kept"
        );
        assert_eq!(r.expire(T0 + 1001 + expiry), [(peer(2), tid(2))]);
        assert!(r.expire(T0 + 2000 + expiry).is_empty());
        assert_eq!(r.expire(T0 + 2001 + expiry), [(peer(1), tid(1))]);
        assert!(r.is_empty());
        assert_eq!(r.reserved_bytes(), 0);
        assert_eq!(r.next_expiry(), None);
        assert_refused(
            r.add(T0, &peer(1), &chunks[1]),
            ErrorCode::ChunkError,
            "expired",
        );
    }

    #[test]
    fn stalled_transfers_are_due_a_resend_request_a_bounded_number_of_times() {
        let mut r = reassembler();
        let data = payload(10, 1);
        let (_, chunks) = begun(&mut r, &data, 4, 1);
        r.add(T0 + 100, &peer(1), &chunks[1]).expect("1");
        assert_eq!(r.poll_timeout(500, 2), Some(T0 + 601));
        assert!(
            r.resend_due(T0 + 600, 500, 2).is_empty(),
            "not idle long enough"
        );
        let due = r.resend_due(T0 + 601, 500, 2);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, peer(1));
        assert_eq!(due[0].1.indexes(), [0, 2]);
        assert!(
            r.resend_due(T0 + 1101, 500, 2).is_empty(),
            "one per idle period"
        );
        assert_eq!(r.resend_due(T0 + 1102, 500, 2).len(), 1);
        assert!(
            r.resend_due(T0 + 9000, 500, 2).is_empty(),
            "at most 2 in a row"
        );
        // Progress allows further requests.
        r.add(T0 + 9000, &peer(1), &chunks[0]).expect("0");
        let due = r.resend_due(T0 + 9501, 500, 2);
        assert_eq!(due[0].1.indexes(), [2]);
        // Unanswered to the last request: the transfer is dropped.
        r.resend_due(T0 + 10_002, 500, 2);
        assert_eq!(r.poll_timeout(500, 2), Some(T0 + 10_503));
        assert!(r.drop_stalled(T0 + 10_502, 500, 2).is_empty(), "not yet");
        assert_eq!(r.drop_stalled(T0 + 10_503, 500, 2), [(peer(1), tid(1))]);
        assert!(r.is_empty());
        assert_eq!(r.reserved_bytes(), 0);
        assert_eq!(r.poll_timeout(500, 2), None);
    }

    #[test]
    fn late_repeats_of_recently_completed_transfers_are_accepted_and_change_nothing() {
        let mut r = Reassembler::new(Config {
            max_transfers: 1,
            ..config()
        });
        let data = payload(10, 1);
        let (_, chunks) = begun(&mut r, &data, 4, 1);
        for c in &chunks {
            r.add(T0, &peer(1), c).expect("add");
        }
        assert_eq!(
            r.add(T0, &peer(1), &chunks[0]),
            Ok(Progress::AlreadyComplete)
        );
        // A late copy of its manifest does not open it again.
        let (m, _) = split(mt("message"), &data, 4, tid(1)).expect("split");
        assert_eq!(r.begin(T0, &peer(1), &m), Ok(false));
        assert!(r.is_empty());
        assert_refused(
            r.add(T0, &peer(2), &chunks[0]),
            ErrorCode::ChunkError,
            "no open transfer",
        );
        // Whatever its bytes (its envelope's signature vouches for them between
        // nodes): a late chunk changes nothing and delivers nothing.
        let mut other = chunks[0].clone();
        other.data[0] ^= 1;
        assert_eq!(r.add(T0, &peer(1), &other), Ok(Progress::AlreadyComplete));
        // Aborted after completion: no longer taken as delivered.
        assert!(!r.abort(&peer(1), tid(1)));
        assert_refused(
            r.add(T0, &peer(1), &chunks[0]),
            ErrorCode::ChunkError,
            "no open transfer",
        );
        // Only the last `max_transfers` completed are remembered.
        let mut complete = |b: u8| {
            let (_, chunks) = begun(&mut r, &data, 4, b);
            for c in &chunks {
                r.add(T0, &peer(1), c).expect("add");
            }
            chunks
        };
        let second = complete(2);
        let third = complete(3);
        assert_eq!(
            r.add(T0, &peer(1), &third[0]),
            Ok(Progress::AlreadyComplete)
        );
        assert_refused(
            r.add(T0, &peer(1), &second[0]),
            ErrorCode::ChunkError,
            "no open transfer",
        );
    }

    #[test]
    fn begin_refuses_tiny_chunks_unless_the_message_is_one_chunk() {
        let mut r = Reassembler::new(Config::default());
        assert_refused(
            r.begin(T0, &peer(1), &manifest(10, 4, 1)),
            ErrorCode::ChunkError,
            "below this receiver's minimum",
        );
        assert_eq!(r.begin(T0, &peer(1), &manifest(4, 4, 2)), Ok(true));
        assert_eq!(r.begin(T0, &peer(1), &manifest(4096, 1024, 3)), Ok(true));
    }

    #[test]
    fn chunk_ranges_cover_the_message() {
        let m = manifest(10, 4, 1);
        assert_eq!(m.chunk_range(0), Some(0..4));
        assert_eq!(m.chunk_range(2), Some(8..10));
        assert_eq!(m.chunk_range(3), None);
    }

    #[test]
    fn missing_lists_at_most_1024_and_resends_complete_the_transfer() {
        let mut r = reassembler();
        let data = payload(3000, 7);
        let (m, chunks) = split(mt("message"), &data, 1, tid(1)).expect("split");
        r.begin(T0, &peer(1), &m).expect("begin");
        let expect: Vec<u32> = (0..1024).collect();
        assert_eq!(r.missing(&peer(1), tid(1)), expect);
        r.add(T0, &peer(1), &chunks.get(5).expect("5")).expect("5");
        let missing = r.missing(&peer(1), tid(1));
        assert_eq!(missing.len(), 1024);
        assert_eq!(missing[..6], [0, 1, 2, 3, 4, 6]);
        assert_eq!(missing[1023], 1024);
        let mut rounds = 0;
        let done = loop {
            rounds += 1;
            let req = r.resend_request(&peer(1), tid(1)).expect("open");
            let req = ResendRequest::decode(&req.encode()).expect("decodes");
            let mut last = None;
            for c in chunks.resend(&req) {
                last = Some(r.add(T0, &peer(1), &c).expect("chunk"));
            }
            if let Some(Progress::Complete { payload, .. }) = last {
                break payload;
            }
        };
        assert_eq!(rounds, 3);
        assert_eq!(done, data);
        assert_eq!(r.missing(&peer(1), tid(1)), Vec::<u32>::new());
        assert_eq!(r.resend_request(&peer(1), tid(1)), None);
    }

    #[test]
    fn resend_ignores_other_transfers_and_unknown_indexes() {
        let data = payload(10, 1);
        let (_, chunks) = split(mt("message"), &data, 4, tid(1)).expect("split");
        let req = ResendRequest::new(tid(1), [7, 2, 2, 0]);
        assert_eq!(req.indexes(), [0, 2, 7]);
        let got: Vec<u32> = chunks.resend(&req).map(|c| c.index).collect();
        assert_eq!(got, [0, 2]);
        assert_eq!(chunks.resend(&ResendRequest::new(tid(2), [0])).count(), 0);
        assert_eq!(ResendRequest::new(tid(1), 0..5000).indexes().len(), 1024);
    }

    // ---- encodings ----

    #[test]
    fn manifest_layout_is_as_documented() {
        let m = Manifest {
            transfer_id: TransferId([0x11; 16]),
            total_len: 0x0102,
            chunk_size: 0x0304,
            chunk_count: 1,
            sha256: [0x22; 32],
            msg_type: mt("message"),
        };
        let mut expect = vec![0x11; 16];
        expect.extend([0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 3, 4, 0, 0, 0, 1]);
        expect.extend([0x22; 32]);
        expect.push(7);
        expect.extend(b"message");
        assert_eq!(m.encode(), expect);
        assert_eq!(m.encoded_len(), expect.len());
    }

    #[test]
    fn chunk_and_resend_layouts_are_as_documented() {
        let c = Chunk::new(TransferId([0x11; 16]), 2, b"ab".to_vec());
        let mut expect = vec![0x11; 16];
        expect.extend([0, 0, 0, 2]);
        expect.extend([0, 0, 0, 2, b'a', b'b']);
        assert_eq!(c.encode(), expect);
        let req = ResendRequest::new(TransferId([0x11; 16]), [1, 0x0203]);
        let mut expect = vec![0x11; 16];
        expect.extend([0, 2, 0, 0, 0, 1, 0, 0, 2, 3]);
        assert_eq!(req.encode(), expect);
    }

    /// The worked example of the protocol document's chunked-transfer section.
    #[test]
    fn the_documented_example_encodes_as_specified() {
        let (m, chunks) = split(mt("message"), b"hello", 2, TransferId([0x11; 16])).expect("split");
        assert_eq!(
            hex::encode(m.encode()),
            concat!(
                "11111111111111111111111111111111",
                "0000000000000005",
                "00000002",
                "00000003",
                "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
                "07",
                "6d657373616765",
            )
        );
        assert_eq!(
            hex::encode(chunks.get(2).expect("last").encode()),
            concat!(
                "11111111111111111111111111111111",
                "00000002",
                "00000001",
                "6f",
            )
        );
        let req = ResendRequest::new(TransferId([0x11; 16]), [2, 0]);
        assert_eq!(
            hex::encode(req.encode()),
            concat!(
                "11111111111111111111111111111111",
                "0002",
                "00000000",
                "00000002",
            )
        );
    }

    #[test]
    fn decoders_reject_invalid_values() {
        let m = manifest(10, 4, 1);
        let mut bytes = m.encode();
        let at = MANIFEST_FIXED_LEN - 1;
        bytes[at + 1] = b'M';
        assert!(matches!(
            Manifest::decode(&bytes),
            Err(DecodeError::Invalid {
                field: "msg_type",
                ..
            })
        ));
        bytes[at] = 0;
        bytes.truncate(at + 1);
        assert!(Manifest::decode(&bytes).is_err(), "empty msg_type");

        let mut bytes = vec![0; 16];
        bytes.extend(1025u16.to_be_bytes());
        bytes.extend(std::iter::repeat_n(0, 4 * 1025));
        assert!(matches!(
            ResendRequest::decode(&bytes),
            Err(DecodeError::Invalid { field: "count", .. })
        ));
        for pair in [[1u32, 1], [2, 1]] {
            let mut bytes = vec![0; 16];
            bytes.extend(2u16.to_be_bytes());
            bytes.extend(pair[0].to_be_bytes());
            bytes.extend(pair[1].to_be_bytes());
            assert!(matches!(
                ResendRequest::decode(&bytes),
                Err(DecodeError::Invalid { field: "index", .. })
            ));
        }
        let mut bytes = vec![0; 16];
        bytes.extend(1u16.to_be_bytes());
        assert_eq!(
            ResendRequest::decode(&bytes),
            Err(DecodeError::Truncated("index"))
        );
    }

    prop_compose! {
        fn arb_manifest()(
            id in any::<[u8; 16]>(),
            total_len in any::<u64>(),
            chunk_size in any::<u32>(),
            chunk_count in any::<u32>(),
            sha in any::<[u8; 32]>(),
            msg_type in "[a-z0-9_.]{1,64}",
        ) -> Manifest {
            Manifest {
                transfer_id: TransferId(id),
                total_len,
                chunk_size,
                chunk_count,
                sha256: sha,
                msg_type: mt(&msg_type),
            }
        }
    }

    prop_compose! {
        fn arb_chunk()(
            id in any::<[u8; 16]>(),
            index in any::<u32>(),
            data in proptest::collection::vec(any::<u8>(), 0..300),
        ) -> Chunk {
            Chunk { transfer_id: TransferId(id), index, data }
        }
    }

    prop_compose! {
        fn arb_resend()(
            id in any::<[u8; 16]>(),
            indexes in proptest::collection::vec(any::<u32>(), 0..1500),
        ) -> ResendRequest {
            ResendRequest::new(TransferId(id), indexes)
        }
    }

    /// Whether `decode` round-trips `bytes` exactly when it accepts them.
    fn canonical<T: PartialEq + fmt::Debug>(
        bytes: &[u8],
        decode: fn(&[u8]) -> Result<T, DecodeError>,
        encode: fn(&T) -> Vec<u8>,
    ) -> Result<(), TestCaseError> {
        if let Ok(v) = decode(bytes) {
            prop_assert_eq!(encode(&v), bytes);
        }
        Ok(())
    }

    fn check_round_trip<T: PartialEq + fmt::Debug>(
        v: &T,
        decode: fn(&[u8]) -> Result<T, DecodeError>,
        encode: fn(&T) -> Vec<u8>,
        cut: usize,
        extra: u8,
    ) -> Result<(), TestCaseError> {
        let bytes = encode(v);
        prop_assert_eq!(&decode(&bytes).expect("decodes"), v);
        prop_assert!(decode(&bytes[..cut % bytes.len()]).is_err());
        let mut longer = bytes.clone();
        longer.push(extra);
        prop_assert_eq!(
            decode(&longer).map(|_| ()),
            Err(DecodeError::TrailingBytes(1))
        );
        Ok(())
    }

    /// A random payload length, a chunk size giving at most 2048 chunks, and a seed.
    fn arb_transfer() -> impl Strategy<Value = (usize, usize, u64)> {
        (0usize..200_000, 0u8..3, 1usize..=70_000, any::<u64>()).prop_map(
            |(len, bucket, size, seed)| {
                let size = match bucket {
                    0 => size % 64 + 1,
                    1 => size % 4096 + 1,
                    _ => size,
                };
                (len, size.max(len / 2048 + 1), seed)
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_order_with_duplicates_reassembles_the_payload(
            (len, size, seed) in arb_transfer(),
        ) {
            let data = payload(len, seed);
            let (m, chunks) = split(mt("app.blob"), &data, size, tid(1)).expect("split");
            let m = Manifest::decode(&m.encode()).expect("manifest");
            let mut rng = Rng::new(seed ^ 0x5eed);
            let mut order: Vec<Chunk> = chunks.clone().collect();
            let n = order.len();
            for _ in 0..n / 4 + 1 {
                order.push(order[rng.below(n)].clone());
            }
            rng.shuffle(&mut order);
            let mut r = reassembler();
            r.begin(T0, &peer(1), &m).expect("begin");
            let mut done = None;
            for (k, c) in order.iter().enumerate() {
                let c = Chunk::decode(&c.encode()).expect("chunk");
                match r.add(T0 + k as u64, &peer(1), &c).expect("accepted") {
                    Progress::Partial(s) => {
                        prop_assert!(done.is_none());
                        prop_assert!(s.received_chunks < s.chunk_count);
                        prop_assert!(s.received_bytes <= s.total_len);
                    }
                    Progress::Complete { msg_type, payload } => {
                        prop_assert!(done.is_none());
                        prop_assert_eq!(msg_type, mt("app.blob"));
                        done = Some(payload);
                    }
                    // Later duplicates are late repeats of a completed transfer.
                    Progress::AlreadyComplete => prop_assert!(done.is_some()),
                }
            }
            prop_assert_eq!(done.expect("complete"), data);
            prop_assert!(r.is_empty());
            prop_assert_eq!(r.reserved_bytes(), 0);
        }

        #[test]
        fn withheld_chunks_are_missing_until_resent(
            (len, size, seed) in arb_transfer(),
            percent in 1u64..=100,
        ) {
            let data = payload(len, seed);
            let (m, chunks) = split(mt("message"), &data, size, tid(3)).expect("split");
            let n = chunks.chunk_count();
            let mut rng = Rng::new(seed ^ 0xabc);
            let forced = rng.below(n as usize) as u32;
            let withheld: Vec<u32> =
                (0..n).filter(|&i| i == forced || rng.next_u64() % 100 < percent).collect();
            let mut sent: Vec<Chunk> =
                chunks.clone().filter(|c| withheld.binary_search(&c.index).is_err()).collect();
            if let Some(c) = sent.first().cloned() {
                sent.push(c);
            }
            rng.shuffle(&mut sent);
            let mut r = reassembler();
            r.begin(T0, &peer(1), &m).expect("begin");
            for c in &sent {
                let p = r.add(T0, &peer(1), c).expect("accepted");
                prop_assert!(matches!(p, Progress::Partial(_)));
            }
            let s = r.status(&peer(1), tid(3)).expect("open");
            prop_assert_eq!(s.received_chunks as usize, n as usize - withheld.len());
            let first: Vec<u32> = withheld.iter().copied().take(MAX_RESEND_INDEXES).collect();
            prop_assert_eq!(r.missing(&peer(1), tid(3)), first);
            let mut done = None;
            while done.is_none() {
                let req = r.resend_request(&peer(1), tid(3)).expect("open");
                prop_assert!(!req.indexes().is_empty());
                let req = ResendRequest::decode(&req.encode()).expect("decodes");
                for c in chunks.resend(&req) {
                    if let Progress::Complete { payload, .. } = r.add(T0, &peer(1), &c).expect("ok") {
                        done = Some(payload);
                    }
                }
            }
            prop_assert_eq!(done.expect("complete"), data);
        }

        #[test]
        fn a_corrupted_chunk_never_yields_a_wrong_message(
            (len, size, seed) in arb_transfer(),
            pick in any::<prop::sample::Index>(),
            how in 0u8..3,
            bit in any::<u32>(),
        ) {
            // (Between nodes a chunk is also covered by its envelope's signature:
            // this is what the reassembler alone guarantees.)
            let data = payload(len, seed);
            let (m, chunks) = split(mt("message"), &data, size, tid(4)).expect("split");
            let mut r = reassembler();
            r.begin(T0, &peer(1), &m).expect("begin");
            let good = chunks.get(pick.index(chunks.len()) as u32).expect("chunk");
            let mut bad = good.clone();
            match how {
                0 if !bad.data.is_empty() => {
                    let i = bit as usize % (bad.data.len() * 8);
                    bad.data[i / 8] ^= 1 << (i % 8);
                }
                2 if !bad.data.is_empty() => { bad.data.pop(); }
                _ => bad.data.push(bit as u8),
            }
            let before = r.status(&peer(1), tid(4));
            let first = r.add(T0, &peer(1), &bad);
            if bad.data.len() != good.data.len() {
                // Another length: refused at once, nothing changed, and the
                // good chunk still completes the message.
                prop_assert_eq!(first.expect_err("refused").code, ErrorCode::ChunkError);
                prop_assert_eq!(r.status(&peer(1), tid(4)), before);
                let mut done = None;
                for c in chunks.clone() {
                    if let Progress::Complete { payload, .. } = r.add(T0, &peer(1), &c).expect("ok") {
                        done = Some(payload);
                    }
                }
                prop_assert_eq!(done.expect("complete"), data);
            } else {
                // Same length, other bytes: stored, and the message's SHA-256
                // refuses the transfer once it is complete; it is never delivered.
                let mut results = vec![first];
                for c in chunks.clone().filter(|c| c.index != good.index) {
                    results.push(r.add(T0, &peer(1), &c));
                }
                let delivered = results
                    .iter()
                    .any(|r| matches!(r, Ok(Progress::Complete { .. })));
                prop_assert!(!delivered, "a corrupted message was delivered");
                let refused = results.last().expect("one").as_ref().expect_err("refused at the end");
                prop_assert!(refused.reason.contains("manifest's sha256"), "{}", refused.reason);
                prop_assert!(r.is_empty());
            }
        }
    }

    proptest! {
        #[test]
        fn manifests_round_trip(m in arb_manifest(), cut in any::<usize>(), extra in any::<u8>()) {
            prop_assert_eq!(m.encode().len(), m.encoded_len());
            check_round_trip(&m, Manifest::decode, Manifest::encode, cut, extra)?;
        }

        #[test]
        fn chunks_round_trip(c in arb_chunk(), cut in any::<usize>(), extra in any::<u8>()) {
            prop_assert_eq!(c.encode().len(), c.encoded_len());
            check_round_trip(&c, Chunk::decode, Chunk::encode, cut, extra)?;
        }

        #[test]
        fn resend_requests_round_trip(q in arb_resend(), cut in any::<usize>(), extra in any::<u8>()) {
            prop_assert!(q.indexes().len() <= MAX_RESEND_INDEXES);
            prop_assert!(q.indexes().windows(2).all(|w| w[0] < w[1]));
            prop_assert_eq!(q.encode().len(), q.encoded_len());
            check_round_trip(&q, ResendRequest::decode, ResendRequest::encode, cut, extra)?;
        }

        #[test]
        fn decoders_never_panic_and_accepted_bytes_are_canonical(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            canonical(&bytes, Manifest::decode, Manifest::encode)?;
            canonical(&bytes, Chunk::decode, Chunk::encode)?;
            canonical(&bytes, ResendRequest::decode, ResendRequest::encode)?;
        }

        #[test]
        fn reassembler_never_panics_on_decoded_garbage(
            manifests in proptest::collection::vec(arb_manifest(), 0..4),
            chunks in proptest::collection::vec(arb_chunk(), 0..16),
        ) {
            let mut r = reassembler();
            for m in &manifests {
                let _ = r.begin(T0, &peer(1), m);
            }
            for c in &chunks {
                let _ = r.add(T0, &peer(1), c);
                let _ = r.missing(&peer(1), c.transfer_id);
            }
            prop_assert!(r.transfers_of(&peer(1)) <= 4);
        }
    }
}
