//! The Peer Protocol v1.2 node: storage, libp2p networking, the node actor and
//! the local HTTP API.
//!
//! One task (the actor) owns the swarm and the state its services share (the
//! end-to-end sessions of [`secure`], rate limits, counters); each capability is
//! a [`service`] with its own state, reached through a context that collects
//! its effects. Everything else holds a [`NodeHandle`] and talks to the actor
//! through a bounded command channel. [`run`] starts a node and its API until
//! shutdown.

mod actor;
pub mod api;
pub mod clock;
pub mod config;
pub mod data_dir;
pub mod inbox;
pub mod json;
pub mod net;
pub mod network;
pub mod node;
mod outbox;
pub mod pool;
pub mod ratelimit;
pub mod secure;
pub mod service;
pub mod services;
pub mod stats;
pub mod store;

pub use services::transfer;

pub use config::Config;
/// The libp2p version the node is built on, for embedders that need its types.
pub use libp2p;
pub use node::{NodeError, NodeHandle};

use std::future::Future;
use std::path::PathBuf;

/// Why `run` stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The data directory is unusable.
    #[error(transparent)]
    DataDir(#[from] data_dir::DataDirError),
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The network could not start.
    #[error(transparent)]
    Start(#[from] node::StartError),
    /// The API could not be served.
    #[error("local API on {addr}: {source}; pick another with --api HOST:PORT")]
    Api {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// A fresh identity seed and API token from the OS's cryptographic RNG.
pub fn fresh_secrets() -> ([u8; 32], [u8; 32]) {
    (rand::random(), rand::random())
}

/// Runs a node with its local API until `shutdown` completes: creates the
/// identity on first start, opens the database, starts the network, serves the
/// API and writes its bound address to `<data_dir>/api.addr`.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let secrets = data_dir::init(&config.data_dir, fresh_secrets)?;
    if secrets.token_created && !secrets.created {
        tracing::warn!(
            path = %config.data_dir.join(data_dir::TOKEN_FILE).display(),
            "the API token was missing; created a new one"
        );
    }
    let store = store::Store::open_with(&config.data_dir.join(data_dir::DB_FILE), &config.store)?;
    store.set_meta(
        "entity_id",
        secrets.identity.entity_id().to_string().as_bytes(),
    )?;
    let api = config.api.clone();
    let api_addr = api.listen;
    let data_dir = config.data_dir.clone();
    let handle = node::start(config, secrets.identity, store)?;
    let api_err = |source| RunError::Api {
        addr: api_addr.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(api_addr)
        .await
        .map_err(api_err)?;
    let bound = listener.local_addr().map_err(api_err)?;
    let addr_file = data_dir.join(data_dir::API_ADDR_FILE);
    std::fs::write(&addr_file, format!("{bound}\n"))
        .map_err(|e| RunError::Io(addr_file.clone(), e))?;
    tracing::info!(entity_id = %handle.entity_id(), peer_id = %handle.peer_id(), api = %bound, "node running");
    let stopping = tokio_util::sync::CancellationToken::new();
    let cancel = stopping.clone();
    tokio::spawn(async move {
        shutdown.await;
        cancel.cancel();
    });
    let router = api::router(handle, &api, secrets.api_token, stopping.clone());
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(stopping.cancelled_owned())
        .await;
    _ = std::fs::remove_file(&addr_file);
    served.map_err(api_err)
}
