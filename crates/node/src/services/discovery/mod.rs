//! Discovery and the DHT registry.

mod config;

pub use config::DiscoveryConfig;
