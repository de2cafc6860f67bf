//! libp2p networking: the composed behaviour and the swarm that carries envelopes.
//! Protocol decisions are made by the node actor, never here.

pub mod codec;
pub mod dht;
pub mod ip_limits;
pub mod link;

use std::time::Duration;

use libp2p::kad::store::MemoryStore;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    PeerId, Swarm, SwarmBuilder, connection_limits, gossipsub, identify, identity, kad, mdns,
    noise, ping, request_response, tcp, yamux,
};
use peer_core::{EntityId, PublicKey};

use crate::config::Config;

mod behaviour {
    // The derive generates an event enum without docs.
    #![allow(missing_docs)]
    use super::*;

    /// Every libp2p protocol the node speaks.
    #[derive(NetworkBehaviour)]
    pub struct Behaviour {
        /// Bounds on connection counts.
        pub limits: connection_limits::Behaviour,
        /// Bounds on inbound connections per IPv4 address or IPv6 /64.
        pub ip_limits: ip_limits::Behaviour,
        /// Circuit breakers: no dial to a peer whose breaker is open.
        pub pool: crate::pool::behaviour::Behaviour,
        /// Exchanges listen addresses and protocol lists.
        pub identify: identify::Behaviour,
        /// Liveness: the pool's keep-alive validation of each connection.
        pub ping: ping::Behaviour,
        /// `/peer-protocol/1.2.0`: one envelope per stream (peers that do not
        /// speak the long-lived streams).
        pub envelopes: request_response::Behaviour<codec::Codec>,
        /// `/peer-protocol/stream/1.2.0`: long-lived envelope streams ([`link`]).
        pub streams: libp2p_stream::Behaviour,
        /// The DHT registry (off with `discovery.enabled = false`).
        pub kad: Toggle<kad::Behaviour<MemoryStore>>,
        /// Signed announces (off with `discovery.announce = false`).
        pub gossipsub: Toggle<gossipsub::Behaviour>,
        /// Peers on the local network (off with `discovery.mdns = false`, or
        /// when the host has no multicast).
        pub mdns: Toggle<mdns::tokio::Behaviour>,
    }
}
pub use behaviour::{Behaviour, BehaviourEvent};

/// Where an inbound request's answer goes: its own stream (the per-envelope
/// protocol) or its place on a long-lived stream.
#[derive(Debug)]
pub enum Channel {
    /// A `/peer-protocol/1.2.0` stream.
    Single(request_response::ResponseChannel<codec::Response>),
    /// A request on a `/peer-protocol/stream/1.2.0` stream.
    Link(link::Responder),
}

impl Channel {
    /// Sends `response`; nothing happens if the peer gave up waiting.
    pub fn answer(self, swarm: &mut Swarm<Behaviour>, response: codec::Response) {
        match self {
            Self::Single(c) => _ = swarm.behaviour_mut().envelopes.send_response(c, response),
            Self::Link(r) => _ = r.send(response),
        }
    }
}

/// A libp2p keypair from the entity's Ed25519 secret, so that the PeerId and the
/// entity id come from the same key.
pub fn keypair(secret: [u8; 32]) -> identity::Keypair {
    let mut secret = secret;
    identity::Keypair::ed25519_from_bytes(&mut secret).expect("32 bytes is a valid ed25519 secret")
}

/// The entity id of a peer, read from its PeerId (Ed25519 PeerIds embed the key).
/// `None` for peers with other key types.
pub fn entity_of(peer: &PeerId) -> Option<EntityId> {
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    let key = identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    let key = key.try_into_ed25519().ok()?;
    Some(EntityId::of(&PublicKey(key.to_bytes())))
}

/// Builds the swarm (TCP + Noise + Yamux, and QUIC) for `config`, and the
/// root codec of its inbound envelopes (for [`link::Links::start`]: inbound
/// streams of both envelope protocols share one byte budget).
/// `network.connection_timeout_secs` bounds both the setup of a connection
/// (dial or accept, through the Noise and Yamux upgrades) and each request.
pub fn build_swarm(
    key: identity::Keypair,
    config: &Config,
) -> Result<(Swarm<Behaviour>, codec::Codec), Box<dyn std::error::Error + Send + Sync>> {
    let net = &config.network;
    let timeout = config.connection_timeout();
    let inbound = codec::Limits {
        max_size: config.protocol.max_envelope_size,
        node_bytes: net.max_inbound_buffer_bytes,
        connection_bytes: net.max_inbound_bytes_per_connection,
        min_rate: net.min_inbound_bytes_per_sec,
    };
    let ip_limits = ip_limits::Limits {
        established: net.max_connections_per_ip,
        pending: net.max_pending_per_ip,
        new_per_minute: net.new_connections_per_ip_per_min,
        new_burst: net.new_connections_per_ip_burst,
    };
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established_per_peer(Some(net.max_connections_per_peer))
        .with_max_established(Some(net.max_connections))
        .with_max_pending_incoming(Some(net.max_pending_incoming));
    let rr_config = request_response::Config::default()
        .with_request_timeout(timeout)
        .with_max_concurrent_streams(net.max_concurrent_streams);
    let idle = Duration::from_secs(net.max_idle_secs);
    let root = codec::Codec::new(inbound);
    let links_root = root.sibling();
    let discovery = &config.discovery;
    let swarm = SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_behaviour(
            |key| -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
                Ok(Behaviour {
                    limits: connection_limits::Behaviour::new(limits),
                    ip_limits: ip_limits::Behaviour::new(ip_limits),
                    pool: crate::pool::behaviour::Behaviour::new(&config.pool),
                    identify: identify::Behaviour::new(identify::Config::new(
                        "/peer-protocol/id/1.2.0".into(),
                        key.public(),
                    )),
                    ping: ping::Behaviour::new(
                        ping::Config::new()
                            .with_interval(Duration::from_secs(config.pool.keep_alive_secs))
                            .with_timeout(timeout),
                    ),
                    envelopes: request_response::Behaviour::with_codec(
                        root,
                        [(codec::PROTOCOL, request_response::ProtocolSupport::Full)],
                        rr_config,
                    ),
                    streams: libp2p_stream::Behaviour::new(),
                    kad: Toggle::from(
                        discovery
                            .enabled
                            .then(|| dht::kademlia(key.public().to_peer_id(), discovery)),
                    ),
                    gossipsub: Toggle::from(
                        (discovery.enabled && discovery.announce)
                            .then(|| dht::gossipsub(key, discovery))
                            .transpose()?,
                    ),
                    mdns: Toggle::from(
                        (discovery.enabled && discovery.mdns)
                            .then(|| {
                                mdns::tokio::Behaviour::new(
                                    mdns::Config::default(),
                                    key.public().to_peer_id(),
                                )
                                .inspect_err(
                                    |e| tracing::warn!(error = %e, "mDNS is off: cannot start it"),
                                )
                                .ok()
                            })
                            .flatten(),
                    ),
                })
            },
        )?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(idle)
                // Propose a stream's protocol and send on it at once instead of
                // waiting a round trip for the answer (every request opens a
                // stream). The peers a node speaks to run the same protocols;
                // one that does not refuses the stream, as it would have.
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .with_connection_timeout(timeout)
        .build();
    Ok((swarm, links_root))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use futures::StreamExt;
    use libp2p::swarm::SwarmEvent;

    use super::*;

    #[tokio::test]
    async fn a_dial_to_a_silent_listener_ends_after_the_connection_timeout() {
        // The kernel completes the TCP handshake, then nothing ever answers the
        // Noise handshake: only the connection timeout ends the dial (libp2p's
        // default is 10 s).
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = silent.local_addr().expect("addr").port();
        let mut config = Config::default();
        config.network.connection_timeout_secs = 1;
        let (mut swarm, _) = build_swarm(keypair([7; 32]), &config).expect("swarm");
        let started = Instant::now();
        swarm
            .dial(
                format!("/ip4/127.0.0.1/tcp/{port}")
                    .parse::<libp2p::Multiaddr>()
                    .expect("addr"),
            )
            .expect("dial starts");
        let failed = tokio::time::timeout(Duration::from_secs(6), async {
            loop {
                if let SwarmEvent::OutgoingConnectionError { error, .. } =
                    swarm.select_next_some().await
                {
                    return error;
                }
            }
        })
        .await
        .expect("the dial fails well before libp2p's default 10 s");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900), "{took:?}: {failed}");
        drop(silent);
    }

    #[test]
    fn peer_id_and_entity_id_come_from_the_same_key() {
        let me = peer_core::Identity::from_secret(&[3; 32]);
        let kp = keypair(me.secret_bytes());
        assert_eq!(entity_of(&kp.public().to_peer_id()), Some(me.entity_id()));
    }
}
