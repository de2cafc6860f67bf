//! Chunked transfer between real nodes on 127.0.0.1, and with a raw peer that
//! withholds, drops or asks for chunks, to see each rule of protocol section 9
//! carried out by a node.

use std::time::Duration;

use peer_core::chunk::{self, Chunk, Progress, Reassembler, ResendRequest, TransferId};
use peer_core::{EntityId, MsgType};
use peer_node::NodeError;
use peer_node::net::codec::Response;
use peer_node::node::{Direction, Event, now_ms};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::Receiver;

mod common;
use common::{RawPeer, pair, start_node_with, wait_connected};

const TCP: &str = "/ip4/127.0.0.1/tcp/0";
const MIB: usize = 1024 * 1024;

fn message_type() -> MsgType {
    "message".parse().expect("valid")
}

/// A JSON string of exactly `len` bytes, its characters pseudo-random.
fn json_string(len: usize, seed: u64) -> Vec<u8> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    out.push(b'"');
    out.extend((2..len).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ALPHABET[(x % ALPHABET.len() as u64) as usize]
    }));
    out.push(b'"');
    out
}

async fn next_event(events: &mut Receiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(60), events.recv())
        .await
        .expect("an event in time")
        .expect("event")
}

/// The inbound progress reports (chunks done) up to the message, and the message.
async fn progress_then_message(events: &mut Receiver<Event>) -> (Vec<u32>, String, Vec<u8>) {
    let mut progress = Vec::new();
    loop {
        match next_event(events).await {
            Event::TransferProgress {
                direction: Direction::Inbound,
                done_chunks,
                ..
            } => progress.push(done_chunks),
            Event::Message {
                message_id,
                payload,
                ..
            } => return (progress, message_id, payload.as_str().as_bytes().to_vec()),
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_100_mib_message_crosses_between_two_nodes_with_its_hash_intact() {
    let (a, b) = pair(TCP, |c| {
        c.transfer.max_message_size = 128 * MIB as u64;
    })
    .await;
    let mut a_events = a.handle.subscribe();
    let mut b_events = b.handle.subscribe();
    let payload = json_string(100 * MIB, 1);
    let digest = Sha256::digest(&payload);
    let delivered = a
        .handle
        .send(b.handle.entity_id(), message_type(), payload)
        .await
        .expect("delivered");

    let (progress, message_id, received) = progress_then_message(&mut b_events).await;
    assert_eq!(message_id, delivered.message_id, "named by its transfer id");
    assert_eq!(Sha256::digest(&received), digest, "the hash is intact");
    // 3,200 chunks of 32 KiB: the start, then each tenth.
    let tenths: Vec<u32> = (0..=10).map(|t| t * 320).collect();
    assert_eq!(progress, tenths);
    let mut outbound = Vec::new();
    while let Ok(ev) = a_events.try_recv() {
        if let Event::TransferProgress {
            direction: Direction::Outbound,
            done_bytes,
            total_bytes,
            ..
        } = ev
        {
            assert_eq!(total_bytes, 100 * MIB as u64);
            outbound.push(done_bytes);
        }
    }
    assert_eq!(outbound.len(), 11, "{outbound:?}");
    assert_eq!(outbound.last(), Some(&(100 * MIB as u64)));
    // One message each way in the counters, not 3,201 envelopes.
    let stats = b.handle.stats().await.expect("stats");
    assert_eq!(stats.peers[&a.handle.entity_id().to_string()].received, 1);
}

#[tokio::test]
async fn a_transfer_over_the_size_limit_is_refused_before_any_chunk_is_sent() {
    let a = start_node_with(TCP, |c| c.transfer.max_message_size = 4 * MIB as u64).await;
    let b = start_node_with(TCP, |c| c.transfer.max_message_size = MIB as u64).await;
    a.handle.connect(b.addr.clone()).await.expect("connect");
    wait_connected(&b.handle, a.handle.entity_id()).await;
    let mut a_events = a.handle.subscribe();
    let mut b_events = b.handle.subscribe();
    let to = b.handle.entity_id();

    // Over the sender's own limit: refused without a word on the network.
    let err = a
        .handle
        .send(to, message_type(), json_string(4 * MIB + 1, 2))
        .await
        .expect_err("too large to send");
    assert!(matches!(err, NodeError::TooLarge { .. }), "{err}");

    // Over the receiver's limit: its manifest is refused, no chunk follows.
    let err = a
        .handle
        .send(to, message_type(), json_string(2 * MIB, 3))
        .await
        .expect_err("too large to receive");
    let NodeError::Rejected { code, reason, .. } = err else {
        panic!("refused by the receiver, got {err}");
    };
    assert_eq!(code, "MESSAGE_TOO_LARGE", "{reason}");
    match next_event(&mut a_events).await {
        Event::TransferFailed {
            direction, code, ..
        } => {
            assert_eq!(direction, Direction::Outbound);
            assert_eq!(code, "MESSAGE_TOO_LARGE");
        }
        other => panic!("no progress before the refusal, got {other:?}"),
    }
    // Only A's card (fetched when they connected) may have reached B's agent.
    while let Ok(e) = b_events.try_recv() {
        assert!(
            matches!(e, Event::CardUpdated { .. }),
            "nothing reached the receiver's agent, got {e:?}"
        );
    }
    let stats = b.handle.stats().await.expect("stats");
    let from_a = &stats.peers[&a.handle.entity_id().to_string()];
    assert_eq!(from_a.rejected.get("MESSAGE_TOO_LARGE"), Some(&1));
    assert_eq!(from_a.rejected.len(), 1, "no chunk came to be refused");

    // The receiver goes on: a message within its limit arrives.
    a.handle
        .send(to, message_type(), json_string(MIB, 4))
        .await
        .expect("within the limit");
}

/// A raw peer with a session to `node`, a 4-chunk message and its transfer.
struct Sender {
    raw: RawPeer,
    session: peer_core::session::Session,
    to: EntityId,
    data: Vec<u8>,
    manifest: chunk::Manifest,
    chunks: Vec<Chunk>,
}

impl Sender {
    async fn new(node: &common::TestNode) -> Self {
        let mut raw = RawPeer::connect(&node.addr).await;
        let to = node.handle.entity_id();
        let session = raw.open_session(to).await;
        wait_connected(&node.handle, raw.entity_id()).await;
        let data = json_string(100_000, 5);
        let id = TransferId::from_random(rand::random());
        let (manifest, chunks) =
            chunk::split(message_type(), &data, chunk::DEFAULT_CHUNK_SIZE, id).expect("split");
        let chunks: Vec<Chunk> = chunks.collect();
        assert_eq!(chunks.len(), 4);
        Self {
            raw,
            session,
            to,
            data,
            manifest,
            chunks,
        }
    }

    async fn send(&mut self, msg_type: &str, plaintext: &[u8]) -> Option<String> {
        self.raw
            .send_sealed(&mut self.session, self.to, msg_type, plaintext)
            .await
    }

    /// Sends the manifest; `None` if accepted, else the error code.
    async fn announce(&mut self) -> Option<String> {
        let manifest = self.manifest.encode();
        self.send(chunk::MSG_MANIFEST, &manifest).await
    }

    async fn send_chunk(&mut self, chunk: &Chunk) -> Option<String> {
        let bytes = chunk.encode();
        self.send(chunk::MSG_CHUNK, &bytes).await
    }
}

#[tokio::test]
async fn a_withheld_chunk_is_asked_for_again_and_the_message_completes() {
    let node = start_node_with(TCP, |c| c.transfer.resend_after_ms = 500).await;
    let mut s = Sender::new(&node).await;
    let mut events = node.handle.subscribe();
    assert_eq!(s.announce().await, None);

    // An inconsistent chunk (not the length its index calls for) is refused
    // and changes nothing.
    let mut bad = s.chunks[0].clone();
    bad.data.pop();
    assert_eq!(s.send_chunk(&bad).await.as_deref(), Some("CHUNK_ERROR"));
    // Chunk 1 is withheld.
    for i in [3, 0, 2] {
        let c = s.chunks[i].clone();
        assert_eq!(s.send_chunk(&c).await, None, "chunk {i}");
    }

    // The node asks for what it misses, sealed in the session.
    let (env, _, channel) = s.raw.next_request().await;
    assert_eq!(env.msg_type.as_str(), chunk::MSG_RESEND);
    assert_eq!(env.session_id, Some(s.session.id()));
    let plaintext = s
        .session
        .open(now_ms(), &env.msg_type, env.sequence_num, &env.payload)
        .expect("sealed for us");
    let request = ResendRequest::decode(&plaintext).expect("a resend request");
    assert_eq!(request.transfer_id, s.manifest.transfer_id);
    assert_eq!(request.indexes(), [1]);
    s.raw.respond(channel, Response::Accepted).await;
    let c = s.chunks[1].clone();
    assert_eq!(s.send_chunk(&c).await, None);

    let (progress, message_id, received) = progress_then_message(&mut events).await;
    assert_eq!(message_id, s.manifest.transfer_id.to_string());
    assert_eq!(received, s.data);
    assert_eq!(progress, [0, 1, 2, 3, 4]);
    // A late repeat (as when the answer to the last chunk was lost) is accepted
    // and delivers nothing again.
    assert_eq!(s.send_chunk(&c).await, None);
    assert!(events.try_recv().is_err(), "no second message");
}

/// Opens a transfer from a raw peer to a node tuned by `tune`, sends its first
/// chunk and nothing more; returns the node, the sender and the node's
/// `transfer_failed` (its code and reason) once the node gives the transfer up.
async fn abandoned_transfer(
    tune: impl Fn(&mut peer_node::Config) + Copy,
) -> (common::TestNode, Sender, String, String) {
    let node = start_node_with(TCP, tune).await;
    let mut s = Sender::new(&node).await;
    let mut events = node.handle.subscribe();
    assert_eq!(s.announce().await, None);
    let c = s.chunks[0].clone();
    assert_eq!(s.send_chunk(&c).await, None);
    loop {
        if let Event::TransferFailed {
            transfer_id,
            direction,
            code,
            reason,
            ..
        } = next_event(&mut events).await
        {
            assert_eq!(transfer_id, s.manifest.transfer_id.to_string());
            assert_eq!(direction, Direction::Inbound);
            return (node, s, code, reason);
        }
    }
}

#[tokio::test]
async fn an_idle_incoming_transfer_expires() {
    let (_node, mut s, code, _) = abandoned_transfer(|c| {
        c.transfer.expiry_secs = 1;
        c.transfer.resend_after_ms = 60_000;
    })
    .await;
    assert_eq!(code, "EXPIRED");
    let c = s.chunks[1].clone();
    assert_eq!(s.send_chunk(&c).await.as_deref(), Some("CHUNK_ERROR"));
}

#[tokio::test]
async fn an_incoming_transfer_whose_resend_requests_go_unanswered_is_dropped() {
    // The raw peer never reads the node's resend requests: it has given up.
    let (_node, _, code, reason) = abandoned_transfer(|c| {
        c.transfer.resend_after_ms = 100;
        c.transfer.max_resend_requests = 2;
    })
    .await;
    assert_eq!(code, "EXPIRED");
    assert!(reason.contains("2 resend requests"), "{reason}");
}

#[tokio::test]
async fn refused_chunks_spend_the_senders_chunk_budget_but_a_good_transfer_does_not() {
    let node = start_node_with(TCP, |c| {
        c.rate_limits.chunk.burst = 3;
        c.rate_limits.chunk.per_minute = 1;
    })
    .await;
    let mut s = Sender::new(&node).await;
    // One token for the manifest; its four chunks take none.
    assert_eq!(s.announce().await, None);
    for c in s.chunks.clone() {
        assert_eq!(s.send_chunk(&c).await, None);
    }
    // Chunks of no open transfer: refused, each for a token; so is a chunk
    // refused before its transfer sees it (outside the session); then rate limited.
    let stray = Chunk::new(TransferId::from_random(rand::random()), 0, b"x".to_vec());
    assert_eq!(s.send_chunk(&stray).await.as_deref(), Some("CHUNK_ERROR"));
    let mut d = s.raw.draft(s.to, chunk::MSG_CHUNK);
    d.payload = stray.encode();
    let code = s.raw.send(d.sign(&s.raw.identity).encode()).await;
    assert_eq!(code.as_deref(), Some("ENCRYPTION_REQUIRED"));
    assert_eq!(s.send_chunk(&stray).await.as_deref(), Some("RATE_LIMITED"));
}

/// The node sends to a raw peer that loses one chunk on the way, asks for
/// another again and rate-limits a third: all reach it, and the node reports
/// the message delivered.
#[tokio::test]
async fn a_chunk_lost_on_the_way_is_sent_again_and_resend_requests_are_answered() {
    // One chunk in flight at a time, so the raw peer sees a fixed order.
    let node = start_node_with(TCP, |c| c.transfer.window = 1).await;
    let mut raw = RawPeer::connect(&node.addr).await;
    let to = raw.entity_id();
    wait_connected(&node.handle, to).await;
    let data = json_string(100_000, 6);
    let sender = node.handle.clone();
    let payload = data.clone();
    let sent = tokio::spawn(async move { sender.send(to, message_type(), payload).await });

    let from = node.handle.entity_id();
    let mut session = raw.accept_session(from).await;
    let mut r: Reassembler = Reassembler::new(chunk::Config::default());
    let mut seen = Vec::new();
    let mut asked = false;
    let mut limited_at = None;
    let message = loop {
        let (env, _, channel) = raw.next_request().await;
        let plaintext = session
            .open(now_ms(), &env.msg_type, env.sequence_num, &env.payload)
            .expect("sealed for us");
        if env.msg_type.as_str() == chunk::MSG_MANIFEST {
            let m = chunk::Manifest::decode(&plaintext).expect("manifest");
            r.begin(now_ms(), &from, &m).expect("begin");
            raw.respond(channel, Response::Accepted).await;
            continue;
        }
        let c = Chunk::decode(&plaintext).expect("a chunk");
        seen.push(c.index);
        if seen == [0, 1] {
            // Lost: the request is never answered.
            drop(channel);
            continue;
        }
        if c.index == 1 && !asked {
            // Before answering, ask for chunk 0 once more.
            asked = true;
            let request = ResendRequest::new(c.transfer_id, [0]);
            assert_eq!(
                raw.send_sealed(&mut session, from, chunk::MSG_RESEND, &request.encode())
                    .await,
                None
            );
        }
        if c.index == 2 && limited_at.is_none() {
            // Over our (made-up) limit: the node must wait 300 ms, then resend.
            limited_at = Some(std::time::Instant::now());
            let payload = serde_json::json!({
                "error_code": "RATE_LIMITED",
                "error_message": "slow down",
                "retry_after_ms": 300,
            });
            let d = peer_core::Draft {
                payload: payload.to_string().into_bytes(),
                ..raw.draft(from, "error")
            };
            let reply = Response::Reply(d.sign(&raw.identity).encode());
            raw.respond(channel, reply).await;
            continue;
        }
        if c.index == 2 {
            let waited = limited_at.expect("limited first").elapsed();
            assert!(waited >= Duration::from_millis(300), "{waited:?}");
        }
        let progress = r.add(now_ms(), &from, &c).expect("a good chunk");
        raw.respond(channel, Response::Accepted).await;
        if let Progress::Complete { payload, .. } = progress {
            break payload;
        }
    };
    assert_eq!(message, data);
    assert_eq!(
        seen,
        [0, 1, 1, 0, 2, 2, 3],
        "1 sent again, 0 sent when asked, 2 after the wait"
    );
    let delivered = sent.await.expect("task").expect("delivered");
    assert!(delivered.reply.is_none());
}

/// Starts two 1 MiB transfers to a peer that never answers (the first waits
/// for ever for its handshake) on a node tuned by `tune`; returns the refusal
/// of the other.
async fn second_transfer_refusal(tune: impl Fn(&mut peer_node::Config) + Copy) -> NodeError {
    let node = start_node_with(TCP, tune).await;
    let raw = RawPeer::connect(&node.addr).await;
    let to = raw.entity_id();
    wait_connected(&node.handle, to).await;
    let send = |seed| {
        let sender = node.handle.clone();
        tokio::spawn(async move {
            sender
                .send(to, message_type(), json_string(MIB, seed))
                .await
        })
    };
    let (mut one, mut two) = (send(7), send(8));
    let (refused, waiting) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            r = &mut one => (r, two),
            r = &mut two => (r, one),
        }
    })
    .await
    .expect("one is refused in time");
    waiting.abort();
    refused.expect("task").expect_err("refused")
}

#[tokio::test]
async fn outgoing_transfers_beyond_the_count_or_byte_limit_are_refused() {
    let err = second_transfer_refusal(|c| c.transfer.max_outgoing = 1).await;
    assert!(
        matches!(err, NodeError::TooManyTransfers { transfers: 1, .. }),
        "{err}"
    );
    let err = second_transfer_refusal(|c| {
        c.transfer.max_message_size = MIB as u64;
        c.transfer.max_outgoing_bytes = (MIB + MIB / 2) as u64;
    })
    .await;
    assert!(
        matches!(err, NodeError::TooManyTransfers { bytes, .. } if bytes == MIB as u64),
        "{err}"
    );
}

/// Serves `node`'s HTTP API on 127.0.0.1; returns its base URL.
async fn serve_api(node: &common::TestNode, token: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = peer_node::api::router(
        node.handle.clone(),
        &peer_node::config::ApiConfig::default(),
        token.to_owned(),
        tokio_util::sync::CancellationToken::new(),
    );
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn the_api_takes_payloads_up_to_the_transfer_limit_and_passes_them_verbatim() {
    let (a, b) = pair(TCP, |c| c.transfer.max_message_size = 4 * MIB as u64).await;
    let base = serve_api(&a, "t0ken").await;
    let mut events = b.handle.subscribe();
    let http = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        http.post(format!("{base}/v1/messages"))
            .bearer_auth("t0ken")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // 3 MiB, beyond axum's default 2 MiB body limit; odd spacing kept as sent.
    let payload = format!(
        "{{ \"blob\" :{} ,\"n\": 1 }}",
        String::from_utf8(json_string(3 * MIB, 9)).expect("ascii")
    );
    let body = format!(
        "{{\"to\":\"{}\",\"msg_type\":\"message\",\"payload\":{payload}}}",
        b.handle.entity_id()
    );
    let resp = post(body.into_bytes()).await.expect("post");
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let answer: serde_json::Value = resp.json().await.expect("json");
    let (_, message_id, received) = progress_then_message(&mut events).await;
    assert_eq!(answer["message_id"], message_id);
    assert_eq!(received, payload.as_bytes(), "the payload arrives verbatim");

    // A field the API does not know is refused, not carried along.
    let extra = format!(
        "{{\"to\":\"{}\",\"msg_type\":\"message\",\"payload\":1,\"pad\":2}}",
        b.handle.entity_id()
    );
    let resp = post(extra.into_bytes()).await.expect("post");
    assert_eq!(resp.status(), reqwest::StatusCode::BAD_REQUEST);
    let answer: serde_json::Value = resp.json().await.expect("json");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("unknown field"), "{answer}");

    // Over the limit: a JSON error, not a bare 413.
    let resp = post(vec![b' '; 5 * MIB]).await.expect("post");
    assert_eq!(resp.status(), reqwest::StatusCode::PAYLOAD_TOO_LARGE);
    let answer: serde_json::Value = resp.json().await.expect("a JSON error");
    assert_eq!(answer["error"]["code"], "MESSAGE_TOO_LARGE", "{answer}");
}

#[tokio::test]
async fn messages_the_agent_has_not_read_count_against_the_reassembly_budget() {
    let (a, b) = pair(TCP, |c| {
        c.transfer.max_message_size = 2 * MIB as u64;
        c.transfer.max_buffered_bytes = 3 * MIB as u64;
    })
    .await;
    let to = b.handle.entity_id();
    // An agent that subscribed and does not read yet.
    let mut events = b.handle.subscribe();
    a.handle
        .send(to, message_type(), json_string(2 * MIB, 10))
        .await
        .expect("the first fits");
    let err = a
        .handle
        .send(to, message_type(), json_string(2 * MIB, 11))
        .await
        .expect_err("2 MiB wait for the agent, 2 more would exceed 3 MiB");
    let NodeError::Rejected { code, reason, .. } = err else {
        panic!("refused by the receiver, got {err}");
    };
    assert_eq!(code, "CHUNK_ERROR");
    assert!(reason.contains("receiver busy"), "{reason}");
    // Once the agent has read the message, there is room again.
    let (_, _, first) = progress_then_message(&mut events).await;
    assert_eq!(first.len(), 2 * MIB);
    drop(first);
    a.handle
        .send(to, message_type(), json_string(2 * MIB, 12))
        .await
        .expect("room again");
}

#[tokio::test]
async fn transfer_parts_follow_the_nodes_policies() {
    let node = start_node_with(TCP, |c| {
        c.rate_limits.task.burst = 1;
        c.rate_limits.task.per_minute = 1;
    })
    .await;
    let mut s = Sender::new(&node).await;

    // Only application messages travel as transfers.
    let (ping, _) = chunk::split(
        "ping".parse().expect("valid"),
        &s.data,
        chunk::DEFAULT_CHUNK_SIZE,
        TransferId::from_random(rand::random()),
    )
    .expect("split");
    let code = s.send(chunk::MSG_MANIFEST, &ping.encode()).await;
    assert_eq!(code.as_deref(), Some("UNSUPPORTED_MSG_TYPE"));

    // Parts outside the session are refused while encryption is required.
    let mut d = s.raw.draft(s.to, chunk::MSG_MANIFEST);
    d.payload = s.manifest.encode();
    let code = s.raw.send(d.sign(&s.raw.identity).encode()).await;
    assert_eq!(code.as_deref(), Some("ENCRYPTION_REQUIRED"));

    // A resend request for a transfer the node does not send is ignored.
    let stray = ResendRequest::new(TransferId::from_random(rand::random()), [0]);
    assert_eq!(s.send(chunk::MSG_RESEND, &stray.encode()).await, None);

    // A reassembled message must be JSON like any other; once refused, a repeat
    // of its last chunk does not pass for delivered.
    let (not_json, chunks) = chunk::split(
        message_type(),
        b"not json",
        chunk::DEFAULT_CHUNK_SIZE,
        TransferId::from_random(rand::random()),
    )
    .expect("split");
    let last = chunks.last().expect("one chunk");
    assert_eq!(s.send(chunk::MSG_MANIFEST, &not_json.encode()).await, None);
    let code = s.send_chunk(&last).await;
    assert_eq!(code.as_deref(), Some("MALFORMED_MESSAGE"));
    assert_eq!(s.send_chunk(&last).await.as_deref(), Some("CHUNK_ERROR"));

    // A transfer counts against the class of the message it carries: the
    // task bucket held one, taken by the transfer above.
    let code = s.announce().await;
    assert_eq!(code.as_deref(), Some("RATE_LIMITED"));
}

#[tokio::test]
async fn a_throttled_transfer_ends_when_its_peer_disconnects() {
    let node = start_node_with(TCP, |c| c.transfer.window = 1).await;
    let mut raw = RawPeer::connect(&node.addr).await;
    let to = raw.entity_id();
    wait_connected(&node.handle, to).await;
    let sender = node.handle.clone();
    let sent =
        tokio::spawn(async move { sender.send(to, message_type(), json_string(MIB, 13)).await });
    let from = node.handle.entity_id();
    raw.accept_session(from).await;
    let (_, _, channel) = raw.next_request().await;
    raw.respond(channel, Response::Accepted).await; // the manifest
    // The first chunk is refused RATE_LIMITED with an endless wait; then the
    // peer goes away. Nothing is in flight, yet the transfer must end.
    let (_, _, channel) = raw.next_request().await;
    let payload = serde_json::json!({
        "error_code": "RATE_LIMITED",
        "error_message": "come back in a year",
        "retry_after_ms": u64::MAX,
    });
    let d = peer_core::Draft {
        payload: payload.to_string().into_bytes(),
        ..raw.draft(from, "error")
    };
    raw.respond(channel, Response::Reply(d.sign(&raw.identity).encode()))
        .await;
    drop(raw);
    let result = tokio::time::timeout(Duration::from_secs(10), sent)
        .await
        .expect("ended in time")
        .expect("task");
    assert!(
        matches!(result, Err(NodeError::NotConnected(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_transfer_wider_than_the_outbound_queue_waits_for_room() {
    // Four messages in flight at most, a window of 32 chunks: most chunks find
    // the queue full at first, and are sent again once there is room.
    let (a, b) = pair(TCP, |c| c.network.max_outbound_in_flight = 4).await;
    let mut events = b.handle.subscribe();
    let payload = json_string(MIB, 14);
    a.handle
        .send(b.handle.entity_id(), message_type(), payload.clone())
        .await
        .expect("delivered despite the small queue");
    let (_, _, received) = progress_then_message(&mut events).await;
    assert_eq!(received, payload);
}

#[tokio::test]
async fn a_reassembled_message_nested_too_deep_is_malformed_and_the_next_arrives() {
    let node = start_node_with(TCP, |_| {}).await;
    let mut s = Sender::new(&node).await;
    let mut events = node.handle.subscribe();
    // 100 KB inside 65 arrays: one level over the default limit (64).
    let mut deep = b"[".repeat(65);
    deep.extend_from_slice(&json_string(100_000, 7));
    deep.extend_from_slice(&b"]".repeat(65));
    let (manifest, chunks) = chunk::split(
        message_type(),
        &deep,
        chunk::DEFAULT_CHUNK_SIZE,
        TransferId::from_random(rand::random()),
    )
    .expect("split");
    let chunks: Vec<Chunk> = chunks.collect();
    assert_eq!(s.send(chunk::MSG_MANIFEST, &manifest.encode()).await, None);
    let (last, rest) = chunks.split_last().expect("chunks");
    for c in rest {
        assert_eq!(s.send_chunk(c).await, None);
    }
    let code = s.send_chunk(last).await;
    assert_eq!(code.as_deref(), Some("MALFORMED_MESSAGE"));
    let reason = loop {
        if let Event::TransferFailed {
            transfer_id,
            code,
            reason,
            ..
        } = next_event(&mut events).await
        {
            assert_eq!(transfer_id, manifest.transfer_id.to_string());
            assert_eq!(code, "MALFORMED_MESSAGE");
            break reason;
        }
    };
    assert!(reason.contains("protocol.max_json_depth"), "{reason}");

    // The next transfer from the same sender arrives.
    assert_eq!(s.announce().await, None);
    for c in s.chunks.clone() {
        assert_eq!(s.send_chunk(&c).await, None);
    }
    let (_, message_id, received) = progress_then_message(&mut events).await;
    assert_eq!(message_id, s.manifest.transfer_id.to_string());
    assert_eq!(received, s.data);
}

/// The system's clocks, with the wall clock shifted by a step the test sets.
#[derive(Debug, Default)]
struct SteppedClock {
    offset_ms: std::sync::atomic::AtomicI64,
}

impl SteppedClock {
    fn step(&self, ms: i64) {
        self.offset_ms
            .store(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl peer_node::clock::Clock for SteppedClock {
    fn wall_ms(&self) -> u64 {
        let offset = self.offset_ms.load(std::sync::atomic::Ordering::SeqCst);
        now_ms().saturating_add_signed(offset)
    }

    fn now(&self) -> std::time::Instant {
        std::time::Instant::now()
    }
}

#[tokio::test]
async fn a_wall_clock_step_of_an_hour_expires_no_session_and_no_transfer() {
    let clock = std::sync::Arc::new(SteppedClock::default());
    let stepped = clock.clone();
    let node = common::start_node_built(
        TCP,
        // No resend request during the test: the raw peer does not read them.
        |c| c.transfer.resend_after_ms = 600_000,
        move |b| b.clock(stepped),
    )
    .await;
    let mut s = Sender::new(&node).await;
    let mut events = node.handle.subscribe();
    assert_eq!(s.announce().await, None);
    let first = s.chunks[0].clone();
    assert_eq!(s.send_chunk(&first).await, None);
    let raw_id = s.raw.entity_id();
    let session_of = |peers: Vec<peer_node::node::PeerView>| {
        peers
            .into_iter()
            .find(|p| p.entity_id == raw_id)
            .and_then(|p| p.session)
            .expect("a session with the raw peer")
    };
    let before = session_of(node.handle.peers().await.expect("peers"));

    // The wall clock jumps an hour ahead (the session's whole lifetime, twice
    // the transfer expiry), stays there a while, and comes back.
    clock.step(3_600_000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = session_of(node.handle.peers().await.expect("peers"));
    assert_eq!(during.session_id, before.session_id);
    assert_eq!(during.state, "READY", "not expired by the wall clock");
    clock.step(0);

    // The session and the transfer go on where they were.
    for c in s.chunks.clone().into_iter().skip(1) {
        assert_eq!(s.send_chunk(&c).await, None, "chunk {}", c.index);
    }
    let (_, message_id, payload) = progress_then_message(&mut events).await;
    assert_eq!(message_id, s.manifest.transfer_id.to_string());
    assert_eq!(payload, s.data);
    let after = session_of(node.handle.peers().await.expect("peers"));
    assert_eq!(after.session_id, before.session_id, "no new handshake");
}
