//! Node configuration: built-in defaults, then a TOML file, then `PEER_*`
//! environment variables, then command-line flags (each overriding the last).
//!
//! Environment variables name a key by its path with `__` between levels:
//! `PEER_PROTOCOL__MAX_ENVELOPE_SIZE=65536`, `PEER_API__LISTEN=127.0.0.1:9000`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

use crate::inbox::InboxConfig;
use crate::pool::PoolConfig;
use crate::ratelimit::RateLimitConfig;
use crate::secure::SecurityConfig;
use crate::services::card::CardConfig;
use crate::services::discovery::DiscoveryConfig;
use crate::services::heartbeat::HeartbeatConfig;
use crate::services::tasks::TasksConfig;
use crate::store::StoreConfig;
use crate::transfer::TransferConfig;

/// The whole node configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the node keeps its identity, token and database.
    pub data_dir: PathBuf,
    /// Peer-to-peer networking.
    pub network: NetworkConfig,
    /// Inbound message checks.
    pub protocol: ProtocolConfig,
    /// The local HTTP API.
    pub api: ApiConfig,
    /// Per-peer rate limits.
    pub rate_limits: RateLimitConfig,
    /// End-to-end sessions.
    pub security: SecurityConfig,
    /// Chunked transfer of large messages.
    pub transfer: TransferConfig,
    /// The durable inbox of events for the agent.
    pub inbox: InboxConfig,
    /// The embedded database.
    pub store: StoreConfig,
    /// Heartbeat monitoring of connected peers.
    pub heartbeat: HeartbeatConfig,
    /// The capability card and application-defined message types.
    pub card: CardConfig,
    /// Delegated tasks.
    pub tasks: TasksConfig,
    /// The DHT registry, bootstrap and discovery.
    pub discovery: DiscoveryConfig,
    /// The connection pool's circuit breakers.
    pub pool: PoolConfig,
}

/// Peer-to-peer networking settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Addresses to listen on (TCP and QUIC multiaddrs).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start.
    pub bootstrap: Vec<Multiaddr>,
    /// Time allowed for a dial or a request to complete, in seconds (default 10).
    pub connection_timeout_secs: u64,
    /// A connection with no open stream is closed after this many seconds (default 300).
    pub max_idle_secs: u64,
    /// Most connections to one peer (default 3).
    pub max_connections_per_peer: u32,
    /// Most established connections in all (default 1,024).
    pub max_connections: u32,
    /// Most incoming connections still being set up (default 128).
    pub max_pending_incoming: u32,
    /// Most established incoming connections from one IPv4 address or one IPv6
    /// /64 (default 16; at least 1). Connections this node dials are not
    /// counted. With `max_inbound_bytes_per_connection` it bounds what one host
    /// can hold of the inbound budget (see there).
    pub max_connections_per_ip: u32,
    /// Most incoming connections still being set up from one IPv4 address or
    /// one IPv6 /64 (default 8; at least 1).
    pub max_pending_per_ip: u32,
    /// New incoming connections a minute from one IPv4 address or IPv6 /64,
    /// sustained (default 60; at least 1): one host cannot make the node run
    /// handshakes as fast as it can send them. Beyond it, and beyond the burst,
    /// a new connection is refused before its handshake.
    pub new_connections_per_ip_per_min: u32,
    /// New incoming connections from one address or /64 accepted at once after
    /// a quiet while (default 32; at least 1).
    pub new_connections_per_ip_burst: u32,
    /// Requests of a connected peer refused as its misbehaviour (a bad
    /// signature, a sender that is not the peer, a sender id not bound to its
    /// key, bytes that are not an envelope: nothing an honest implementation
    /// sends) before the node closes its connections (default 16; 0 never
    /// closes them).
    pub misbehaviour_limit: u32,
    /// How long, in seconds, the address or /64 of a peer whose connections
    /// were closed for misbehaviour is refused new connections (default 60).
    pub misbehaviour_cooldown_secs: u64,
    /// A peer's requests verified at once (signature checks on tasks of their
    /// own); its others wait their turn, so one peer with hundreds of
    /// requests open cannot queue its signature checks ahead of every other
    /// peer's (default 2; at least 1). Few, so that a busy peer's requests
    /// wait and form batches, which cost a quarter per signature.
    pub max_verifying_per_peer: usize,
    /// Most request streams open at once on one connection, inbound and outbound
    /// together: libp2p's request-response counts both against this one limit and
    /// drops an inbound request beyond it (default 256, at most 480). This node
    /// keeps at most half of it (at least 1) of its own requests in flight to one
    /// peer, leaving the other half for the peer's requests to it; further sends
    /// wait for a free stream. Yamux closes a connection whose peer opens more
    /// than 512 streams, so this stays well below that with room for identify and
    /// ping.
    pub max_concurrent_streams: usize,
    /// Most bytes of inbound requests buffered at once, over all peers; readers
    /// wait for room before they allocate (default 64 MiB; at least
    /// `protocol.max_envelope_size`).
    pub max_inbound_buffer_bytes: usize,
    /// Most bytes of inbound requests buffered at once for one connection, taken
    /// before (and on top of) `max_inbound_buffer_bytes`: the streams of one
    /// connection wait only behind each other. Default 2 MiB, two envelopes of
    /// the largest size: with 16 connections per IP, one host holds at most
    /// 32 MiB, half the node's budget (4 MiB would let one host take all
    /// 64 MiB, and fewer connections per IP would shut out more hosts behind
    /// one NAT). At least `protocol.max_envelope_size`, and
    /// `max_connections_per_ip` times it must be less than
    /// `max_inbound_buffer_bytes`, so that no single host can hold the whole
    /// budget (checked at start).
    pub max_inbound_bytes_per_connection: usize,
    /// Slowest rate, in bytes per second, at which a request body must arrive
    /// once its budget is taken: it gets 1 s plus its length divided by this,
    /// then the stream is dropped (default 65,536; at least 1).
    pub min_inbound_bytes_per_sec: u64,
    /// Most outbound messages held at once, from the moment they are sent
    /// until their answer: waiting for a session, being signed, waiting for a
    /// free stream or in flight; beyond it a send fails with `UNAVAILABLE`
    /// (default 4,096).
    pub max_outbound_in_flight: usize,
    /// Most payload bytes those messages hold together; a send that would go
    /// over fails with `UNAVAILABLE` (default 128 MiB; at least
    /// `protocol.max_envelope_size`).
    pub max_outbound_bytes: u64,
    /// Most dials the agent has in progress at once (`POST /v1/peers`); more
    /// fail with `UNAVAILABLE` (default 64).
    pub max_pending_dials: usize,
    /// Most peers remembered in the database; the least recently seen is forgotten
    /// first (default 10,000).
    pub max_known_peers: usize,
    /// Peer sightings waiting to be written to the database; beyond it a
    /// sighting is dropped and counted in `peer_store_dropped_total` (default
    /// 1,024, at least 1).
    pub store_queue: usize,
}

/// Inbound message checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProtocolConfig {
    /// Largest encoded envelope accepted, in bytes (default 1 MiB).
    pub max_envelope_size: usize,
    /// Timestamp tolerance either way, in seconds (default 60).
    pub timestamp_tolerance_secs: u64,
    /// How long a nonce is remembered, in seconds (default 300); it must be more
    /// than twice `timestamp_tolerance_secs` (checked at start).
    pub replay_window_secs: u64,
    /// Most nonces remembered; see `docs/SECURITY.md` for what happens when full
    /// (default 1,000,000).
    pub replay_capacity: usize,
    /// Most peers with their own row in `/v1/stats`; later ones share the row
    /// `other` (default 10,000).
    pub max_stats_peers: usize,
    /// Deepest nesting of arrays and objects in an application payload, inbound
    /// (refused `MALFORMED_MESSAGE`) and sent (`NodeError::Invalid`). The node
    /// never parses a payload into a tree, but the agents it hands them to may,
    /// with recursive parsers that crash or refuse well before 100,000 levels.
    /// Default 64, the strictest common default (.NET's System.Text.Json; Ruby
    /// allows 100, serde_json 127): a payload within it parses everywhere, and
    /// real messages rarely nest beyond ten.
    pub max_json_depth: usize,
}

/// Local HTTP API settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the local API (default 127.0.0.1:7401). Port 0 picks a free port;
    /// the address bound is written to `<data_dir>/api.addr`.
    pub listen: SocketAddr,
    /// Events kept for a slow `/v1/events` reader before it misses some (default 1,024).
    pub event_buffer: usize,
    /// Most requests handled at once, event streams aside; one more is refused
    /// at once with `503 UNAVAILABLE` and `Retry-After: 1`, not queued
    /// (default 256; at least 1).
    pub max_concurrent_requests: usize,
    /// Most bytes of request bodies held at once, all requests together; a body
    /// that does not fit is refused `503` before it is read. A body counts from
    /// before it is read (its `Content-Length`, else its bytes as they arrive)
    /// until its request is answered: a message's payload shares its body's
    /// buffer, so a chunked message's body counts until its transfer ends.
    /// Default 320 MiB: the bodies of the transfers `transfer.max_outgoing_bytes`
    /// (256 MiB) lets run, and 64 MiB more being read; at least the largest
    /// body, `transfer.max_message_size` + 64 KiB (checked).
    pub max_body_bytes_in_flight: usize,
    /// Most `/v1/events` subscribers at once; one more is refused `503`
    /// (default 64; at least 1).
    pub max_event_streams: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            network: NetworkConfig::default(),
            protocol: ProtocolConfig::default(),
            api: ApiConfig::default(),
            rate_limits: RateLimitConfig::default(),
            security: SecurityConfig::default(),
            transfer: TransferConfig::default(),
            inbox: InboxConfig::default(),
            store: StoreConfig::default(),
            heartbeat: HeartbeatConfig::default(),
            card: CardConfig::default(),
            tasks: TasksConfig::default(),
            discovery: DiscoveryConfig::default(),
            pool: PoolConfig::default(),
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        let addr = |s: &str| s.parse().expect("built-in multiaddr is valid");
        Self {
            listen: vec![
                addr("/ip4/0.0.0.0/tcp/7400"),
                addr("/ip4/0.0.0.0/udp/7400/quic-v1"),
            ],
            bootstrap: Vec::new(),
            connection_timeout_secs: 10,
            max_idle_secs: 300,
            max_connections_per_peer: 3,
            max_connections: 1024,
            max_pending_incoming: 128,
            max_connections_per_ip: 16,
            max_pending_per_ip: 8,
            new_connections_per_ip_per_min: 60,
            new_connections_per_ip_burst: 32,
            misbehaviour_limit: 16,
            misbehaviour_cooldown_secs: 60,
            max_verifying_per_peer: 2,
            max_concurrent_streams: 256,
            max_inbound_buffer_bytes: 64 * 1024 * 1024,
            max_inbound_bytes_per_connection: 2 * 1024 * 1024,
            min_inbound_bytes_per_sec: 64 * 1024,
            max_outbound_in_flight: 4096,
            max_outbound_bytes: 128 * 1024 * 1024,
            max_pending_dials: 64,
            max_known_peers: 10_000,
            store_queue: 1024,
        }
    }
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        let core = peer_core::inbound::Config::default();
        Self {
            max_envelope_size: core.max_envelope_size,
            timestamp_tolerance_secs: core.replay.tolerance_ms / 1000,
            replay_window_secs: core.replay.window_ms / 1000,
            replay_capacity: core.replay.capacity,
            max_stats_peers: 10_000,
            max_json_depth: 64,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7401)),
            event_buffer: 1024,
            max_concurrent_requests: 256,
            max_body_bytes_in_flight: 320 * 1024 * 1024,
            max_event_streams: 64,
        }
    }
}

impl NetworkConfig {
    /// Checks the per-IP and per-connection bounds against each other and
    /// against the node's inbound budget.
    fn validate_inbound(&self, max_envelope_size: usize) -> Result<(), String> {
        for (key, value) in [
            (
                "max_connections_per_ip",
                u64::from(self.max_connections_per_ip),
            ),
            ("max_pending_per_ip", u64::from(self.max_pending_per_ip)),
            (
                "new_connections_per_ip_per_min",
                u64::from(self.new_connections_per_ip_per_min),
            ),
            (
                "new_connections_per_ip_burst",
                u64::from(self.new_connections_per_ip_burst),
            ),
            (
                "max_verifying_per_peer",
                u64::try_from(self.max_verifying_per_peer).unwrap_or(u64::MAX),
            ),
            ("min_inbound_bytes_per_sec", self.min_inbound_bytes_per_sec),
        ] {
            if value == 0 {
                return Err(format!("network.{key} is 0; it must be at least 1"));
            }
        }
        let share = self.max_inbound_bytes_per_connection;
        let budget = self.max_inbound_buffer_bytes;
        if share < max_envelope_size {
            return Err(format!(
                "network.max_inbound_bytes_per_connection ({share}) must be at least protocol.max_envelope_size ({max_envelope_size})"
            ));
        }
        // With at least one connection per IP, this also keeps the share below
        // the budget.
        let per_ip = u128::from(self.max_connections_per_ip);
        if per_ip * share as u128 >= budget as u128 {
            return Err(format!(
                "network.max_connections_per_ip ({per_ip}) times network.max_inbound_bytes_per_connection ({share}) must be less than network.max_inbound_buffer_bytes ({budget}), or one host can hold the whole inbound budget"
            ));
        }
        Ok(())
    }
}

/// `PEER_BOOTSTRAP` as a partial tree (`network.bootstrap`), empty if unset.
fn bootstrap_from_env() -> Result<toml::Table, ConfigError> {
    let mut t = toml::Table::new();
    let Ok(list) = std::env::var("PEER_BOOTSTRAP") else {
        return Ok(t);
    };
    let addrs = list
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.parse::<Multiaddr>()
                .map(|m| toml::Value::String(m.to_string()))
                .map_err(|e| {
                    ConfigError::Invalid(format!("PEER_BOOTSTRAP: {a:?} is not a multiaddr: {e}"))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut network = toml::Table::new();
    network.insert("bootstrap".into(), toml::Value::Array(addrs));
    t.insert("network".into(), network.into());
    Ok(t)
}

/// `$HOME/.peer`, or `./.peer` without a home directory.
fn default_data_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".peer")
}

/// Highest `network.max_concurrent_streams`: this many request streams (both
/// ways together) plus identify and ping stay under yamux's limit of 512
/// streams per connection.
pub const MAX_STREAMS: usize = 480;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A source could not be read or a value has the wrong type.
    #[error("invalid configuration: {0}")]
    Load(Box<figment::Error>),
    /// A value is out of its range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads defaults ← `file` (if given, it must exist; else `<data_dir>/config.toml`
    /// if present) ← `PEER_*` variables ← `overrides` (flags, as a partial TOML tree).
    /// `PEER_BOOTSTRAP` is a list of bootstrap addresses separated by commas
    /// or spaces (`network.bootstrap`).
    pub fn load(file: Option<&Path>, overrides: toml::Table) -> Result<Self, ConfigError> {
        let overrides = Serialized::defaults(overrides);
        let bootstrap = Serialized::defaults(bootstrap_from_env()?);
        let env = || {
            Env::prefixed("PEER_")
                .split("__")
                .ignore(&["config", "bootstrap"])
        };
        let base = Figment::from(Serialized::defaults(Config::default()))
            .merge(env())
            .merge(bootstrap.clone())
            .merge(overrides.clone());
        let file = match file {
            Some(f) => Some(f.to_path_buf()),
            None => {
                let data_dir: PathBuf = base
                    .extract_inner("data_dir")
                    .map_err(|e| ConfigError::Load(Box::new(e)))?;
                Some(data_dir.join("config.toml")).filter(|p| p.exists())
            }
        };
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            fig = fig.merge(Toml::file_exact(f));
        }
        fig.merge(env())
            .merge(bootstrap)
            .merge(overrides)
            .extract::<Config>()
            .map_err(|e| ConfigError::Load(Box::new(e)))?
            .validate()
    }

    /// Checks values that have limits beyond their type.
    fn validate(self) -> Result<Self, ConfigError> {
        self.check()?;
        Ok(self)
    }

    /// Checks values that have limits beyond their type, and that go
    /// together; [`Config::load`] and the node builder run it.
    pub fn check(&self) -> Result<(), ConfigError> {
        let streams = self.network.max_concurrent_streams;
        if !(1..=MAX_STREAMS).contains(&streams) {
            return Err(ConfigError::Invalid(format!(
                "network.max_concurrent_streams is {streams}; it must be 1 to {MAX_STREAMS}"
            )));
        }
        if self.network.store_queue == 0 {
            return Err(ConfigError::Invalid(
                "network.store_queue must be at least 1".into(),
            ));
        }
        self.rate_limits.validate().map_err(ConfigError::Invalid)?;
        let (senders, connections) = (self.rate_limits.max_peers, self.network.max_connections);
        if senders < connections as usize {
            return Err(ConfigError::Invalid(format!(
                "rate_limits.max_peers ({senders}) must be at least network.max_connections ({connections}): every connected peer keeps rate-limit buckets of its own, and a connected newcomer must find room"
            )));
        }
        self.security.validate().map_err(ConfigError::Invalid)?;
        self.card.validate().map_err(ConfigError::Invalid)?;
        self.transfer
            .validate(self.protocol.max_envelope_size)
            .map_err(ConfigError::Invalid)?;
        self.inbox
            .validate(self.transfer.max_message_size)
            .map_err(ConfigError::Invalid)?;
        self.store.validate().map_err(ConfigError::Invalid)?;
        self.heartbeat.validate().map_err(ConfigError::Invalid)?;
        self.tasks.validate().map_err(ConfigError::Invalid)?;
        self.discovery.validate().map_err(ConfigError::Invalid)?;
        self.pool.validate().map_err(ConfigError::Invalid)?;
        let p = &self.protocol;
        for (key, secs) in [
            ("timestamp_tolerance_secs", p.timestamp_tolerance_secs),
            ("replay_window_secs", p.replay_window_secs),
        ] {
            if secs > u64::MAX / 1000 {
                return Err(ConfigError::Invalid(format!(
                    "protocol.{key} is {secs}; it must be at most {}",
                    u64::MAX / 1000
                )));
            }
        }
        // An envelope stamped T is accepted from T - tolerance to T + tolerance,
        // and its nonce is forgotten `replay_window_secs` after it first arrived:
        // unless the window is longer than 2 * tolerance, a copy sent near
        // T + tolerance finds the nonce forgotten and passes as fresh.
        if p.replay_window_secs <= p.timestamp_tolerance_secs.saturating_mul(2) {
            return Err(ConfigError::Invalid(format!(
                "protocol.replay_window_secs ({}) must be more than twice protocol.timestamp_tolerance_secs ({}), or a replayed message is accepted once its nonce is forgotten",
                p.replay_window_secs, p.timestamp_tolerance_secs
            )));
        }
        if self.network.max_outbound_bytes < self.protocol.max_envelope_size as u64 {
            return Err(ConfigError::Invalid(format!(
                "network.max_outbound_bytes ({}) must be at least protocol.max_envelope_size ({})",
                self.network.max_outbound_bytes, self.protocol.max_envelope_size
            )));
        }
        let connections = usize::try_from(self.network.max_connections).unwrap_or(usize::MAX);
        if self.security.max_peers < connections {
            return Err(ConfigError::Invalid(format!(
                "security.max_peers ({}) must be at least network.max_connections ({connections}), so that a connected peer always finds room for its session",
                self.security.max_peers
            )));
        }
        let api = &self.api;
        if api.max_concurrent_requests == 0 || api.max_event_streams == 0 {
            return Err(ConfigError::Invalid(
                "api.max_concurrent_requests and api.max_event_streams must be at least 1".into(),
            ));
        }
        let body = crate::api::max_body_size(self.transfer.max_message_size);
        if api.max_body_bytes_in_flight < body {
            return Err(ConfigError::Invalid(format!(
                "api.max_body_bytes_in_flight ({}) must be at least the largest request body, transfer.max_message_size + 64 KiB ({body})",
                api.max_body_bytes_in_flight
            )));
        }
        if self.network.max_inbound_buffer_bytes < self.protocol.max_envelope_size {
            return Err(ConfigError::Invalid(format!(
                "network.max_inbound_buffer_bytes ({}) must be at least protocol.max_envelope_size ({})",
                self.network.max_inbound_buffer_bytes, self.protocol.max_envelope_size
            )));
        }
        self.network
            .validate_inbound(self.protocol.max_envelope_size)
            .map_err(ConfigError::Invalid)?;
        Ok(())
    }

    /// The core's inbound settings derived from this configuration.
    pub fn inbound(&self) -> peer_core::inbound::Config {
        peer_core::inbound::Config {
            max_envelope_size: self.protocol.max_envelope_size,
            replay: peer_core::replay::Config {
                tolerance_ms: self.protocol.timestamp_tolerance_secs * 1000,
                window_ms: self.protocol.replay_window_secs * 1000,
                capacity: self.protocol.replay_capacity,
            },
        }
    }

    /// The dial and request timeout.
    pub fn connection_timeout(&self) -> Duration {
        Duration::from_secs(self.network.connection_timeout_secs)
    }

    /// The configuration as TOML, for `peer config show`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("Config serialises to TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_protocol_parameters() {
        let c = Config::default();
        assert_eq!(c.protocol.timestamp_tolerance_secs, 60);
        assert_eq!(c.protocol.replay_window_secs, 300);
        assert_eq!(c.network.max_connections_per_peer, 3);
        assert_eq!(c.network.max_idle_secs, 300);
        assert_eq!(c.network.connection_timeout_secs, 10);
        assert!(c.api.listen.ip().is_loopback());
        assert_eq!(c.protocol.max_json_depth, 64);
        assert_eq!(c.api.max_concurrent_requests, 256);
        assert_eq!(c.api.max_body_bytes_in_flight, 320 << 20);
        assert_eq!(c.api.max_event_streams, 64);
        assert_eq!(c.heartbeat.interval_ms, 30_000);
        assert_eq!(c.heartbeat.missed_limit, 3);
        c.validate().expect("the defaults are valid");
    }

    #[test]
    fn api_caps_must_fit_one_largest_body_and_one_request() {
        let mut c = Config::default();
        c.transfer.max_message_size = 1 << 20;
        let body = (1 << 20) + 64 * 1024;
        c.api.max_body_bytes_in_flight = body;
        let c = c.validate().expect("exactly one largest body fits");
        let mut small = c.clone();
        small.api.max_body_bytes_in_flight = body - 1;
        let err = small.validate().expect_err("one byte short");
        assert!(
            err.to_string().contains("api.max_body_bytes_in_flight"),
            "{err}"
        );
        for zero in [
            |c: &mut Config| c.api.max_concurrent_requests = 0,
            |c: &mut Config| c.api.max_event_streams = 0,
        ] {
            let mut none = c.clone();
            zero(&mut none);
            let err = none.validate().expect_err("zero");
            assert!(err.to_string().contains("at least 1"), "{err}");
        }
        let mut one = c;
        one.api.max_concurrent_requests = 1;
        one.api.max_event_streams = 1;
        one.validate().expect("one of each");
    }

    #[test]
    fn file_then_flags_override_defaults_and_toml_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("peer.toml");
        std::fs::write(
            &file,
            "[protocol]\nmax_envelope_size = 65536\n[api]\nevent_buffer = 7\n",
        )
        .expect("write");
        let mut flags = toml::Table::new();
        flags.insert("data_dir".into(), dir.path().display().to_string().into());
        let mut api = toml::Table::new();
        api.insert("event_buffer".into(), 9.into());
        flags.insert("api".into(), api.into());
        let c = Config::load(Some(&file), flags).expect("loads");
        assert_eq!(c.protocol.max_envelope_size, 65536);
        assert_eq!(c.api.event_buffer, 9);
        assert_eq!(c.data_dir, dir.path());
        let back: Config = toml::from_str(&c.to_toml()).expect("parses");
        assert_eq!(back, c);
    }

    #[test]
    fn stream_limits_beyond_yamux_are_refused() {
        let mut t = toml::Table::new();
        let mut net = toml::Table::new();
        net.insert("max_concurrent_streams".into(), 481.into());
        t.insert("network".into(), net.into());
        let err = Config::load(None, t).expect_err("too many streams");
        assert!(err.to_string().contains("max_concurrent_streams"), "{err}");
    }

    #[test]
    fn a_database_cache_under_one_mib_is_refused() {
        let mut c = Config::default();
        c.store.cache_bytes = (1 << 20) - 1;
        let err = c.check().expect_err("too small");
        assert!(err.to_string().contains("store.cache_bytes"), "{err}");
        c.store.cache_bytes = 1 << 20;
        c.check().expect("1 MiB is enough");
    }

    fn with_replay(tolerance: u64, window: u64) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        c.protocol.timestamp_tolerance_secs = tolerance;
        c.protocol.replay_window_secs = window;
        c.validate()
    }

    #[test]
    fn the_replay_window_must_exceed_twice_the_tolerance() {
        let c = with_replay(60, 121).expect("121 > 2 * 60");
        assert_eq!(c.protocol.replay_window_secs, 121);
        for window in [120, 60, 0] {
            let err = with_replay(60, window).expect_err("window too short");
            let text = err.to_string();
            assert!(text.contains("replay_window_secs"), "{text}");
            assert!(text.contains("timestamp_tolerance_secs"), "{text}");
        }
        // No overflow on huge values: the milliseconds must fit in a u64.
        let huge = u64::MAX / 1000 + 1;
        let err = with_replay(60, huge).expect_err("window overflows");
        assert!(err.to_string().contains("replay_window_secs"), "{err}");
        let err = with_replay(huge / 2, huge - 1).expect_err("2 * tolerance > window");
        assert!(err.to_string().contains("twice"), "{err}");
    }

    fn with_inbound(tune: impl FnOnce(&mut NetworkConfig)) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        tune(&mut c.network);
        c.validate()
    }

    #[test]
    fn one_host_can_never_hold_the_whole_inbound_budget() {
        let c = Config::default();
        let n = &c.network;
        assert_eq!(n.max_inbound_bytes_per_connection, 2 * 1024 * 1024);
        assert_eq!(n.min_inbound_bytes_per_sec, 65_536);
        assert_eq!((n.max_connections_per_ip, n.max_pending_per_ip), (16, 8));
        c.clone().validate().expect("the defaults are valid");
        // 16 x 4 MiB is the whole 64 MiB budget: refused; 15 x 4 MiB is not.
        let err = with_inbound(|n| n.max_inbound_bytes_per_connection = 4 << 20)
            .expect_err("equal to the budget");
        assert!(err.to_string().contains("one host"), "{err}");
        with_inbound(|n| {
            n.max_inbound_bytes_per_connection = 4 << 20;
            n.max_connections_per_ip = 15;
        })
        .expect("60 MiB < 64 MiB");
        // A share larger than the budget is refused too.
        let err = with_inbound(|n| {
            n.max_connections_per_ip = 1;
            n.max_inbound_bytes_per_connection = n.max_inbound_buffer_bytes + 1;
        })
        .expect_err("over the budget");
        assert!(err.to_string().contains("less than"), "{err}");
        // The share holds at least one envelope of the largest size.
        let envelope = c.protocol.max_envelope_size;
        with_inbound(|n| n.max_inbound_bytes_per_connection = envelope).expect("one envelope");
        let err = with_inbound(|n| n.max_inbound_bytes_per_connection = envelope - 1)
            .expect_err("below one envelope");
        assert!(err.to_string().contains("max_envelope_size"), "{err}");
    }

    #[test]
    fn per_ip_bounds_and_the_minimum_rate_are_at_least_1() {
        with_inbound(|n| {
            n.max_connections_per_ip = 1;
            n.max_pending_per_ip = 1;
            n.min_inbound_bytes_per_sec = 1;
        })
        .expect("1 is allowed");
        type Tune = fn(&mut NetworkConfig);
        let zeroes: [(&str, Tune); 3] = [
            ("max_connections_per_ip", |n| n.max_connections_per_ip = 0),
            ("max_pending_per_ip", |n| n.max_pending_per_ip = 0),
            ("min_inbound_bytes_per_sec", |n| {
                n.min_inbound_bytes_per_sec = 0
            }),
        ];
        for (key, zero) in zeroes {
            let err = with_inbound(zero).expect_err("0 is refused");
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn the_store_queue_holds_at_least_one_sighting() {
        let mut c = Config::default();
        assert_eq!(c.network.store_queue, 1024);
        c.network.store_queue = 1;
        let mut c = c.validate().expect("1 is enough");
        c.network.store_queue = 0;
        let err = c.validate().expect_err("0 holds nothing");
        assert!(err.to_string().contains("network.store_queue"), "{err}");
    }

    #[test]
    fn every_connected_peer_has_room_for_its_rate_limit_buckets() {
        let mut c = Config::default();
        c.network.max_connections = 100;
        c.rate_limits.max_peers = 100;
        let mut c = c.validate().expect("as many senders as connections");
        c.rate_limits.max_peers = 99;
        let text = c.validate().expect_err("fewer").to_string();
        assert!(text.contains("rate_limits.max_peers (99)"), "{text}");
        assert!(text.contains("network.max_connections (100)"), "{text}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("peer.toml");
        std::fs::write(&file, "[protocol]\nmax_envelope_sise = 1\n").expect("write");
        let err = Config::load(Some(&file), toml::Table::new()).expect_err("typo");
        assert!(err.to_string().contains("max_envelope_sise"), "{err}");
    }
}
