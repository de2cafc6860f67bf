//! Chunked-transfer payload decoding and reassembly.
//!
//! (a) The three payload encodings are canonical: any bytes that `Manifest::decode`,
//!     `Chunk::decode` or `ResendRequest::decode` accept re-encode to exactly
//!     themselves.
//! (b) The input, read as a script of operations, drives one `Reassembler`
//!     (fixed clock start, two peers, small limits): raw decoded manifests and
//!     chunks, transfers split from fuzzer-chosen payloads and delivered in any
//!     order with duplicates, bit flips, resends, aborts and clock jumps. It never
//!     panics, never exceeds its limits, and a transfer split here completes only
//!     with exactly the payload that was split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peer_core::EntityId;
use peer_core::chunk::{
    self, Chunk, Chunks, Config, MAX_RESEND_INDEXES, Manifest, Progress, Reassembler,
    ResendRequest, TransferId,
};

fn canonical(data: &[u8]) {
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(m.encoded_len(), data.len(), "manifest encoded_len");
        assert_eq!(
            m.encode(),
            data,
            "decodable manifest bytes are not canonical"
        );
    }
    if let Ok(c) = Chunk::decode(data) {
        assert_eq!(c.encoded_len(), data.len(), "chunk encoded_len");
        assert_eq!(c.encode(), data, "decodable chunk bytes are not canonical");
    }
    if let Ok(q) = ResendRequest::decode(data) {
        assert!(q.indexes().len() <= MAX_RESEND_INDEXES);
        assert!(q.indexes().windows(2).all(|w| w[0] < w[1]));
        assert_eq!(q.encoded_len(), data.len(), "resend encoded_len");
        assert_eq!(q.encode(), data, "decodable resend bytes are not canonical");
    }
}

/// Small limits, so the script reaches every refusal.
const CONFIG: Config = Config {
    max_message_size: 1 << 20,
    max_chunk_size: 1 << 16,
    min_chunk_size: 1,
    max_transfers_per_peer: 3,
    max_transfers: 5,
    max_buffered_bytes: 2 << 20,
    expiry_ms: 60_000,
};

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
}

/// A transfer this script split: who sends it, its chunks, its payload.
struct Sent<'a> {
    peer: EntityId,
    chunks: Chunks<'a>,
    payload: &'a [u8],
}

/// Whether `id` is one [`script`] gives the transfers it splits. Raw decoded manifests
/// and chunks with these ids are skipped, so those transfers only ever see their own
/// chunks (genuine or corrupted here) and must complete with their own payload.
fn is_split_id(id: TransferId) -> bool {
    (0xa0..0xa8).contains(&id.0[0]) && id.0.iter().all(|&b| b == id.0[0])
}

fn check_progress(sent: &[Sent<'_>], peer: EntityId, id: TransferId, p: &Progress) {
    if let Progress::Complete { payload, .. } = p
        && let Some(s) = sent
            .iter()
            .find(|s| s.peer == peer && s.chunks.transfer_id() == id)
    {
        assert_eq!(payload.as_slice(), s.payload, "completed with other bytes");
    }
}

fn script(data: &[u8]) {
    let mut input = Input(data);
    let mut r: Reassembler = Reassembler::new(CONFIG);
    let mut now = peer_fuzz::NOW_MS;
    let mut sent: Vec<Sent<'_>> = Vec::new();
    let peer = |b: u8| EntityId([b & 1; 32]);
    while let Some(op) = input.u8() {
        let who = peer(op >> 3);
        match op & 7 {
            0 => {
                let n = input.u8().unwrap_or(0);
                if let Ok(m) = Manifest::decode(input.bytes(n.into()))
                    && !is_split_id(m.transfer_id)
                {
                    let _ = r.begin(now, &who, &m);
                }
            }
            1 => {
                let n = input.u16().unwrap_or(0);
                if let Ok(c) = Chunk::decode(input.bytes(n.into()))
                    && !is_split_id(c.transfer_id)
                {
                    let _ = r.add(now, &who, &c);
                }
            }
            2 if sent.len() < 8 => {
                let size = usize::from(input.u8().unwrap_or(0)) + 1;
                let n = input.u16().unwrap_or(0);
                let payload = input.bytes(n.into());
                let id = TransferId([0xa0 + sent.len() as u8; 16]);
                let msg_type = "app.blob".parse().expect("valid msg_type");
                let (m, chunks) = chunk::split(msg_type, payload, size, id).expect("split");
                let _ = r.begin(now, &who, &m);
                sent.push(Sent {
                    peer: who,
                    chunks,
                    payload,
                });
            }
            3 => {
                let (Some(slot), Some(index), Some(flip)) = (input.u8(), input.u16(), input.u8())
                else {
                    break;
                };
                let Some(s) = sent.get(usize::from(slot) % sent.len().max(1)) else {
                    continue;
                };
                let count = s.chunks.chunk_count();
                let Some(mut c) = s.chunks.get(u32::from(index) % count) else {
                    continue;
                };
                let corrupt = flip & 0x80 != 0 && !c.data.is_empty();
                if corrupt {
                    let bit = usize::from(flip & 0x7f) % (c.data.len() * 8);
                    c.data[bit / 8] ^= 1 << (bit % 8);
                }
                match r.add(now, &s.peer, &c) {
                    Ok(p) => {
                        assert!(!corrupt, "a corrupted chunk was accepted");
                        check_progress(&sent, s.peer, c.transfer_id, &p);
                    }
                    Err(e) => assert_eq!(e.code, peer_core::ErrorCode::ChunkError),
                }
            }
            4 => {
                let Some(s) = sent.get(usize::from(input.u8().unwrap_or(0)) % sent.len().max(1))
                else {
                    continue;
                };
                let id = s.chunks.transfer_id();
                let Some(req) = r.resend_request(&s.peer, id) else {
                    continue;
                };
                let req = ResendRequest::decode(&req.encode()).expect("own request decodes");
                for c in s.chunks.resend(&req) {
                    let p = r.add(now, &s.peer, &c).expect("a resent chunk is accepted");
                    check_progress(&sent, s.peer, id, &p);
                }
            }
            5 => {
                now = now.saturating_add(u64::from(input.u16().unwrap_or(0)) * 10);
                let _ = r.expire(now);
                if let Some(t) = r.next_expiry() {
                    assert!(t > now, "an expired transfer survived expire()");
                }
            }
            6 => {
                if let Some(s) = sent.get(usize::from(input.u8().unwrap_or(0)) % sent.len().max(1))
                {
                    r.abort(&s.peer, s.chunks.transfer_id());
                }
            }
            _ => {
                for s in &sent {
                    let id = s.chunks.transfer_id();
                    let missing = r.missing(&s.peer, id);
                    assert!(missing.windows(2).all(|w| w[0] < w[1]));
                    match r.status(&s.peer, id) {
                        Some(st) => {
                            let left = (st.chunk_count - st.received_chunks) as usize;
                            assert_eq!(missing.len(), left.min(MAX_RESEND_INDEXES));
                            assert!(st.received_bytes <= st.total_len);
                        }
                        None => assert!(missing.is_empty()),
                    }
                }
            }
        }
        assert!(r.len() <= CONFIG.max_transfers);
        assert!(r.reserved_bytes() <= CONFIG.max_buffered_bytes);
        for b in 0..2 {
            assert!(r.transfers_of(&peer(b)) <= CONFIG.max_transfers_per_peer);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    canonical(data);
    script(data);
});
