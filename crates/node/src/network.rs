//! What a service asks of the discovery protocols (Kademlia, gossipsub,
//! mDNS, dials), and what they report back. A service queues [`NetOp`]s
//! through [`crate::service::Context::network`]; the actor applies them to
//! the swarm once the service has returned, and hands the behaviours' events
//! to every service as [`NetEvent`]s ([`crate::service::Service::on_network`]).
//! A lookup carries a token the service chooses; its results come back with
//! it.

use libp2p::kad::{ProviderRecord, Record};
use libp2p::{Multiaddr, PeerId, gossipsub};
use peer_core::EntityId;

/// One action on the network.
#[derive(Debug)]
pub enum NetOp {
    /// Stores `record` locally and at the k nodes closest to its key.
    Put(Record),
    /// Stores an inbound record locally (after the service checked it).
    Store(Record),
    /// Forgets a record held locally.
    Remove(Vec<u8>),
    /// Looks a record up; its results come back with `token`.
    Get {
        /// The key.
        key: Vec<u8>,
        /// The service's token.
        token: u64,
    },
    /// Announces this node as a provider of `key` (and again every
    /// refresh interval).
    Provide(Vec<u8>),
    /// Stops providing `key`.
    StopProviding(Vec<u8>),
    /// Stores an inbound provider entry locally (after the service checked it).
    StoreProvider(ProviderRecord),
    /// Looks the providers of a key up.
    GetProviders {
        /// The key.
        key: Vec<u8>,
        /// The service's token.
        token: u64,
    },
    /// Looks up the peers closest to `key` (a random key for a random walk).
    Closest {
        /// The key.
        key: Vec<u8>,
        /// The service's token.
        token: u64,
    },
    /// Ends the lookup of `token` (enough was found).
    Finish(u64),
    /// Runs a Kademlia bootstrap (needs a known peer).
    Bootstrap,
    /// Adds an address of a peer to the routing table.
    AddAddress(PeerId, Multiaddr),
    /// Publishes `data` on the announce topic.
    Announce(Vec<u8>),
    /// The verdict on a gossip message: accepted ones are forwarded,
    /// rejected ones dropped and their forwarder penalised, ignored ones
    /// dropped.
    Validate {
        /// The message.
        id: gossipsub::MessageId,
        /// Who forwarded it.
        source: PeerId,
        /// The verdict.
        verdict: gossipsub::MessageAcceptance,
    },
    /// Dials `peer` at `addrs` (and at any address the swarm knows).
    Dial(PeerId, Vec<Multiaddr>),
    /// A connection to this entity is needed: every service hears
    /// [`NetEvent::Wanted`].
    Want(EntityId),
    /// Messages waiting for a connection to this entity fail: it could not
    /// be found (`None`), or not reached (why).
    Unreachable(EntityId, Option<String>),
}

/// A lookup's progress.
#[derive(Debug)]
pub enum Found {
    /// A record (not yet checked).
    Record(Record),
    /// Providers of the key.
    Providers(Vec<PeerId>),
    /// Peers close to the key, with their addresses.
    Peers(Vec<(PeerId, Vec<Multiaddr>)>),
    /// The lookup ended; nothing more comes with this token.
    Done,
}

/// What the network reports.
#[derive(Debug)]
pub enum NetEvent {
    /// Progress of a lookup the service started.
    Lookup {
        /// The service's token.
        token: u64,
        /// What came.
        found: Found,
        /// Requests the lookup had sent so far, and answers it got.
        requests: u32,
    },
    /// A peer asks this node to hold a record.
    InboundRecord {
        /// The peer.
        source: PeerId,
        /// The record.
        record: Record,
    },
    /// A peer asks this node to hold a provider entry.
    InboundProvider {
        /// The peer.
        source: PeerId,
        /// The entry.
        record: ProviderRecord,
    },
    /// A gossip message (its verdict is owed: [`NetOp::Validate`]).
    Gossip {
        /// Its id.
        id: gossipsub::MessageId,
        /// Who forwarded it.
        source: PeerId,
        /// Its payload.
        data: Vec<u8>,
    },
    /// A peer subscribed to the announce topic.
    Subscribed(PeerId),
    /// Peers seen on the local network.
    Mdns(Vec<(PeerId, Multiaddr)>),
    /// A connected peer identified itself.
    Identified {
        /// The peer.
        peer: PeerId,
        /// The addresses it listens on.
        listen_addrs: Vec<Multiaddr>,
        /// Whether it serves the DHT.
        kad: bool,
    },
    /// A dial failed.
    DialFailed(Option<PeerId>, String),
    /// The agent connected to this peer itself (`POST /v1/peers`).
    AgentConnected(EntityId),
    /// A service needs a connection to this entity (a message waits).
    Wanted(EntityId),
    /// This node's listen addresses changed.
    ListenAddrs(Vec<Multiaddr>),
}
