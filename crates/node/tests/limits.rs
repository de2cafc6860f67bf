//! Bounds on what one connection or one host can take of a node, tested with
//! real swarms on loopback: a connection's share of the inbound budget, and the
//! per-IP connection caps.
//!
//! An "attacker" host is 127.0.0.2: `RawPeer::connect_from` (in `common`) dials
//! over QUIC from it.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use futures::prelude::*;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{StreamProtocol, Swarm, SwarmBuilder, noise, tcp, yamux};
use peer_core::{Envelope, Identity};
use peer_node::net;
use peer_node::net::codec::{PROTOCOL, Response};
use tokio::sync::oneshot;

mod common;
use common::{LIMIT, RawPeer, TestNode, quic_addr, start_node_with, wait_disconnected};

/// What the test client sends on one stream.
#[derive(Debug)]
enum Out {
    /// A frame header declaring `len` bytes, and then none of them: tells
    /// `started` once the header is flushed, then waits for `release` (or its
    /// sender's drop) and fails the stream.
    Held {
        len: u32,
        started: oneshot::Sender<()>,
        release: oneshot::Receiver<()>,
    },
    /// A whole frame.
    Whole(Vec<u8>),
}

/// A client codec that can hold a stream open mid-body. Responses are returned
/// as raw bytes (kind byte first).
#[derive(Debug, Clone, Default)]
struct Holder;

impl request_response::Codec for Holder {
    type Protocol = StreamProtocol;
    type Request = Out;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, _: &mut T) -> io::Result<Out>
    where
        T: AsyncRead + Unpin + Send,
    {
        Err(io::Error::other("the test client takes no requests"))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut bytes = Vec::new();
        io.read_to_end(&mut bytes).await?;
        Ok(bytes)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Out) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            Out::Held {
                len,
                started,
                release,
            } => {
                io.write_all(&len.to_be_bytes()).await?;
                io.flush().await?;
                _ = started.send(());
                _ = release.await;
                Err(io::Error::other("released"))
            }
            Out::Whole(bytes) => {
                let len = u32::try_from(bytes.len()).expect("small");
                io.write_all(&len.to_be_bytes()).await?;
                io.write_all(&bytes).await?;
                io.close().await
            }
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        Err(io::Error::other("the test client sends no responses"))
    }
}

type HolderSwarm = Swarm<request_response::Behaviour<Holder>>;

/// A TCP client with the [`Holder`] codec, connected to `node`.
async fn holder(node: &TestNode, identity: &Identity) -> HolderSwarm {
    let mut swarm = SwarmBuilder::with_existing_identity(net::keypair(identity.secret_bytes()))
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                Holder,
                [(PROTOCOL, ProtocolSupport::Outbound)],
                request_response::Config::default(),
            )
        })
        .expect("behaviour")
        .build();
    swarm.dial(node.addr.clone()).expect("dial");
    loop {
        if let SwarmEvent::ConnectionEstablished { .. } = swarm.select_next_some().await {
            return swarm;
        }
    }
}

/// A signed `ping` from `identity` to `node`.
fn ping(identity: &Identity, node: &TestNode) -> Vec<u8> {
    let d = peer_core::Draft {
        msg_type: "ping".parse().expect("type"),
        message_id: peer_core::MessageId::from_random(rand::random()),
        recipient_id: Some(node.handle.entity_id()),
        session_id: None,
        sequence_num: 0,
        timestamp_ms: peer_node::node::now_ms(),
        nonce: rand::random(),
        payload: br#"{"n":1}"#.to_vec(),
    };
    d.sign(identity).encode()
}

/// Whether `bytes` are a kind-1 answer carrying a `pong`.
fn is_pong(bytes: &[u8]) -> bool {
    bytes.first() == Some(&1)
        && Envelope::decode(&bytes[5..]).is_ok_and(|env| env.msg_type.as_str() == "pong")
}

/// The answer to request `id`, if `event` is it: `Ok(bytes)` or `Err(failure)`.
fn answer(
    id: OutboundRequestId,
    event: SwarmEvent<request_response::Event<Out, Vec<u8>>>,
) -> Option<Result<Vec<u8>, String>> {
    match event {
        SwarmEvent::Behaviour(request_response::Event::Message {
            message:
                request_response::Message::Response {
                    request_id,
                    response,
                },
            ..
        }) if request_id == id => Some(Ok(response)),
        SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
            request_id,
            error,
            ..
        }) if request_id == id => Some(Err(error.to_string())),
        _ => None,
    }
}

#[tokio::test]
async fn one_connection_using_its_share_does_not_hold_up_another() {
    // Each connection may buffer one envelope of the largest size; the node
    // three. Were the share per stream, the attacker's three held streams would
    // take the node's whole budget; were it per node, its first one would. The
    // minimum rate is 1 byte/s and the request timeout 60 s, so the node keeps
    // the held streams (and with a shared share, holds up the honest peer)
    // until well past the end of the test.
    let node = start_node_with("/ip4/127.0.0.1/tcp/0", |c| {
        c.protocol.max_envelope_size = LIMIT;
        c.network.max_inbound_bytes_per_connection = LIMIT;
        c.network.max_inbound_buffer_bytes = 3 * LIMIT;
        c.network.max_connections_per_ip = 2;
        c.network.min_inbound_bytes_per_sec = 1;
        c.network.connection_timeout_secs = 60;
    })
    .await;
    let mut honest = RawPeer::connect(&node.addr).await;
    let attacker_id = Identity::from_secret(&rand::random());
    let mut attacker = holder(&node, &attacker_id).await;
    let peer = *attacker.connected_peers().next().expect("connected");

    // Three streams declare a full envelope each and send nothing more.
    let mut releases = Vec::new();
    let mut started = Vec::new();
    for _ in 0..3 {
        let (started_tx, started_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        let held = Out::Held {
            len: u32::try_from(LIMIT).expect("small"),
            started: started_tx,
            release: release_rx,
        };
        attacker.behaviour_mut().send_request(&peer, held);
        releases.push(release_tx);
        started.push(started_rx);
    }
    let mut all_started = future::join_all(started);
    loop {
        tokio::select! {
            _ = &mut all_started => break,
            _ = attacker.select_next_some() => {}
        }
    }
    // A small, valid message on the same connection waits behind them...
    let queued = attacker
        .behaviour_mut()
        .send_request(&peer, Out::Whole(ping(&attacker_id, &node)));
    // ...while another connection's message is answered.
    let honest_ping = honest.draft(node.handle.entity_id(), "ping");
    let answered = tokio::time::timeout(
        Duration::from_secs(10),
        honest.request(honest_ping.sign(&honest.identity).encode()),
    );
    tokio::pin!(answered);
    let response = loop {
        tokio::select! {
            response = &mut answered => break response.expect("not held up by the other connection"),
            event = attacker.select_next_some() => {
                if let Some(a) = answer(queued, event) {
                    panic!("answered while its connection's share was taken: {a:?}");
                }
            }
        }
    };
    let Response::Reply(bytes) = response else {
        panic!("expected a pong, got {response:?}");
    };
    let pong = Envelope::decode(&bytes).expect("decodes");
    assert_eq!(pong.msg_type.as_str(), "pong");

    // Once the held streams give up, the queued message goes through.
    drop(releases);
    let got = loop {
        if let Some(a) = answer(queued, attacker.select_next_some().await) {
            break a;
        }
    };
    let bytes = got.expect("answered once the share is free");
    assert!(is_pong(&bytes), "{bytes:?}");
}

/// A peer with a fresh PeerId that connects to `node` over QUIC from `ip`
/// and pings it: `Ok` if it answers, `Err` with what happened if the
/// connection was refused or closed.
async fn connect_from(ip: &str, node: &TestNode) -> Result<RawPeer, String> {
    RawPeer::try_connect_from(ip, &quic_addr(node).await).await
}

#[tokio::test]
async fn connections_from_one_ip_beyond_the_cap_are_denied_while_other_hosts_connect() {
    let node = start_node_with("/ip4/127.0.0.1/udp/0/quic-v1", |c| {
        c.network.max_connections_per_ip = 2;
    })
    .await;
    let first = connect_from("127.0.0.2", &node).await.expect("first");
    let _second = connect_from("127.0.0.2", &node).await.expect("second");
    // Fresh PeerIds do not help: the third from the same address is denied.
    let third = connect_from("127.0.0.2", &node).await;
    assert!(third.is_err(), "third from 127.0.0.2 denied");
    // Other hosts still get in.
    let _other = connect_from("127.0.0.3", &node)
        .await
        .expect("another address");
    let _local = connect_from("127.0.0.1", &node).await.expect("and another");
    // A closed connection frees its place.
    let id = first.entity_id();
    drop(first);
    wait_disconnected(&node.handle, id).await;
    let _again = connect_from("127.0.0.2", &node)
        .await
        .expect("room again after a close");
}

/// Reads what `stream` has: `Ok(0)` when the other side closed it.
async fn read_some(stream: &tokio::net::TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            read => return read,
        }
    }
}

#[tokio::test]
async fn handshakes_from_one_ip_beyond_the_pending_cap_are_dropped() {
    // Long enough that the held handshakes stay pending through the test.
    let node = start_node_with("/ip4/127.0.0.1/tcp/0", |c| {
        c.network.max_pending_per_ip = 2;
        c.network.connection_timeout_secs = 60;
    })
    .await;
    let port = node
        .addr
        .iter()
        .find_map(|p| match p {
            Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .expect("tcp port");
    let target = SocketAddr::from(([127, 0, 0, 1], port));
    let from = |ip: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::from((ip, 0))).expect("bind source");
        socket.connect(target).await.expect("tcp connect")
    };
    // Two connections from 127.0.0.2 that never start their handshake.
    let held = [from([127, 0, 0, 2]).await, from([127, 0, 0, 2]).await];
    // The node takes connections in order, so the third is over the cap: it
    // is closed at once.
    let third = from([127, 0, 0, 2]).await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(20), read_some(&third, &mut buf))
        .await
        .expect("the node closes the third");
    assert!(
        matches!(read, Ok(0)) || read.is_err(),
        "closed, not answered: {read:?}"
    );
    // The first two are still open, waiting for their handshake.
    for stream in &held {
        let err = stream.try_read(&mut buf).expect_err("no data, no close");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }
    // Another host still connects, through the whole handshake.
    let mut honest = RawPeer::connect(&node.addr).await;
    let env = honest.draft(node.handle.entity_id(), "ping");
    assert!(matches!(
        honest.request(env.sign(&honest.identity).encode()).await,
        Response::Reply(_)
    ));
}

#[tokio::test]
async fn new_connections_from_one_ip_beyond_its_rate_are_refused_while_other_hosts_connect() {
    let node = start_node_with("/ip4/127.0.0.1/udp/0/quic-v1", |c| {
        c.network.new_connections_per_ip_burst = 2;
        c.network.new_connections_per_ip_per_min = 1;
    })
    .await;
    // Two come and go; the third new connection from the same address is
    // refused although none of the first two is still open.
    for _ in 0..2 {
        let first = connect_from("127.0.0.2", &node)
            .await
            .expect("within the burst");
        let id = first.entity_id();
        drop(first);
        wait_disconnected(&node.handle, id).await;
    }
    let third = connect_from("127.0.0.2", &node).await;
    assert!(third.is_err(), "over 127.0.0.2's rate");
    let _other = connect_from("127.0.0.3", &node)
        .await
        .expect("another address has its own");
}
