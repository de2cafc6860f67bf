//! Helpers shared by the node's integration tests.

use std::time::Duration;

use libp2p::Multiaddr;
use peer_node::node::{self, NodeHandle};
use peer_node::store::Store;
use peer_node::{Config, data_dir};

/// A node running in this process, with its data directory.
pub struct TestNode {
    pub handle: NodeHandle,
    pub addr: Multiaddr,
    _dir: tempfile::TempDir,
}

/// Starts a node listening on `listen` (port 0) with `tune` applied to its config,
/// and waits until it listens.
pub async fn start_node_with(listen: &str, tune: impl FnOnce(&mut Config)) -> TestNode {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.network.listen = vec![listen.parse().expect("addr")];
    tune(&mut config);
    let secrets = data_dir::init(dir.path(), peer_node::fresh_secrets).expect("init");
    let store = Store::open(&dir.path().join(data_dir::DB_FILE)).expect("store");
    let handle = node::start(config, secrets.identity, store).expect("start");
    let addr = loop {
        if let Some(a) = handle.listen_addrs().await.expect("addrs").first() {
            break a.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    TestNode {
        handle,
        addr,
        _dir: dir,
    }
}
