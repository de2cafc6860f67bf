//! Chunked-transfer settings.

use peer_core::chunk;
use serde::{Deserialize, Serialize};

/// Chunked-transfer settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferConfig {
    /// Application payloads larger than this are sent as a transfer, cut in
    /// chunks of this many bytes (default 32,768; 1,024 to 1 MiB, and a chunk's
    /// envelope must fit `protocol.max_envelope_size`).
    pub chunk_size: usize,
    /// Largest message sent or received as a transfer, in bytes (default 64 MiB).
    /// A larger incoming manifest is refused `MESSAGE_TOO_LARGE` before anything is
    /// buffered; a larger `POST /v1/messages` body is refused with HTTP 413.
    pub max_message_size: u64,
    /// Largest `chunk_size` accepted from a peer (default 1 MiB).
    pub max_chunk_size: u32,
    /// Smallest `chunk_size` accepted from a peer for a message of more than
    /// one chunk (default 1,024).
    pub min_chunk_size: u32,
    /// Incoming transfers open at once from one peer (default 4).
    pub max_transfers_per_peer: usize,
    /// Incoming transfers open at once from all peers (default 1,024).
    pub max_transfers: usize,
    /// Bytes reserved at once by open incoming transfers and held by messages
    /// the agent has not read yet, all peers together (default 1 GiB; at least
    /// `max_message_size`).
    pub max_buffered_bytes: u64,
    /// An incoming transfer with no new chunk for this many seconds is dropped
    /// (default 1,800).
    pub expiry_secs: u64,
    /// An incoming transfer with no new chunk for this many ms gets a
    /// `chunk_resend` for its missing chunks (default 5,000).
    pub resend_after_ms: u64,
    /// Resend requests per stalled incoming transfer, with no progress between
    /// them; `resend_after_ms` after the last, the transfer is dropped
    /// (default 6).
    pub max_resend_requests: u32,
    /// Chunks of one outgoing transfer in flight at once (default 32).
    pub window: usize,
    /// Outgoing transfers held at once, running or waiting their turn; more are
    /// refused `UNAVAILABLE` (default 256).
    pub max_outgoing: usize,
    /// Payload bytes held at once by outgoing transfers; a transfer that would
    /// go over is refused `UNAVAILABLE` (default 256 MiB; at least
    /// `max_message_size`, so one message of any allowed size always fits).
    pub max_outgoing_bytes: u64,
    /// Times a part is sent before the transfer fails, when its request fails in
    /// transport or its session was lost (default 3).
    pub max_attempts: u32,
}

impl Default for TransferConfig {
    fn default() -> Self {
        let c = chunk::Config::default();
        Self {
            chunk_size: chunk::DEFAULT_CHUNK_SIZE,
            max_message_size: c.max_message_size,
            max_chunk_size: c.max_chunk_size,
            min_chunk_size: c.min_chunk_size,
            max_transfers_per_peer: c.max_transfers_per_peer,
            max_transfers: c.max_transfers,
            max_buffered_bytes: c.max_buffered_bytes,
            expiry_secs: c.expiry_ms / 1000,
            resend_after_ms: 5_000,
            max_resend_requests: 6,
            window: 32,
            max_outgoing: 256,
            max_outgoing_bytes: 256 * 1024 * 1024,
            max_attempts: 3,
        }
    }
}

impl TransferConfig {
    /// The receiving side's limits.
    pub fn reassembly(&self) -> chunk::Config {
        chunk::Config {
            max_message_size: self.max_message_size,
            max_chunk_size: self.max_chunk_size,
            min_chunk_size: self.min_chunk_size,
            max_transfers_per_peer: self.max_transfers_per_peer,
            max_transfers: self.max_transfers,
            max_buffered_bytes: self.max_buffered_bytes,
            expiry_ms: self.expiry_secs.saturating_mul(1000),
        }
    }

    /// Checks the ranges; `max_envelope_size` is the node's envelope limit.
    pub fn validate(&self, max_envelope_size: usize) -> Result<(), String> {
        const MIN_CHUNK: usize = 1024;
        let max_chunk = usize::try_from(self.max_chunk_size).unwrap_or(usize::MAX);
        if !(MIN_CHUNK..=1024 * 1024).contains(&self.chunk_size) {
            return Err(format!(
                "transfer.chunk_size must be 1024 to 1048576 bytes, not {}",
                self.chunk_size
            ));
        }
        // A sealed chunk: the chunk header, the AEAD tag, and the envelope around it.
        let envelope = self.chunk_size + chunk::CHUNK_OVERHEAD + 1024;
        if envelope > max_envelope_size {
            return Err(format!(
                "transfer.chunk_size {} does not fit an envelope of protocol.max_envelope_size {max_envelope_size} bytes (a chunk needs about {envelope})",
                self.chunk_size
            ));
        }
        if max_chunk < MIN_CHUNK {
            return Err(format!(
                "transfer.max_chunk_size must be at least 1024, not {}",
                self.max_chunk_size
            ));
        }
        for (name, value) in [
            ("max_buffered_bytes", self.max_buffered_bytes),
            ("max_outgoing_bytes", self.max_outgoing_bytes),
        ] {
            if value < self.max_message_size {
                return Err(format!(
                    "transfer.{name} ({value}) must be at least transfer.max_message_size ({})",
                    self.max_message_size
                ));
            }
        }
        let at_least_one = [
            ("max_transfers_per_peer", self.max_transfers_per_peer),
            ("max_transfers", self.max_transfers),
            ("window", self.window),
            ("max_outgoing", self.max_outgoing),
        ];
        if let Some((name, _)) = at_least_one.iter().find(|(_, v)| *v == 0) {
            return Err(format!("transfer.{name} must be at least 1"));
        }
        if self.max_attempts == 0 || self.max_resend_requests == 0 {
            return Err(
                "transfer.max_attempts and transfer.max_resend_requests must be at least 1".into(),
            );
        }
        if self.min_chunk_size > self.max_chunk_size
            || usize::try_from(self.min_chunk_size).unwrap_or(usize::MAX) > self.chunk_size
        {
            return Err(format!(
                "transfer.min_chunk_size ({}) must be at most transfer.chunk_size ({}) and transfer.max_chunk_size ({})",
                self.min_chunk_size, self.chunk_size, self.max_chunk_size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_setting() {
        let ok = TransferConfig::default();
        assert_eq!(ok.validate(1024 * 1024), Ok(()));
        let small_envelope = ok.validate(32 * 1024).expect_err("chunk does not fit");
        assert!(
            small_envelope.contains("transfer.chunk_size"),
            "{small_envelope}"
        );
        let bad = TransferConfig {
            window: 0,
            ..TransferConfig::default()
        };
        assert!(
            bad.validate(1024 * 1024)
                .expect_err("zero")
                .contains("transfer.window")
        );
        let bad = TransferConfig {
            max_buffered_bytes: 1,
            ..TransferConfig::default()
        };
        assert!(bad.validate(1024 * 1024).is_err());
        for bad in [
            TransferConfig {
                max_resend_requests: 0,
                ..TransferConfig::default()
            },
            TransferConfig {
                min_chunk_size: 64 * 1024,
                ..TransferConfig::default()
            },
        ] {
            assert!(bad.validate(1024 * 1024).is_err(), "{bad:?}");
        }
    }
}
