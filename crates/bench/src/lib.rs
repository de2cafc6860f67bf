//! Load generators for Peer Protocol nodes, and what they share: nodes started
//! in this process ([`nodes`]) and sends at a fixed rate with a latency
//! histogram ([`pace`]).

pub mod nodes;
pub mod pace;
