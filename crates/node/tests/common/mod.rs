//! Helpers shared by the node's integration tests.

#![allow(dead_code)] // each test file uses a different part

use std::time::Duration;

use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};
use peer_core::session::{self, Link, Message, Random, Session};
use peer_core::{Draft, EntityId, Envelope, Identity, MessageId};
use peer_node::config::ProtocolConfig;
use peer_node::net::codec::{Frame, Request, Response};
use peer_node::net::{self, Behaviour, BehaviourEvent};
use peer_node::node::{self, NodeHandle, now_ms};
use peer_node::store::Store;
use peer_node::{Config, data_dir};

/// Envelope size limit the raw-peer tests give their nodes.
pub const LIMIT: usize = 64 * 1024;

/// A node running in this process, with its data directory.
pub struct TestNode {
    pub handle: NodeHandle,
    pub addr: Multiaddr,
    pub dir: tempfile::TempDir,
}

/// Starts a node listening on `listen` (port 0) with `tune` applied to its config,
/// and waits until it listens.
pub async fn start_node_with(listen: &str, tune: impl FnOnce(&mut Config)) -> TestNode {
    start_node_built(listen, tune, |b| b).await
}

/// As [`start_node_with`], with `build` applied to the node's builder (to add
/// services or a clock).
pub async fn start_node_built(
    listen: &str,
    tune: impl FnOnce(&mut Config),
    build: impl FnOnce(node::Builder) -> node::Builder,
) -> TestNode {
    start_node_in(tempfile::tempdir().expect("tempdir"), listen, tune, build).await
}

/// As [`start_node_built`], in the data directory `dir` (a node started again
/// in the same directory keeps its identity and database).
pub async fn start_node_in(
    dir: tempfile::TempDir,
    listen: &str,
    tune: impl FnOnce(&mut Config),
    build: impl FnOnce(node::Builder) -> node::Builder,
) -> TestNode {
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.network.listen = vec![listen.parse().expect("addr")];
    // Tests run side by side on one host: mDNS would connect them all.
    config.discovery.mdns = false;
    tune(&mut config);
    let secrets = data_dir::init(dir.path(), peer_node::fresh_secrets).expect("init");
    let store = Store::open(&dir.path().join(data_dir::DB_FILE)).expect("store");
    let handle = build(node::Builder::new(config, secrets.identity, store))
        .start()
        .expect("start");
    let addr = loop {
        if let Some(a) = handle.listen_addrs().await.expect("addrs").first() {
            break a.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    TestNode { handle, addr, dir }
}

/// Stops `node` and starts it again in the same data directory (same
/// identity and database), listening on `listen`, with `tune` applied.
pub async fn restart(node: TestNode, listen: &str, tune: impl FnOnce(&mut Config)) -> TestNode {
    let TestNode { handle, dir, .. } = node;
    drop(handle);
    reopen(dir, listen, tune).await
}

/// Starts a node again in `dir` once the node that ran there has let go of
/// its database.
pub async fn reopen(
    dir: tempfile::TempDir,
    listen: &str,
    tune: impl FnOnce(&mut Config),
) -> TestNode {
    let db = dir.path().join(data_dir::DB_FILE);
    for _ in 0..500 {
        // The database is free once the stopped node has let go of it.
        if Store::open(&db).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start_node_in(dir, listen, tune, |b| b).await
}

/// The configuration of a raw peer's swarm: it reads replies up to four
/// times [`LIMIT`], and speaks no discovery protocol.
fn raw_config() -> Config {
    let mut config = Config {
        protocol: ProtocolConfig {
            max_envelope_size: 4 * LIMIT,
            ..ProtocolConfig::default()
        },
        ..Config::default()
    };
    config.discovery.enabled = false;
    config
}

/// A peer that speaks the wire protocol directly, so it can send any bytes.
pub struct RawPeer {
    pub swarm: Swarm<Behaviour>,
    pub identity: Identity,
    pub target: PeerId,
}

impl RawPeer {
    pub async fn connect(addr: &Multiaddr) -> Self {
        Self::connect_as(Identity::from_secret(&rand::random()), addr).await
    }

    /// Connects as `identity`.
    pub async fn connect_as(identity: Identity, addr: &Multiaddr) -> Self {
        let (mut swarm, _) =
            net::build_swarm(net::keypair(identity.secret_bytes()), &raw_config()).expect("swarm");
        swarm.dial(addr.clone()).expect("dial");
        let target = loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => break peer_id,
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    panic!("could not connect to {addr}: {error}")
                }
                _ => {}
            }
        };
        Self {
            swarm,
            identity,
            target,
        }
    }

    pub fn draft(&self, to: EntityId, msg_type: &str) -> Draft {
        Draft {
            msg_type: msg_type.parse().expect("msg_type"),
            message_id: MessageId::from_random(rand::random()),
            recipient_id: Some(to),
            session_id: None,
            sequence_num: 0,
            timestamp_ms: now_ms(),
            nonce: rand::random(),
            payload: br#"{"n":1}"#.to_vec(),
        }
    }

    /// Sends raw bytes; returns `None` if accepted, else the error code.
    pub async fn send(&mut self, bytes: Vec<u8>) -> Option<String> {
        error_code(self.request(bytes).await)
    }

    /// Sends raw bytes and returns the node's response.
    pub async fn request(&mut self, bytes: Vec<u8>) -> Response {
        self.try_request(bytes)
            .await
            .unwrap_or_else(|e| panic!("request failed: {e}"))
    }

    /// Sends raw bytes; the node's response, or why there is none (the request
    /// failed, or the connection closed).
    pub async fn try_request(&mut self, bytes: Vec<u8>) -> Result<Response, String> {
        let id = self.send_raw(bytes);
        loop {
            match self.next_answer().await {
                (Some(answered), result) if answered == id => return result,
                (None, Err(closed)) => return Err(closed),
                _ => {}
            }
        }
    }

    /// Sends raw bytes as a request; its answer comes from `next_answer`.
    fn send_raw(&mut self, bytes: Vec<u8>) -> OutboundRequestId {
        self.swarm
            .behaviour_mut()
            .envelopes
            .send_request(&self.target, Request::Envelope(Frame::outbound(bytes)))
    }

    /// Drives the swarm to the next answer: a request's response or failure,
    /// or (with no request) the connection closing.
    async fn next_answer(&mut self) -> (Option<OutboundRequestId>, Result<Response, String>) {
        loop {
            match self.swarm.select_next_some().await {
                SwarmEvent::Behaviour(BehaviourEvent::Envelopes(
                    request_response::Event::Message {
                        message:
                            request_response::Message::Response {
                                request_id,
                                response,
                            },
                        ..
                    },
                )) => return (Some(request_id), Ok(response)),
                SwarmEvent::Behaviour(BehaviourEvent::Envelopes(
                    request_response::Event::OutboundFailure {
                        request_id, error, ..
                    },
                )) => return (Some(request_id), Err(error.to_string())),
                SwarmEvent::ConnectionClosed { cause, .. } => {
                    return (None, Err(format!("closed: {cause:?}")));
                }
                _ => {}
            }
        }
    }

    /// Connects over QUIC from `ip`, a loopback address other than 127.0.0.1
    /// (another host, as the node sees it), to `addr`, the node's QUIC address.
    pub async fn connect_from(ip: &str, addr: &Multiaddr) -> Self {
        Self::try_connect_from(ip, addr)
            .await
            .expect("connects and is answered")
    }

    /// As [`RawPeer::connect_from`], checked with a ping: `Err` with what
    /// happened if the node refused or closed the connection.
    ///
    /// A QUIC swarm that listens on `/ip4/<ip>/udp/0/quic-v1` dials from that
    /// listener's socket, hence from `ip`; a TCP swarm would not (libp2p-tcp
    /// binds its dials to `0.0.0.0`, and the kernel picks 127.0.0.1).
    pub async fn try_connect_from(ip: &str, addr: &Multiaddr) -> Result<Self, String> {
        let identity = Identity::from_secret(&rand::random());
        let (mut swarm, _) =
            net::build_swarm(net::keypair(identity.secret_bytes()), &raw_config()).expect("swarm");
        let listen: Multiaddr = format!("/ip4/{ip}/udp/0/quic-v1").parse().expect("addr");
        swarm.listen_on(listen).expect("listen");
        loop {
            if let SwarmEvent::NewListenAddr { .. } = swarm.select_next_some().await {
                break;
            }
        }
        swarm.dial(addr.clone()).expect("dial");
        let target = loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => break peer_id,
                SwarmEvent::OutgoingConnectionError { error, .. } => return Err(error.to_string()),
                _ => {}
            }
        };
        let mut raw = Self {
            swarm,
            identity,
            target,
        };
        let to = net::entity_of(&target).expect("an Ed25519 node");
        let ping = raw.draft(to, "ping").sign(&raw.identity).encode();
        match raw.try_request(ping).await? {
            Response::Reply(_) => Ok(raw),
            other => Err(format!("the ping was answered {other:?}")),
        }
    }
}

/// The node's QUIC address (it must listen on one).
pub async fn quic_addr(node: &TestNode) -> Multiaddr {
    for _ in 0..500 {
        let addrs = node.handle.listen_addrs().await.expect("addrs");
        if let Some(a) = addrs
            .iter()
            .find(|a| a.iter().any(|p| p == libp2p::multiaddr::Protocol::QuicV1))
        {
            return a.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the node never listened on QUIC");
}

impl RawPeer {}

impl RawPeer {
    /// Sends every frame with up to `in_flight` requests open at once; returns
    /// the node's responses in the order the frames were given.
    pub async fn flood(&mut self, frames: Vec<Vec<u8>>, in_flight: usize) -> Vec<Response> {
        let total = frames.len();
        let mut frames = frames.into_iter().enumerate();
        let mut open = std::collections::HashMap::new();
        let mut out: Vec<Option<Response>> = (0..total).map(|_| None).collect();
        let mut done = 0;
        while done < total {
            while open.len() < in_flight {
                let Some((i, bytes)) = frames.next() else {
                    break;
                };
                open.insert(self.send_raw(bytes), i);
            }
            match self.next_answer().await {
                (Some(id), Ok(response)) => {
                    if let Some(i) = open.remove(&id) {
                        out[i] = Some(response);
                        done += 1;
                    }
                }
                (_, Err(e)) => panic!("request failed: {e}"),
                (None, Ok(_)) => {}
            }
        }
        out.into_iter().flatten().collect()
    }
}

/// The value of the metric `name` (its whole line's name, e.g.
/// `peer_envelopes_signed_total`) in `node`'s Prometheus text; 0 if absent.
pub fn metric(node: &NodeHandle, name: &str) -> f64 {
    node.metrics()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The code of a refusal: a kind-2 refusal, or a kind-1 `error` envelope (as
/// older peers send). `None` for anything else.
pub fn error_code(response: Response) -> Option<String> {
    let bytes = match response {
        Response::Accepted => return None,
        Response::Refused(r) => {
            assert!(!r.error_message.is_empty(), "a reason is given");
            return Some(r.error_code);
        }
        Response::Reply(bytes) => bytes,
    };
    let env = Envelope::decode(&bytes).expect("reply decodes");
    assert!(env.verify(), "the reply is signed by the node");
    if env.msg_type.as_str() != "error" {
        return None;
    }
    let payload: serde_json::Value = serde_json::from_slice(&env.payload).expect("json");
    assert!(
        payload["error_message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "a reason is given"
    );
    Some(
        payload["error_code"]
            .as_str()
            .expect("error_code")
            .to_owned(),
    )
}

impl RawPeer {
    /// The next request the node sends this peer, decoded, with its channel.
    /// The `capability_query` a node sends every peer that connects is left
    /// unanswered and skipped.
    pub async fn next_request(&mut self) -> (Envelope, Vec<u8>, ResponseChannel<Response>) {
        loop {
            if let SwarmEvent::Behaviour(BehaviourEvent::Envelopes(
                request_response::Event::Message {
                    message:
                        request_response::Message::Request {
                            request: Request::Envelope(frame),
                            channel,
                            ..
                        },
                    ..
                },
            )) = self.swarm.select_next_some().await
            {
                let env = Envelope::decode(&frame.bytes).expect("the node sends envelopes");
                assert!(env.verify(), "the node signs what it sends");
                if env.msg_type == *"capability_query" {
                    continue;
                }
                return (env, frame.bytes.clone(), channel);
            }
        }
    }

    /// Answers a request, and keeps driving the swarm until the answer is sent.
    pub async fn respond(&mut self, channel: ResponseChannel<Response>, response: Response) {
        self.swarm
            .behaviour_mut()
            .envelopes
            .send_response(channel, response)
            .expect("channel open");
        loop {
            if let SwarmEvent::Behaviour(BehaviourEvent::Envelopes(
                request_response::Event::ResponseSent { .. },
            )) = self.swarm.select_next_some().await
            {
                return;
            }
        }
    }

    /// The entity id of this peer.
    pub fn entity_id(&self) -> EntityId {
        self.identity.entity_id()
    }
}

/// Waits until `node` lists `peer` as connected (the two ends of a new
/// connection learn of it independently).
pub async fn wait_connected(node: &NodeHandle, peer: EntityId) {
    wait_connection(node, peer, true).await;
}

/// Waits until `node` no longer lists `peer` as connected.
pub async fn wait_disconnected(node: &NodeHandle, peer: EntityId) {
    wait_connection(node, peer, false).await;
}

async fn wait_connection(node: &NodeHandle, peer: EntityId, connected: bool) {
    for _ in 0..500 {
        let peers = node.peers().await.expect("peers");
        if peers.iter().any(|p| p.entity_id == peer && p.connected) == connected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{peer} never showed as connected: {connected}");
}

/// Fresh randomness for one handshake attempt.
pub fn handshake_random() -> Random {
    let mut bytes = [0u8; Random::LEN];
    bytes[..32].copy_from_slice(&rand::random::<[u8; 32]>());
    bytes[32..64].copy_from_slice(&rand::random::<[u8; 32]>());
    bytes[64..].copy_from_slice(&rand::random::<[u8; 32]>());
    Random::from_bytes(&bytes)
}

impl RawPeer {
    /// Runs the six-step handshake with the node as initiator; returns the session.
    pub async fn open_session(&mut self, to: EntityId) -> Session {
        let mut link = Link::new(session::Config::default(), self.entity_id(), to);
        let mut step = link.connect(now_ms(), handshake_random()).expect("init");
        loop {
            let env = Draft {
                payload: step.encode(),
                ..self.draft(to, step.msg_type())
            }
            .sign(&self.identity);
            let Response::Reply(bytes) = self.request(env.encode()).await else {
                panic!("every handshake step is answered");
            };
            let reply = Envelope::decode(&bytes).expect("decodes");
            let msg = Message::from_envelope(&reply).expect("the node answers with its step");
            let next = link
                .handle(
                    now_ms(),
                    &self.identity,
                    &reply.sender_key,
                    &msg,
                    handshake_random,
                )
                .expect("the node's step is valid");
            if let Some(session) = link.poll_session() {
                return session;
            }
            step = next.expect("the handshake goes on");
        }
    }

    /// Answers the handshake the node starts with the core machine; returns the
    /// session.
    pub async fn accept_session(&mut self, from: EntityId) -> Session {
        let mut link = Link::new(session::Config::default(), self.entity_id(), from);
        loop {
            let (env, _, channel) = self.next_request().await;
            let step = Message::from_envelope(&env).expect("a handshake step comes first");
            let reply = link
                .handle(
                    now_ms(),
                    &self.identity,
                    &env.sender_key,
                    &step,
                    handshake_random,
                )
                .expect("the node's handshake is valid")
                .expect("every initiator step gets an answer");
            let reply_env = Draft {
                payload: reply.encode(),
                ..self.draft(from, reply.msg_type())
            }
            .sign(&self.identity);
            self.respond(channel, Response::Reply(reply_env.encode()))
                .await;
            if let Some(session) = link.poll_session() {
                return session;
            }
        }
    }

    /// Seals `plaintext` as a `msg_type` envelope in `session`, sends it, and
    /// returns `None` if accepted, else the error code.
    pub async fn send_sealed(
        &mut self,
        session: &mut Session,
        to: EntityId,
        msg_type: &str,
        plaintext: &[u8],
    ) -> Option<String> {
        error_code(self.request_sealed(session, to, msg_type, plaintext).await)
    }

    /// As [`RawPeer::send_sealed`], but returns the node's response.
    pub async fn request_sealed(
        &mut self,
        session: &mut Session,
        to: EntityId,
        msg_type: &str,
        plaintext: &[u8],
    ) -> Response {
        let mut d = self.draft(to, msg_type);
        let (seq, ciphertext) = session
            .seal(now_ms(), &d.msg_type, plaintext)
            .expect("seal");
        d.session_id = Some(session.id());
        d.sequence_num = seq;
        d.payload = ciphertext;
        self.request(d.sign(&self.identity).encode()).await
    }
}

/// Two nodes listening on `listen` with `tune` applied, the first connected to
/// the second and both aware of it.
pub async fn pair(listen: &str, tune: impl Fn(&mut Config) + Copy) -> (TestNode, TestNode) {
    let a = start_node_with(listen, tune).await;
    let b = start_node_with(listen, tune).await;
    let peer = a.handle.connect(b.addr.clone()).await.expect("connect");
    assert_eq!(peer.entity_id, b.handle.entity_id());
    wait_connected(&b.handle, a.handle.entity_id()).await;
    (a, b)
}

/// A tmpfs of a few MiB (a small disk) mounted on a directory of its own for
/// the test's life. Mounting needs root, as the tests on network namespaces do.
pub struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    pub fn mount(mib: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }

    /// Fills the disk with the file `filler`, to the last block.
    pub fn fill(&self) {
        use std::io::Write;
        let mut filler = std::fs::File::create(self.path().join("filler")).expect("filler");
        for block in [1 << 20, 4096] {
            let zeros = vec![0u8; block];
            while filler.write_all(&zeros).is_ok() {}
        }
    }

    /// Room again.
    pub fn free(&self) {
        std::fs::remove_file(self.path().join("filler")).expect("remove the filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.path())
            .status();
    }
}

/// A node on a small disk of `mib` MiB (see [`SmallDisk`]) and a node
/// connected to it, both with `tune` applied: (the disk, the node on it, the
/// other node).
pub async fn on_small_disk(
    mib: u32,
    tune: impl Fn(&mut Config) + Copy,
) -> (SmallDisk, TestNode, TestNode) {
    let disk = SmallDisk::mount(mib);
    let dir = tempfile::tempdir_in(disk.path()).expect("a data directory on the small disk");
    let on_disk = start_node_in(dir, "/ip4/127.0.0.1/tcp/0", tune, |b| b).await;
    let other = start_node_with("/ip4/127.0.0.1/tcp/0", tune).await;
    other
        .handle
        .connect(on_disk.addr.clone())
        .await
        .expect("connect");
    wait_connected(&on_disk.handle, other.handle.entity_id()).await;
    (disk, on_disk, other)
}
