//! RFC 6479 sliding anti-replay window for session sequence numbers.
