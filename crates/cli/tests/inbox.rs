//! The durable inbox across a crash, with real `peer run` processes on
//! 127.0.0.1: node A sends 1,000 messages to node B, which no agent reads;
//! B is killed with SIGKILL and started again on the same data directory.
//! Its agent then reads every message from `GET /v1/events`, in order and
//! once each, acknowledging only the first 600; a second stream, opened
//! without `Last-Event-ID`, serves exactly the other 400 again, and
//! `GET /v1/inbox` and `peer inbox` agree with it.

use std::io::{BufRead, BufReader};
use std::time::Instant;

use reqwest::StatusCode;
use reqwest::blocking::Response;
use serde_json::{Value, json};

mod common;
use common::{Api, Node, connect};

/// Messages sent to B before it is killed.
const SENT: u64 = 1000;
/// The agent acknowledges the messages read, this many at a time...
const ACK_EVERY: u64 = 100;
/// ...until it has acknowledged this many.
const ACKED: u64 = 600;

impl Api<'_> {
    /// Sends the message `{"n": n}` to `to` and checks it was accepted.
    fn send(&self, to: &str, n: u64) {
        let body = json!({"to": to, "msg_type": "message", "payload": {"n": n}});
        let answer = self.post("/v1/messages", &body);
        assert!(answer["message_id"].is_string(), "message {n}: {answer}");
    }

    /// Opens `GET /v1/events` without `Last-Event-ID`.
    fn events(&self) -> Events {
        let resp = self
            .http
            .get(format!("{}/v1/events", self.base))
            .bearer_auth(&self.token)
            .send()
            .unwrap_or_else(|e| self.node.fail(&format!("/v1/events: {e}")));
        assert_eq!(resp.status(), StatusCode::OK, "/v1/events");
        Events {
            body: BufReader::new(resp),
        }
    }

    /// `POST /v1/inbox/ack` up to `id`; checks its answer.
    fn ack(&self, id: u64, acked: u64, remaining: u64) {
        let answer = self.post("/v1/inbox/ack", &json!({ "up_to": id }));
        assert_eq!(
            answer,
            json!({"acked": acked, "remaining": remaining}),
            "ack up to {id}"
        );
    }
}

/// A `/v1/events` stream being read.
struct Events {
    body: BufReader<Response>,
}

impl Events {
    /// The SSE id and the JSON of the next event; keep-alive comments are
    /// skipped.
    fn next(&mut self) -> (Option<u64>, Value) {
        let mut id = None;
        let mut data = Vec::new();
        loop {
            let mut line = String::new();
            let read = self.body.read_line(&mut line).expect("reading events");
            assert!(read > 0, "the event stream ended");
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if data.is_empty() {
                    continue;
                }
                let event = serde_json::from_str(&data.join("\n")).expect("an event is JSON");
                return (id, event);
            }
            if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim().parse().expect("an event id is a number"));
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
            }
        }
    }

    /// The id and `n` of the next `message` event. Other events (peers
    /// connecting) are skipped; none of them is durable here (there are no
    /// tasks), so none carries an id.
    fn next_message(&mut self) -> (u64, u64) {
        loop {
            let (id, event) = self.next();
            if event["type"] != "message" {
                assert_eq!(id, None, "no other durable event: {event}");
                continue;
            }
            let id = id.unwrap_or_else(|| panic!("a message without an SSE id: {event}"));
            assert_eq!(event["event_id"], id, "the SSE id is the event's: {event}");
            let n = event["payload"]["n"].as_u64().expect("n");
            return (id, n);
        }
    }
}

/// The `(id, n)` of every message waiting in `api`'s inbox, read a page of
/// `limit` at a time.
fn inbox(api: &Api, limit: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = api.get(&format!("/v1/inbox?after={after}&limit={limit}"));
        let events = page["events"].as_array().expect("events");
        if events.is_empty() {
            assert_eq!(page["next_after"], after, "{page}");
            return out;
        }
        assert!(events.len() <= limit, "{} > {limit}", events.len());
        for e in events {
            let id = e["id"].as_u64().expect("id");
            assert_eq!(e["event"]["event_id"], id, "{e}");
            out.push((id, e["event"]["payload"]["n"].as_u64().expect("n")));
        }
        after = page["next_after"].as_u64().expect("next_after");
        assert_eq!(Some(after), out.last().map(|&(id, _)| id), "{page}");
    }
}

#[test]
fn what_b_accepted_survives_sigkill_and_waits_until_acknowledged() {
    let began = Instant::now();
    let root = tempfile::tempdir().expect("tempdir");
    let no_rate_limits = |cmd: &mut std::process::Command| {
        cmd.env("PEER_RATE_LIMITS__ENABLED", "false");
    };
    let a = Node::start(root.path(), "a", |_| {});
    let mut b = Node::start(root.path(), "b", no_rate_limits);
    let (b_id, b_addr) = b.id_and_addr();
    let api_a = Api::new(&a);
    connect(&api_a, &b_addr, &b_id);

    // No agent reads B's events: each message is accepted once it is stored.
    let sending = Instant::now();
    for n in 0..SENT {
        api_a.send(&b_id, n);
    }
    let sent_in = sending.elapsed();

    b.kill();
    drop(b);
    let b = Node::start(root.path(), "b", no_rate_limits);
    let (_, b_addr) = b.id_and_addr();
    let api_b = Api::new(&b);

    // B's agent reads everything, acknowledging as it goes, but only up to
    // the 600th message.
    let mut events = api_b.events();
    let mut read = Vec::new();
    for n in 0..SENT {
        let (id, got) = events.next_message();
        assert_eq!(got, n, "in the order sent, each once");
        if let Some(&(last, _)) = read.last() {
            assert!(id > last, "ids increase: {id} after {last}");
        }
        read.push((id, got));
        let count = n + 1;
        if count % ACK_EVERY == 0 && count <= ACKED {
            api_b.ack(id, ACK_EVERY, SENT - count);
        }
    }
    // Nothing follows the 1,000th but what is sent next.
    connect(&api_a, &b_addr, &b_id);
    api_a.send(&b_id, SENT);
    let marker = events.next_message();
    assert_eq!(marker.1, SENT, "the next message after the last one");
    read.push(marker);
    drop(events);

    // A new stream without Last-Event-ID serves what was not acknowledged,
    // with the same ids, and nothing else.
    let mut again = api_b.events();
    let unacked = &read[ACKED as usize..];
    for &want in unacked {
        assert_eq!(again.next_message(), want, "served again, in order");
    }
    api_a.send(&b_id, SENT + 1);
    let (last_id, n) = again.next_message();
    assert_eq!(
        n,
        SENT + 1,
        "nothing between the unacknowledged and the new"
    );
    drop(again);

    // The inbox agrees, page by page.
    let mut waiting = unacked.to_vec();
    waiting.push((last_id, SENT + 1));
    assert_eq!(inbox(&api_b, 150), waiting);

    // So does `peer inbox`, which also acknowledges.
    let page = b.cli(&["inbox", "--limit", "2"]);
    let first_two: Vec<u64> = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(first_two, [waiting[0].0, waiting[1].0], "{page}");
    assert_eq!(page["next_after"], waiting[1].0, "{page}");
    let before_last_two = waiting[waiting.len() - 3].0;
    let tail = b.cli(&["inbox", "--after", &before_last_two.to_string()]);
    assert_eq!(tail["events"].as_array().map(Vec::len), Some(2), "{tail}");
    assert_eq!(
        tail["events"][1]["event"]["payload"]["n"],
        SENT + 1,
        "{tail}"
    );
    let acked = b.cli(&["inbox", "--ack", &last_id.to_string()]);
    assert_eq!(acked, json!({"acked": waiting.len(), "remaining": 0}));
    assert_eq!(
        b.cli(&["inbox"]),
        json!({"events": [], "next_after": 0}),
        "nothing waits"
    );

    eprintln!(
        "{SENT} messages sent in {sent_in:?}; the whole test took {:?}",
        began.elapsed()
    );
}
