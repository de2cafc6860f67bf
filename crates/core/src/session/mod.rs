//! Secure sessions (Peer Protocol v1.1 security layer): the six-step handshake, key schedule and payload sealing.
