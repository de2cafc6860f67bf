//! The sending side of one transfer. No I/O: the transfer service seals,
//! signs and sends the parts this hands out, and reports back what became of
//! them.

use bytes::Bytes;
use peer_core::EntityId;
use peer_core::chunk::{Chunk, Manifest};

/// Longest a sender waits before sending a throttled chunk again, whatever
/// `retry_after_ms` the receiver asked for (ms).
pub const MAX_THROTTLE_WAIT_MS: u64 = 60_000;

/// Throttle rounds (one or more chunks refused `RATE_LIMITED`, or held back by
/// the node's own outbound limit, while no wait is pending) a transfer takes in
/// a row with no chunk accepted in between before it fails.
pub const MAX_THROTTLES: u32 = 20;

/// One envelope's worth of an outgoing transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The `chunk_manifest`.
    Manifest,
    /// The `chunk` with this index.
    Chunk(u32),
}

/// Why an outgoing transfer stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GaveUp {
    /// The part that failed its last attempt.
    pub part: Part,
    /// Attempts made.
    pub attempts: u32,
}

/// The sending side of one transfer: what to send next, what is in flight, what
/// the receiver has. Sends the manifest first and no chunk until it is
/// accepted, then keeps up to `window` chunks in flight, sending first those to
/// send again (failed or asked for by a `chunk_resend`), then new ones in order.
#[derive(Debug)]
pub struct Outgoing<R> {
    /// The receiver.
    pub to: EntityId,
    /// The manifest announcing the transfer.
    pub manifest: Manifest,
    /// Whom to tell the outcome.
    pub reply: R,
    payload: Bytes,
    announced: bool,
    manifest_in_flight: bool,
    next: u32,
    again: std::collections::BTreeSet<u32>,
    in_flight: std::collections::BTreeSet<u32>,
    acked: Vec<bool>,
    done_chunks: u32,
    done_bytes: u64,
    manifest_attempts: u32,
    chunk_attempts: std::collections::HashMap<u32, u32>,
    /// No chunk goes out before this time (ms), after a `RATE_LIMITED`.
    resume_at_ms: Option<u64>,
    /// Throttles since the last chunk accepted.
    throttles: u32,
}

impl<R> Outgoing<R> {
    /// A transfer of `payload` (which `manifest` describes) to `to`.
    pub fn new(to: EntityId, manifest: Manifest, payload: Bytes, reply: R) -> Self {
        let count = usize::try_from(manifest.chunk_count).unwrap_or(0);
        Self {
            to,
            reply,
            payload,
            announced: false,
            manifest_in_flight: false,
            next: 0,
            again: Default::default(),
            in_flight: Default::default(),
            acked: vec![false; count],
            done_chunks: 0,
            done_bytes: 0,
            manifest_attempts: 0,
            chunk_attempts: Default::default(),
            resume_at_ms: None,
            throttles: 0,
            manifest,
        }
    }

    /// The parts to send at `now_ms`, marked in flight: the manifest until it
    /// is accepted, then chunks up to `window` in flight (none while throttled).
    pub fn due(&mut self, now_ms: u64, window: usize) -> Vec<Part> {
        match self.resume_at_ms {
            Some(t) if now_ms < t => return Vec::new(),
            _ => self.resume_at_ms = None,
        }
        if !self.announced {
            if self.manifest_in_flight {
                return Vec::new();
            }
            self.manifest_in_flight = true;
            return vec![Part::Manifest];
        }
        let mut out = Vec::new();
        while self.in_flight.len() < window {
            let index = match self.again.pop_first() {
                Some(i) => i,
                None if self.next < self.manifest.chunk_count => {
                    self.next += 1;
                    self.next - 1
                }
                None => break,
            };
            if self.in_flight.insert(index) {
                out.push(Part::Chunk(index));
            }
        }
        out
    }

    /// The payload of `part`'s envelope (before sealing).
    pub fn encode(&self, part: Part) -> Vec<u8> {
        match part {
            Part::Manifest => self.manifest.encode(),
            Part::Chunk(i) => {
                let data = self
                    .manifest
                    .chunk_range(i)
                    .and_then(|r| self.payload.get(r))
                    .unwrap_or_default();
                Chunk::new(self.manifest.transfer_id, i, data.to_vec()).encode()
            }
        }
    }

    /// The receiver accepted `part`. Returns whether every chunk now is.
    pub fn accepted(&mut self, part: Part) -> bool {
        match part {
            Part::Manifest => {
                self.manifest_in_flight = false;
                self.announced = true;
            }
            Part::Chunk(i) => {
                self.in_flight.remove(&i);
                self.throttles = 0;
                if let Some(acked) = self.acked.get_mut(usize::try_from(i).unwrap_or(usize::MAX))
                    && !*acked
                {
                    *acked = true;
                    self.done_chunks += 1;
                    self.done_bytes += self.manifest.chunk_len(i).unwrap_or(0);
                }
            }
        }
        self.is_complete()
    }

    /// Whether the receiver accepted every chunk.
    pub fn is_complete(&self) -> bool {
        self.announced && self.done_chunks == self.manifest.chunk_count
    }

    /// `part` did not arrive (its request failed, or the receiver had lost the
    /// session): it is sent again, unless it has had `max_attempts` already.
    pub fn failed(&mut self, part: Part, max_attempts: u32) -> Result<(), GaveUp> {
        let attempts = match part {
            Part::Manifest => {
                self.manifest_in_flight = false;
                &mut self.manifest_attempts
            }
            Part::Chunk(i) => {
                self.in_flight.remove(&i);
                self.chunk_attempts.entry(i).or_default()
            }
        };
        *attempts += 1;
        if *attempts >= max_attempts {
            return Err(GaveUp {
                part,
                attempts: *attempts,
            });
        }
        if let Part::Chunk(i) = part {
            self.again.insert(i);
        }
        Ok(())
    }

    /// Chunk `index` was refused `RATE_LIMITED` (or held back locally) at
    /// `now_ms`: it is sent again, and no chunk goes out for `wait_ms` (at most
    /// [`MAX_THROTTLE_WAIT_MS`]). Not counted as an attempt; refusals while a
    /// wait is pending (the rest of a window) join that round, and after
    /// [`MAX_THROTTLES`] rounds with no chunk accepted the transfer gives up.
    pub fn throttled(&mut self, index: u32, now_ms: u64, wait_ms: u64) -> Result<(), GaveUp> {
        self.in_flight.remove(&index);
        if self.resume_at_ms.is_none_or(|t| t <= now_ms) {
            self.throttles += 1;
        }
        if self.throttles > MAX_THROTTLES {
            return Err(GaveUp {
                part: Part::Chunk(index),
                attempts: self.throttles,
            });
        }
        self.again.insert(index);
        let until = now_ms.saturating_add(wait_ms.min(MAX_THROTTLE_WAIT_MS));
        self.resume_at_ms = Some(self.resume_at_ms.map_or(until, |t| t.max(until)));
        Ok(())
    }

    /// Whether the receiver accepted the manifest (the transfer has started).
    pub fn is_announced(&self) -> bool {
        self.announced
    }

    /// When a throttled transfer may send again, if it is throttled.
    pub fn resume_at(&self) -> Option<u64> {
        self.resume_at_ms
    }

    /// The receiver asked for `indexes` again (`chunk_resend`): those sent
    /// before and not in flight now are queued; indexes not sent yet go out in
    /// their turn, and others do not exist. Ignored before the manifest is
    /// accepted.
    pub fn resend(&mut self, indexes: &[u32]) {
        if !self.announced {
            return;
        }
        for &i in indexes.iter().filter(|&&i| i < self.next) {
            if !self.in_flight.contains(&i) {
                self.again.insert(i);
            }
        }
    }

    /// Chunks and bytes the receiver accepted.
    pub fn progress(&self) -> (u32, u64) {
        (self.done_chunks, self.done_bytes)
    }
}

/// Whether going from `before` to `after` of `count` chunks crosses a tenth:
/// progress is reported at most ten times a transfer.
pub fn crosses_tenth(before: u32, after: u32, count: u32) -> bool {
    let tenth = |n: u32| u64::from(n) * 10 / u64::from(count.max(1));
    after > before && tenth(after) > tenth(before)
}

#[cfg(test)]
mod tests {
    use super::*;
    use peer_core::MsgType;
    use peer_core::chunk::{self, Reassembler, TransferId};

    const WINDOW: usize = 3;

    fn outgoing(len: usize) -> (Outgoing<()>, Vec<u8>) {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let msg_type: MsgType = "message".parse().expect("valid");
        let (manifest, _) =
            chunk::split(msg_type, &payload, 4, TransferId::from_random([9; 16])).expect("split");
        let to = peer_core::Identity::from_secret(&[1; 32]).entity_id();
        let out = Outgoing::new(to, manifest, Bytes::from(payload.clone()), ());
        (out, payload)
    }

    #[test]
    fn the_manifest_goes_alone_and_first_then_chunks_fill_the_window() {
        let (mut out, _) = outgoing(18); // 5 chunks
        assert_eq!(out.due(0, WINDOW), [Part::Manifest]);
        assert!(
            out.due(0, WINDOW).is_empty(),
            "nothing until it is accepted"
        );
        assert!(!out.accepted(Part::Manifest));
        assert_eq!(
            out.due(0, WINDOW),
            [Part::Chunk(0), Part::Chunk(1), Part::Chunk(2)]
        );
        assert!(out.due(0, WINDOW).is_empty(), "the window is full");
        out.accepted(Part::Chunk(1));
        assert_eq!(out.due(0, WINDOW), [Part::Chunk(3)]);
        for i in [0, 2, 3] {
            assert!(!out.accepted(Part::Chunk(i)));
        }
        assert_eq!(out.due(0, WINDOW), [Part::Chunk(4)]);
        assert!(out.due(0, WINDOW).is_empty());
        assert!(out.accepted(Part::Chunk(4)), "every chunk accepted");
        assert_eq!(out.progress(), (5, 18));
    }

    #[test]
    fn failed_parts_are_sent_again_until_the_attempts_run_out() {
        let (mut out, _) = outgoing(8); // 2 chunks
        out.due(0, WINDOW);
        out.failed(Part::Manifest, 3).expect("second attempt");
        assert_eq!(out.due(0, WINDOW), [Part::Manifest]);
        out.accepted(Part::Manifest);
        assert_eq!(out.due(0, WINDOW), [Part::Chunk(0), Part::Chunk(1)]);
        out.failed(Part::Chunk(1), 3).expect("again");
        assert_eq!(out.due(0, WINDOW), [Part::Chunk(1)]);
        out.failed(Part::Chunk(1), 3).expect("third");
        assert_eq!(out.due(0, WINDOW), [Part::Chunk(1)]);
        let gave_up = out.failed(Part::Chunk(1), 3).expect_err("three attempts");
        assert_eq!(
            gave_up,
            GaveUp {
                part: Part::Chunk(1),
                attempts: 3
            }
        );
    }

    #[test]
    fn resend_requests_queue_chunks_not_in_flight() {
        let (mut out, _) = outgoing(18);
        out.resend(&[0]);
        assert_eq!(
            out.due(0, WINDOW),
            [Part::Manifest],
            "ignored before the manifest"
        );
        out.accepted(Part::Manifest);
        assert_eq!(
            out.due(0, WINDOW),
            [Part::Chunk(0), Part::Chunk(1), Part::Chunk(2)]
        );
        for i in 0..3 {
            out.accepted(Part::Chunk(i));
        }
        // 1 was accepted but the receiver asks again; 2 is asked twice; 4 is not
        // sent yet (it goes in its turn, once); 9 does not exist.
        out.resend(&[1, 2, 2, 4, 9]);
        assert_eq!(
            out.due(0, WINDOW),
            [Part::Chunk(1), Part::Chunk(2), Part::Chunk(3)]
        );
        for i in 1..4 {
            out.accepted(Part::Chunk(i));
        }
        assert_eq!(out.due(0, WINDOW), [Part::Chunk(4)]);
        assert!(out.accepted(Part::Chunk(4)));
        assert!(out.due(0, WINDOW).is_empty());
    }

    #[test]
    fn a_throttled_transfer_waits_then_sends_the_chunk_again() {
        let (mut out, _) = outgoing(18);
        out.due(0, WINDOW);
        out.accepted(Part::Manifest);
        assert_eq!(out.due(0, WINDOW).len(), 3);
        out.throttled(1, 0, 500).expect("waits");
        assert_eq!(out.resume_at(), Some(500));
        assert!(out.due(499, WINDOW).is_empty(), "waits");
        assert_eq!(out.due(500, WINDOW), [Part::Chunk(1)]);
        assert_eq!(out.resume_at(), None);
        // A wait asked for is capped.
        out.throttled(1, 1000, u64::MAX).expect("capped");
        assert_eq!(out.resume_at(), Some(1000 + MAX_THROTTLE_WAIT_MS));
        // The rest of the window refused meanwhile joins the same round.
        out.throttled(0, 1001, 10).expect("same round");
        out.throttled(2, 1002, 10).expect("same round");
        // Rounds in a row are bounded.
        let mut now = 1000 + MAX_THROTTLE_WAIT_MS;
        for _ in 3..=MAX_THROTTLES {
            out.throttled(1, now, 0).expect("still within the bound");
            now += 1;
        }
        assert!(out.throttled(1, now, 0).is_err(), "gives up");
    }

    #[test]
    fn an_accepted_chunk_resets_the_throttle_count() {
        let (mut out, _) = outgoing(18);
        out.due(0, WINDOW);
        out.accepted(Part::Manifest);
        out.due(0, WINDOW);
        for _ in 0..MAX_THROTTLES {
            out.throttled(1, 0, 0).expect("within the bound");
        }
        out.accepted(Part::Chunk(0));
        out.throttled(1, 0, 0)
            .expect("counted from the last acceptance");
    }

    #[test]
    fn the_encoded_parts_reassemble_the_payload() {
        let (out, payload) = outgoing(18);
        let mut r: Reassembler = Reassembler::new(chunk::Config {
            min_chunk_size: 1,
            ..chunk::Config::default()
        });
        let peer = peer_core::Identity::from_secret(&[2; 32]).entity_id();
        let manifest = Manifest::decode(&out.encode(Part::Manifest)).expect("manifest");
        r.begin(0, &peer, &manifest).expect("begin");
        for i in (0..5).rev() {
            let chunk = Chunk::decode(&out.encode(Part::Chunk(i))).expect("chunk");
            if let chunk::Progress::Complete { payload: p, .. } =
                r.add(0, &peer, &chunk).expect("add")
            {
                assert_eq!(p, payload);
                return;
            }
        }
        panic!("never completed");
    }

    #[test]
    fn progress_is_reported_at_each_tenth() {
        let reports = (0..100).filter(|&n| crosses_tenth(n, n + 1, 100)).count();
        assert_eq!(reports, 10);
        assert!(crosses_tenth(0, 1, 3), "small transfers report each chunk");
        assert!(!crosses_tenth(5, 5, 100), "a duplicate is not progress");
    }
}
