//! Load generators for Peer Protocol nodes, and what they share: nodes started
//! in this process ([`nodes`]), sends at a fixed rate with a latency histogram
//! ([`pace`]), the crypto-only ceiling a load is measured against
//! ([`ceiling`]), the CPU time of threads ([`cpu`]), the attacks `peer-attack`
//! runs against a node ([`attack`]), frames over a bare libp2p stream
//! ([`bare`]), and the many-node Kademlia network of
//! `peer-dht-scale` ([`dht`]).

pub mod attack;
pub mod bare;
pub mod ceiling;
pub mod cpu;
pub mod dht;
pub mod nodes;
pub mod pace;
