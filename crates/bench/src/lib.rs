//! Load generators for Peer Protocol nodes, and what they share: nodes started
//! in this process ([`nodes`]), sends at a fixed rate with a latency histogram
//! ([`pace`]), the CPU time of threads ([`cpu`]), and the attacks
//! `peer-attack` runs against a node ([`attack`]).

pub mod attack;
pub mod cpu;
pub mod nodes;
pub mod pace;
