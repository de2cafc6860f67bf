//! Load generators for Peer Protocol nodes, and what they share: nodes started
//! in this process ([`nodes`]), sends at a fixed rate with a latency histogram
//! ([`pace`]), the CPU time of threads ([`cpu`]), the attacks `peer-attack`
//! runs against a node ([`attack`]), and the many-node Kademlia network of
//! `peer-dht-scale` ([`dht`]).

pub mod attack;
pub mod cpu;
pub mod dht;
pub mod nodes;
pub mod pace;
