//! Capability cards between real nodes: exchanged on connect, pushed when they
//! change, forged, stale and oversized ones refused; application-defined
//! (namespaced) message types delivered only when the card accepts them; the
//! card routes of the local API.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use peer_core::{EntityId, Identity, MsgType};
use peer_node::NodeError;
use peer_node::node::{Event, NodeHandle, now_ms};
use peer_node::services::card::signed::{self, NodeFacts, SignedCard, signed_bytes};
use peer_node::services::card::{CardContent, Skill};
use peer_node::store::Store;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

mod common;
use common::{RawPeer, start_node_in, start_node_with, wait_connected};

const TCP: &str = "/ip4/127.0.0.1/tcp/0";

fn content(name: &str, accepts: &[&str]) -> CardContent {
    CardContent {
        name: name.into(),
        description: "test agent".into(),
        version: "0.1".into(),
        skills: vec![],
        accepts: accepts.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn declare(c: &mut peer_node::Config, name: &str, accepts: &[&str]) {
    c.card.name = Some(name.into());
    c.card.accepts = accepts.iter().map(|s| (*s).to_owned()).collect();
}

/// Waits for `peer`'s `card_updated` event with `sequence`.
async fn card_updated(events: &mut broadcast::Receiver<Event>, peer: EntityId, sequence: u64) {
    let wait = async {
        loop {
            if let Event::CardUpdated {
                entity_id,
                sequence: s,
            } = events.recv().await.expect("events")
                && entity_id == peer
                && s == sequence
            {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("no card_updated of {peer} with sequence {sequence}"));
}

/// The next message `events` delivers, as (from, msg_type, payload length).
async fn next_message(events: &mut broadcast::Receiver<Event>) -> (EntityId, String, usize) {
    let wait = async {
        loop {
            if let Event::Message {
                from,
                msg_type,
                payload,
                ..
            } = events.recv().await.expect("events")
            {
                let len = serde_json::to_string(&payload).expect("json").len();
                return (from, msg_type, len);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("a message")
}

async fn peer_card(node: &NodeHandle, peer: EntityId) -> SignedCard {
    (*node.peer_card(peer).await.expect("ask").expect("a card")).clone()
}

#[tokio::test]
async fn cards_are_exchanged_on_connect_and_a_change_reaches_the_peer_unasked() {
    let a = start_node_with(TCP, |_| {}).await;
    let b = start_node_with(TCP, |c| declare(c, "bee", &["chat"])).await;
    let (ida, idb) = (a.handle.entity_id(), b.handle.entity_id());
    let (mut ea, mut eb) = (a.handle.subscribe(), b.handle.subscribe());
    a.handle.connect(b.addr.clone()).await.expect("connect");
    card_updated(&mut ea, idb, 1).await;
    card_updated(&mut eb, ida, 1).await;
    let own_b = b.handle.card().expect("card");
    assert_eq!(peer_card(&a.handle, idb).await.raw(), own_b.raw());
    assert_eq!(own_b.card().name, "bee");
    assert_eq!(own_b.card().accepts, vec!["chat"]);
    assert!(
        own_b
            .card()
            .message_types
            .contains(&"capability_query".to_owned())
    );
    assert_eq!(peer_card(&b.handle, ida).await.card().entity_id, ida);

    let new = b
        .handle
        .set_card(content("bee", &["chat", "acme"]))
        .await
        .expect("set");
    assert_eq!(new.card().sequence, 2);
    card_updated(&mut ea, idb, 2).await;
    let seen = peer_card(&a.handle, idb).await;
    assert_eq!(seen.card().sequence, 2);
    assert!(seen.card().accepts("acme"));
}

/// A `capability_response` request from `raw` carrying `payload`: `None` if
/// accepted, else the error code.
async fn push(raw: &mut RawPeer, to: EntityId, payload: Vec<u8>) -> Option<String> {
    let mut d = raw.draft(to, "capability_response");
    d.payload = payload;
    raw.send(d.sign(&raw.identity).encode()).await
}

fn card_of(id: &Identity, c: &CardContent, sequence: u64) -> peer_node::services::card::Card {
    let facts = NodeFacts {
        message_types: vec![],
        limits: Default::default(),
    };
    signed::build(id, c, &facts, now_ms(), sequence)
}

#[tokio::test]
async fn forged_stale_and_oversized_cards_are_refused() {
    let node = start_node_with(TCP, |c| c.card.max_bytes = 4096).await;
    let to = node.handle.entity_id();
    let mut raw = RawPeer::connect(&node.addr).await;
    let me = Identity::from_secret(&raw.identity.secret_bytes());
    let other = Identity::from_secret(&[9; 32]);
    let c = content("raw", &[]);

    // The raw peer's card, signed by another key.
    let raw_card = serde_json::to_string(&card_of(&me, &c, 1)).expect("json");
    let forged = format!(
        r#"{{"card":{raw_card},"signature":"{}"}}"#,
        hex::encode(other.sign(&signed_bytes(raw_card.as_bytes())))
    );
    let code = push(&mut raw, to, forged.into_bytes()).await;
    assert_eq!(code.as_deref(), Some("INVALID_SIGNATURE"));
    // Another key, claiming the raw peer's entity id: the key does not hash to it.
    let mut unbound = card_of(&other, &c, 1);
    unbound.entity_id = me.entity_id();
    let code = push(&mut raw, to, SignedCard::sign(unbound, &other).to_payload()).await;
    assert_eq!(code.as_deref(), Some("UNKNOWN_SENDER"));
    // Another entity's genuine card, relayed.
    let theirs = SignedCard::sign(card_of(&other, &c, 1), &other).to_payload();
    let code = push(&mut raw, to, theirs).await;
    assert_eq!(code.as_deref(), Some("WRONG_SENDER"));

    // A genuine card, then an older one and another of the same sequence.
    let five = SignedCard::sign(card_of(&me, &c, 5), &me);
    assert_eq!(push(&mut raw, to, five.to_payload()).await, None);
    let four = SignedCard::sign(card_of(&me, &c, 4), &me).to_payload();
    let code = push(&mut raw, to, four).await;
    assert_eq!(code.as_deref(), Some("REPLAY_DETECTED"));
    let twin = SignedCard::sign(card_of(&me, &content("twin", &[]), 5), &me).to_payload();
    let code = push(&mut raw, to, twin).await;
    assert_eq!(code.as_deref(), Some("INVALID_STATE"));
    // Larger than card.max_bytes, however genuine.
    let mut big = content("raw", &[]);
    big.description = "x".repeat(5000);
    let big = SignedCard::sign(card_of(&me, &big, 6), &me).to_payload();
    let code = push(&mut raw, to, big).await;
    assert_eq!(code.as_deref(), Some("MESSAGE_TOO_LARGE"));
    let code = push(&mut raw, to, b"{\"card\":1}".to_vec()).await;
    assert_eq!(code.as_deref(), Some("MALFORMED_MESSAGE"));

    // The node kept the genuine card and keeps running.
    assert_eq!(peer_card(&node.handle, me.entity_id()).await, five);
    let ping = raw.draft(to, "ping").sign(&raw.identity).encode();
    assert_eq!(raw.send(ping).await, None);
}

#[tokio::test]
async fn a_namespaced_type_is_delivered_when_declared_and_refused_when_not() {
    let a = start_node_with(TCP, |_| {}).await;
    let b = start_node_with(TCP, |c| declare(c, "bee", &["chat"])).await;
    let (ida, idb) = (a.handle.entity_id(), b.handle.entity_id());
    let mut ea = a.handle.subscribe();
    let mut eb = b.handle.subscribe();
    a.handle.connect(b.addr.clone()).await.expect("connect");
    card_updated(&mut ea, idb, 1).await;

    let chat: MsgType = "chat.message".parse().expect("valid");
    a.handle
        .send(idb, chat.clone(), br#"{"text":"hi"}"#.to_vec())
        .await
        .expect("chat is accepted");
    assert_eq!(
        next_message(&mut eb).await,
        (ida, "chat.message".into(), 13)
    );
    // Large enough for a chunked transfer.
    let big = format!(r#"{{"text":"{}"}}"#, "y".repeat(40_000));
    a.handle
        .send(idb, chat, big.clone().into_bytes())
        .await
        .expect("a chunked chat message");
    assert_eq!(
        next_message(&mut eb).await,
        (ida, "chat.message".into(), big.len())
    );

    // B's card does not accept `acme`: A does not even send it.
    let acme: MsgType = "acme.order".parse().expect("valid");
    match a.handle.send(idb, acme, b"{}".to_vec()).await {
        Err(NodeError::Rejected { code, reason, .. }) => {
            assert_eq!(code, "UNSUPPORTED_MSG_TYPE");
            assert!(reason.contains("not sent"), "{reason}");
        }
        other => panic!("expected a local refusal, got {other:?}"),
    }

    // A sender that does not look at cards is refused by the receiver.
    let mut raw = RawPeer::connect(&b.addr).await;
    wait_connected(&b.handle, raw.entity_id()).await;
    let mut session = raw.open_session(idb).await;
    let code = raw
        .send_sealed(&mut session, idb, "acme.order", b"{}")
        .await;
    assert_eq!(code.as_deref(), Some("UNSUPPORTED_MSG_TYPE"));
    let code = raw.send_sealed(&mut session, idb, "chat.note", b"{}").await;
    assert_eq!(code, None);
    assert_eq!(
        next_message(&mut eb).await,
        (raw.entity_id(), "chat.note".into(), 2)
    );
}

#[tokio::test]
async fn the_card_and_its_sequence_survive_a_restart() {
    let first = start_node_with(TCP, |_| {}).await;
    let set = first
        .handle
        .set_card(content("kept", &["chat"]))
        .await
        .expect("set");
    assert_eq!(set.card().sequence, 2, "the first card was 1");
    let common::TestNode { handle, dir, .. } = first;
    drop(handle);
    let db = dir.path().join(peer_node::data_dir::DB_FILE);
    for _ in 0..500 {
        if Store::open(&db).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = start_node_in(dir, TCP, |_| {}, |b| b).await;
    assert_eq!(*second.handle.card().expect("card"), *set, "kept as signed");
    let next = second
        .handle
        .set_card(content("next", &[]))
        .await
        .expect("set");
    assert_eq!(next.card().sequence, 3);
}

const TOKEN: &str = "t0ken";

async fn call(
    router: &axum::Router,
    method: &str,
    path: &str,
    auth: bool,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let mut req = Request::builder().method(method).uri(path);
    if auth {
        req = req.header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
    }
    let req = req.body(Body::from(body.to_owned())).expect("request");
    let response = router.clone().oneshot(req).await.expect("infallible");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    (status, serde_json::from_slice(&bytes).expect("JSON"))
}

#[tokio::test]
async fn the_card_routes_of_the_api() {
    let a = start_node_with(TCP, |_| {}).await;
    let b = start_node_with(TCP, |_| {}).await;
    let idb = b.handle.entity_id();
    let mut ea = a.handle.subscribe();
    a.handle.connect(b.addr.clone()).await.expect("connect");
    card_updated(&mut ea, idb, 1).await;
    let router = peer_node::api::router(
        a.handle.clone(),
        &Default::default(),
        TOKEN.to_owned(),
        CancellationToken::new(),
    );

    let (status, own) = call(&router, "GET", "/v1/card", true, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(own["card"]["entity_id"], a.handle.entity_id().to_string());
    assert_eq!(own["card"]["sequence"], 1);
    assert_eq!(own["card"]["protocol_versions"][0], "1.2");
    assert_eq!(own["signature"].as_str().map(str::len), Some(128));
    let (status, _) = call(&router, "GET", "/v1/card", false, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let skill = Skill {
        id: "sum".into(),
        name: "Summarise".into(),
        description: "Summarises text".into(),
        tags: vec!["text".into()],
        input_modes: vec!["text/plain".into()],
        output_modes: vec![],
        examples: vec!["summarise this".into()],
    };
    let mut body = content("ay", &["chat"]);
    body.skills = vec![skill];
    let text = serde_json::to_string(&body).expect("json");
    let (status, set) = call(&router, "PUT", "/v1/card", true, &text).await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(set["card"]["sequence"], 2);
    assert_eq!(set["card"]["skills"][0]["input_modes"][0], "text/plain");
    for bad in [
        r#"{"name":"x","accepts":["Not.Ok"]}"#,
        r#"{"name":"x","colour":"red"}"#,
        r#"{"description":"no name"}"#,
    ] {
        let (status, e) = call(&router, "PUT", "/v1/card", true, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {e}");
        assert_eq!(e["error"]["code"], "INVALID_REQUEST");
    }

    // Public: no token needed.
    let (status, agent) = call(&router, "GET", "/.well-known/agent-card.json", false, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(agent["name"], "ay");
    assert_eq!(agent["skills"][0]["inputModes"][0], "text/plain");
    assert_eq!(agent["skills"][0]["examples"][0], "summarise this");
    assert_eq!(agent["defaultInputModes"][0], "application/json");
    assert!(agent["capabilities"].is_object() && agent["supportedInterfaces"].is_array());
    assert_eq!(agent["peerProtocol"]["card"]["sequence"], 2);

    let path = format!("/v1/peers/{idb}/card");
    let (status, peer) = call(&router, "GET", &path, true, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(peer["card"]["entity_id"], idb.to_string());
    let stranger = Identity::from_secret(&[7; 32]).entity_id();
    let (status, e) = call(
        &router,
        "GET",
        &format!("/v1/peers/{stranger}/card"),
        true,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(e["error"]["code"], "NOT_FOUND");
    let (status, _) = call(&router, "GET", "/v1/peers/nope/card", true, "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
