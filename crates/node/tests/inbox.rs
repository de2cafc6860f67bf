//! The durable inbox between real nodes on 127.0.0.1: what a node accepted
//! waits, in order, until its agent acknowledges it, across a restart; a
//! sender past its share is refused `INBOX_FULL` and loses nothing; the event
//! stream resumes after `Last-Event-ID`.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, header};
use futures::StreamExt;
use peer_core::MsgType;
use peer_node::NodeError;
use peer_node::node::Event;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

mod common;
use common::{TestNode, metric, pair, restart, start_node_with, wait_connected};

const TCP: &str = "/ip4/127.0.0.1/tcp/0";

fn no_rate_limits(c: &mut peer_node::Config) {
    c.rate_limits.enabled = false;
}

fn message() -> MsgType {
    "message".parse().expect("valid")
}

/// Sends messages `{"n": from..to}` from `a` to `b`, one after the other.
async fn send_all(a: &TestNode, b: &TestNode, range: std::ops::Range<u64>) {
    let to = b.handle.entity_id();
    for n in range {
        let payload = json!({ "n": n }).to_string();
        a.handle
            .send(to, message(), payload)
            .await
            .expect("accepted");
    }
}

/// The `n` of every message waiting in `node`'s inbox, oldest first, with its id.
async fn waiting(node: &TestNode) -> Vec<(u64, u64)> {
    let page = node.handle.inbox(0, 1000).await.expect("inbox");
    page.iter()
        .map(|stored| {
            let event: Value = serde_json::from_str(stored.event.get()).expect("json");
            assert_eq!(event["type"], "message");
            assert_eq!(event["event_id"], stored.id, "the id is in the event too");
            (stored.id, event["payload"]["n"].as_u64().expect("n"))
        })
        .collect()
}

#[tokio::test]
async fn accepted_messages_wait_in_order_until_acknowledged_and_survive_a_restart() {
    let (a, b) = pair(TCP, no_rate_limits).await;
    // Nobody reads B's events: everything accepted waits in its inbox.
    send_all(&a, &b, 0..300).await;
    let held = waiting(&b).await;
    let ns: Vec<u64> = held.iter().map(|&(_, n)| n).collect();
    assert_eq!(ns, (0..300).collect::<Vec<_>>(), "in the order sent");
    assert!(held.windows(2).all(|w| w[0].0 < w[1].0), "ids increase");
    assert_eq!(metric(&b.handle, "peer_inbox_events"), 300.0);

    // The agent handled the first 100.
    let acked = b.handle.ack(held[99].0).await.expect("ack");
    assert_eq!((acked.acked, acked.remaining), (100, 200));
    // Acknowledging again releases nothing more.
    let again = b.handle.ack(held[99].0).await.expect("ack");
    assert_eq!((again.acked, again.remaining), (0, 200));

    let b = restart(b, TCP, no_rate_limits).await;
    let after = waiting(&b).await;
    assert_eq!(after, held[100..].to_vec(), "the rest, with the same ids");
    assert_eq!(metric(&b.handle, "peer_inbox_events"), 200.0);

    // New events get ids after the old ones.
    a.handle.connect(b.addr.clone()).await.expect("connect");
    wait_connected(&b.handle, a.handle.entity_id()).await;
    send_all(&a, &b, 300..301).await;
    let last = waiting(&b).await.pop().expect("one more");
    assert_eq!(last.1, 300);
    assert!(last.0 > held[299].0);
}

// Several workers, so that envelopes are signed in parallel and come back out
// of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_messages_in_flight_at_once_never_wait_for_each_other() {
    // B waits a minute for a gap in a session's order: if the sender ever let
    // a later message take the last stream while an earlier one waited for
    // one, the later ones' answers (held until they are delivered in order)
    // and the earlier one would wait for each other for that long.
    let tune = |c: &mut peer_node::Config| {
        no_rate_limits(c);
        c.security.reorder_wait_ms = 60_000;
        c.network.max_concurrent_streams = 16;
    };
    let (a, b) = pair(TCP, tune).await;
    let to = b.handle.entity_id();
    let sends = (0..400u64).map(|n| {
        let handle = a.handle.clone();
        tokio::spawn(async move {
            let payload = json!({ "n": n }).to_string();
            handle.send(to, message(), payload).await
        })
    });
    let all = futures::future::join_all(sends);
    let results = tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("no send waits for the gap timeout");
    for r in results {
        r.expect("task").expect("accepted");
    }
    let mut ns: Vec<u64> = waiting(&b).await.iter().map(|&(_, n)| n).collect();
    assert_eq!(ns.len(), 400);
    ns.sort_unstable();
    assert_eq!(ns, (0..400).collect::<Vec<_>>(), "each once");
}

#[tokio::test]
async fn a_sender_past_its_share_is_refused_inbox_full_and_nothing_accepted_is_lost() {
    let tune = |c: &mut peer_node::Config| {
        no_rate_limits(c);
        c.inbox.max_events_per_sender = 5;
    };
    let (a, b) = pair(TCP, tune).await;
    send_all(&a, &b, 0..5).await;
    let to = b.handle.entity_id();
    match a.handle.send(to, message(), r#"{"n":5}"#).await {
        Err(NodeError::Rejected {
            code,
            retry_after_ms,
            ..
        }) => {
            assert_eq!(code, "INBOX_FULL");
            assert_eq!(retry_after_ms, Some(5000), "the configured wait");
        }
        other => panic!("expected INBOX_FULL, got {other:?}"),
    }
    assert_eq!(metric(&b.handle, "peer_inbox_refused_total"), 1.0);

    // Another sender has a share of its own.
    let c = start_node_with(TCP, tune).await;
    c.handle.connect(b.addr.clone()).await.expect("connect");
    send_all(&c, &b, 100..101).await;

    // What was accepted is all there; once the agent has read it, A sends again.
    let held = waiting(&b).await;
    let ns: Vec<u64> = held.iter().map(|&(_, n)| n).collect();
    assert_eq!(ns, vec![0, 1, 2, 3, 4, 100]);
    b.handle.ack(held[5].0).await.expect("ack");
    send_all(&a, &b, 5..6).await;
    assert_eq!(waiting(&b).await.len(), 1);
}

#[tokio::test]
async fn a_live_reader_gets_each_event_once_with_its_id() {
    let (a, b) = pair(TCP, no_rate_limits).await;
    let mut events = b.handle.subscribe();
    send_all(&a, &b, 0..20).await;
    let mut seen = Vec::new();
    while seen.len() < 20 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("in time")
            .expect("event");
        if let Event::Message { .. } = &event {
            seen.push(event.event_id().expect("a stored event has its id"));
        }
    }
    let stored: Vec<u64> = waiting(&b).await.iter().map(|&(id, _)| id).collect();
    assert_eq!(seen, stored, "published once stored, with the stored ids");
}

/// The first `count` message events of an SSE response body, with their ids
/// and their JSON text (`data:` lines joined with `\n`, as readers do).
async fn read_sse_text(body: Body, count: usize) -> Vec<(u64, String)> {
    let mut stream = body.into_data_stream();
    let mut text = String::new();
    let mut out = Vec::new();
    while out.len() < count {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("chunk");
        text.push_str(std::str::from_utf8(&chunk).expect("utf8"));
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            let mut id = None;
            let mut data: Option<String> = None;
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().parse::<u64>().expect("numeric id"));
                } else if let Some(v) = line.strip_prefix("data:") {
                    let v = v.strip_prefix(' ').unwrap_or(v);
                    match &mut data {
                        Some(d) => {
                            d.push('\n');
                            d.push_str(v);
                        }
                        None => data = Some(v.to_owned()),
                    }
                }
            }
            let Some(data) = data else { continue };
            let event: Value = serde_json::from_str(&data).expect("json");
            if event["type"] == "message" {
                out.push((id.expect("a message has an id"), data));
            }
        }
    }
    out
}

/// The `(id, n)` of the first `count` message events of an SSE response body.
async fn read_sse(body: Body, count: usize) -> Vec<(u64, u64)> {
    read_sse_text(body, count)
        .await
        .into_iter()
        .map(|(id, data)| {
            let event: Value = serde_json::from_str(&data).expect("json");
            (id, event["payload"]["n"].as_u64().expect("n"))
        })
        .collect()
}

/// The node's HTTP API, token `t`.
fn api(node: &TestNode) -> axum::Router {
    peer_node::api::router(
        node.handle.clone(),
        &Default::default(),
        "t".into(),
        CancellationToken::new(),
    )
}

/// `GET /v1/events` of `node`'s API, after `last` if given.
async fn event_stream(node: &TestNode, last: Option<u64>) -> Body {
    let router = api(node);
    let mut req = Request::get("/v1/events").header(header::AUTHORIZATION, "Bearer t");
    if let Some(id) = last {
        req = req.header("Last-Event-ID", id.to_string());
    }
    let resp = router
        .oneshot(req.body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    assert_eq!(
        resp.headers()[header::CONTENT_TYPE],
        "text/event-stream",
        "an event stream"
    );
    resp.into_body()
}

#[tokio::test]
async fn a_large_message_waits_in_a_file_of_its_own_is_served_whole_and_goes_once_acknowledged() {
    const MIB: usize = 1 << 20;
    let tune = |c: &mut peer_node::Config| {
        no_rate_limits(c);
        c.transfer.max_message_size = 4 * MIB as u64;
    };
    let (a, b) = pair(TCP, tune).await;
    // 2 MiB, with line breaks between its tokens: an event stream must split
    // them into `data:` lines.
    let payload = format!("{{\"n\": 7,\r\n \"blob\":\n\"{}\"\r}}", "x".repeat(2 * MIB));
    let live = tokio::spawn(read_sse_text(event_stream(&b, None).await, 1));
    a.handle
        .send(b.handle.entity_id(), message(), payload.clone())
        .await
        .expect("accepted");
    // Readers see each line break as `\n`; the JSON is the same.
    let as_read = payload.replace("\r\n", "\n").replace('\r', "\n");
    let (id, data) = live.await.expect("reader").remove(0);
    assert!(
        data.ends_with(&format!(",\"payload\":{as_read}}}")),
        "whole, as sent"
    );
    let event: Value = serde_json::from_str(&data).expect("json");
    assert_eq!(event["event_id"], id);
    assert_eq!(
        event["payload"]["blob"].as_str().map(str::len),
        Some(2 * MIB)
    );

    let file = b.dir.path().join("inbox").join(format!("{id}.json"));
    assert!(file.is_file(), "kept in {}", file.display());
    // A file no row names (left by a crash) goes at the next start; the
    // message's own file stays and is served from there.
    let stray = b.dir.path().join("inbox").join("999999.json");
    std::fs::write(&stray, "{}").expect("write");
    let b = restart(b, TCP, tune).await;
    assert!(!stray.exists(), "the stray file was removed at start");
    assert!(file.is_file());
    let again = read_sse_text(event_stream(&b, Some(id - 1)).await, 1).await;
    assert_eq!(again[0].0, id);
    let stored: Value = serde_json::from_str(&again[0].1).expect("json");
    assert_eq!(stored, event, "the same event after a restart");

    // Acknowledged: the row and the file go.
    let acked = b.handle.ack(id).await.expect("ack");
    assert_eq!(acked.acked, 1);
    assert!(!file.exists(), "removed once acknowledged");
    assert!(waiting(&b).await.is_empty());

    // A file lost behind the node's back: a stream says so and ends (its
    // reader resumes from its last id), rather than going on with live
    // events past the one it could not read.
    a.handle.connect(b.addr.clone()).await.expect("connect");
    wait_connected(&b.handle, a.handle.entity_id()).await;
    a.handle
        .send(b.handle.entity_id(), message(), payload)
        .await
        .expect("accepted");
    let lost = waiting(&b).await[0].0;
    std::fs::remove_file(b.dir.path().join("inbox").join(format!("{lost}.json"))).expect("rm");
    let body = event_stream(&b, None).await;
    let text = tokio::time::timeout(Duration::from_secs(10), axum::body::to_bytes(body, 1 << 20))
        .await
        .expect("the stream ends")
        .expect("body");
    let text = String::from_utf8(text.to_vec()).expect("utf8");
    assert!(text.contains(r#""type":"error""#), "{text}");
    assert!(text.contains("is missing"), "{text}");
    // Reading the inbox is this node's storage failing, not a delivery.
    let e = b
        .handle
        .inbox(0, 10)
        .await
        .expect_err("a held file is missing");
    assert!(
        matches!(&e, NodeError::Storage(m) if m.contains("is missing")),
        "{e:?}"
    );
    let resp = api(&b)
        .oneshot(
            Request::get("/v1/inbox")
                .header(header::AUTHORIZATION, "Bearer t")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    assert_eq!(resp.status(), 500);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    let body: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["error"]["code"], "STORAGE_FAILED", "{body}");
    // The node goes on: the event can still be acknowledged away.
    assert_eq!(b.handle.ack(lost).await.expect("ack").acked, 1);
    assert!(waiting(&b).await.is_empty());
}

#[tokio::test]
async fn the_event_stream_starts_with_what_waits_and_resumes_after_last_event_id() {
    let (a, b) = pair(TCP, no_rate_limits).await;
    send_all(&a, &b, 0..10).await;
    // A first reader gets everything waiting, then what arrives live.
    let reading = tokio::spawn(read_sse(event_stream(&b, None).await, 15));
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_all(&a, &b, 10..15).await;
    let read = reading.await.expect("reader");
    assert_eq!(
        read.iter().map(|&(_, n)| n).collect::<Vec<_>>(),
        (0..15).collect::<Vec<_>>()
    );

    // It dropped after the 7th; it resumes after that one's id, without acking.
    let rest = read_sse(event_stream(&b, Some(read[6].0)).await, 8).await;
    assert_eq!(rest, read[7..].to_vec());

    // Acknowledged events are not served again; a reader without an id gets
    // only what still waits.
    b.handle.ack(read[11].0).await.expect("ack");
    let left = read_sse(event_stream(&b, None).await, 3).await;
    assert_eq!(left, read[12..].to_vec());

    // A malformed Last-Event-ID is the client's error.
    let router = peer_node::api::router(
        b.handle.clone(),
        &Default::default(),
        "t".into(),
        CancellationToken::new(),
    );
    let bad = router
        .oneshot(
            Request::get("/v1/events")
                .header(header::AUTHORIZATION, "Bearer t")
                .header("Last-Event-ID", "abc")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    assert_eq!(bad.status(), axum::http::StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_node_whose_disk_filled_up_takes_messages_again_once_there_is_room() {
    let (disk, b, a) = common::on_small_disk(16, no_rate_limits).await;
    send_all(&a, &b, 0..1).await;

    // Messages of 20 KB until B cannot store one: it refuses it UNAVAILABLE,
    // and once its database failed an I/O, every message after it.
    disk.fill();
    let to = b.handle.entity_id();
    let text = "x".repeat(20_000);
    let send = |n: u64| {
        let payload = json!({ "n": n, "text": text }).to_string();
        a.handle.send(to, message(), payload)
    };
    let mut refused = None;
    for n in 1..200 {
        match send(n).await {
            Ok(_) => {}
            Err(NodeError::Rejected { code, .. }) => {
                refused = Some((n, code));
                break;
            }
            Err(e) => panic!("message {n}: {e}"),
        }
    }
    let (first_refused, code) = refused.expect("the disk never filled up");
    assert_eq!(code, "UNAVAILABLE");
    let again = send(1_000).await;
    assert!(
        matches!(&again, Err(NodeError::Rejected { code, .. }) if code == "UNAVAILABLE"),
        "{again:?}"
    );

    // With room again B reopens its database and takes messages, without a
    // restart; what it stored before is there.
    disk.free();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match send(2_000).await {
            Ok(_) => break,
            Err(NodeError::Rejected { code, .. })
                if code == "UNAVAILABLE" && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("after the disk was freed: {other:?}"),
        }
    }
    let ns: Vec<u64> = waiting(&b).await.into_iter().map(|(_, n)| n).collect();
    let stored: Vec<u64> = (0..first_refused).chain([2_000]).collect();
    assert_eq!(ns, stored);
}
