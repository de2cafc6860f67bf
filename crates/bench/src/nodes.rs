//! Nodes started in this process, each in its own data directory.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::ValueEnum;
use peer_node::libp2p::Multiaddr;
use peer_node::libp2p::multiaddr::Protocol;
use peer_node::node::{self, NodeHandle};
use peer_node::store::Store;
use peer_node::{Config, data_dir};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

/// A transport between nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// TCP with Noise and Yamux.
    Tcp,
    /// QUIC.
    Quic,
}

impl Transport {
    /// The address to listen on at `ip`, port 0.
    pub fn listen(self, ip: &str) -> Result<Multiaddr> {
        Ok(match self {
            Self::Tcp => format!("/ip4/{ip}/tcp/0"),
            Self::Quic => format!("/ip4/{ip}/udp/0/quic-v1"),
        }
        .parse()?)
    }

    fn carries(self, addr: &Multiaddr) -> bool {
        let quic = addr.iter().any(|p| p == Protocol::QuicV1);
        quic == (self == Self::Quic)
    }
}

/// Starts a node with `config` (its `data_dir` replaced by `dir`, mDNS off:
/// benchmark nodes meet only whom they are told) and a fresh identity. Call
/// it on a tokio runtime: the node's actor is spawned on it.
pub fn start(dir: &Path, config: Config) -> Result<NodeHandle> {
    let mut config = Config {
        data_dir: dir.to_path_buf(),
        ..config
    };
    config.discovery.mdns = false;
    let secrets = data_dir::init(dir, peer_node::fresh_secrets)?;
    let store = Store::open(&dir.join(data_dir::DB_FILE))?;
    Ok(node::start(config, secrets.identity, store)?)
}

/// The address `node` listens on over `transport`, once it listens (5 s at most).
pub async fn listen_addr(node: &NodeHandle, transport: Transport) -> Result<Multiaddr> {
    for _ in 0..500 {
        let addrs = node.listen_addrs().await?;
        if let Some(a) = addrs.into_iter().find(|a| transport.carries(a)) {
            return Ok(a);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("the node did not start listening on {transport:?}")
}

/// Reads `node`'s event stream on a task of its own until the node stops, as
/// an agent would, acknowledging what it read: after every 256 stored events,
/// and whenever it has caught up.
pub fn drain_events(node: &NodeHandle) {
    let mut events = node.subscribe();
    let node = node.clone();
    tokio::spawn(async move {
        let (mut last, mut since) = (None, 0);
        loop {
            let event = match events.try_recv() {
                Ok(event) => event,
                Err(TryRecvError::Lagged(_)) => continue,
                Err(TryRecvError::Closed) => break,
                Err(TryRecvError::Empty) => {
                    if let Some(id) = last.take() {
                        _ = node.ack(id).await;
                        since = 0;
                    }
                    match events.recv().await {
                        Ok(event) => event,
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => break,
                    }
                }
            };
            if let Some(id) = event.event_id() {
                last = Some(id);
                since += 1;
                if since >= 256 {
                    _ = node.ack(id).await;
                    (last, since) = (None, 0);
                }
            }
        }
    });
}

/// The value of the counter or gauge `name` (such as
/// `peer_envelopes_signed_total`) in `node`'s Prometheus metrics; 0 if absent.
pub fn metric(node: &NodeHandle, name: &str) -> u64 {
    let text = node.metrics().encode();
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}
