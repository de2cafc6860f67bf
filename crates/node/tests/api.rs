//! The local API's caps and checks through the real router (`oneshot`
//! requests): what is refused at each bound, and that room comes back when
//! requests end; and that its OpenAPI description matches the router.

use std::collections::BTreeSet;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use futures::StreamExt;
use peer_core::Identity;
use peer_node::config::ApiConfig;
use peer_node::net::codec::Response as WireResponse;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

mod common;
use common::{RawPeer, TestNode, start_node_with, wait_connected};

const TCP: &str = "/ip4/127.0.0.1/tcp/0";
const TOKEN: &str = "t0ken";

/// A node tuned by `tune`, and its API router with the caps of `api`.
async fn node_and_api(
    api: ApiConfig,
    tune: impl FnOnce(&mut peer_node::Config),
) -> (TestNode, Router) {
    let node = start_node_with(TCP, tune).await;
    let router = peer_node::api::router(
        node.handle.clone(),
        &api,
        TOKEN.to_owned(),
        CancellationToken::new(),
    );
    (node, router)
}

fn get(path: &str) -> Request<Body> {
    Request::get(path)
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .expect("request")
}

/// A POST with `Content-Length: declared` if given (the router takes the
/// header as is; the body may be shorter).
fn post(path: &str, body: Body, declared: Option<usize>) -> Request<Body> {
    let mut req = Request::post(path).header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
    if let Some(n) = declared {
        req = req.header(header::CONTENT_LENGTH, n);
    }
    req.body(body).expect("request")
}

async fn call(router: &Router, req: Request<Body>) -> Response {
    router.clone().oneshot(req).await.expect("infallible")
}

/// The status and JSON body of an answer.
async fn answer(response: Response) -> (StatusCode, serde_json::Value) {
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    (
        status,
        serde_json::from_slice(&body).expect("a JSON answer"),
    )
}

/// Checks that `response` is the API's 503 for a cap, naming `key`.
async fn assert_refused(response: Response, key: &str) {
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    let (status, body) = answer(response).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "UNAVAILABLE", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(key), "{message}");
}

/// A request whose body the test has not finished: its handler has read the
/// first piece and waits for the rest.
struct Held {
    task: JoinHandle<Result<Response, std::convert::Infallible>>,
    finish: oneshot::Sender<Bytes>,
}

impl Held {
    /// Sends a POST to `path` whose body starts with `first`, with
    /// `Content-Length: declared` if given, and waits until its handler has
    /// read `first` and asks for more.
    async fn start(router: &Router, path: &str, first: &[u8], declared: Option<usize>) -> Self {
        let (reading_tx, reading) = oneshot::channel();
        let (finish, rest) = oneshot::channel::<Bytes>();
        let first = Bytes::copy_from_slice(first);
        let pieces = futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(
            futures::stream::once(async move {
                _ = reading_tx.send(());
                rest.await.map_err(std::io::Error::other)
            }),
        );
        let req = post(path, Body::from_stream(pieces), declared);
        let task = tokio::spawn(router.clone().oneshot(req));
        reading
            .await
            .expect("the handler reads the body: it was not refused");
        Self { task, finish }
    }

    /// Sends the rest of the body and returns the answer.
    async fn end(self, rest: &[u8]) -> Response {
        _ = self.finish.send(Bytes::copy_from_slice(rest));
        self.task.await.expect("task").expect("infallible")
    }
}

#[tokio::test]
async fn requests_over_the_concurrency_cap_are_refused_at_once_until_one_ends() {
    let caps = ApiConfig {
        max_concurrent_requests: 2,
        ..ApiConfig::default()
    };
    let (_node, router) = node_and_api(caps, |_| {}).await;
    // Two requests being handled: their bodies are not finished.
    let first = Held::start(&router, "/v1/messages", b"{", None).await;
    let second = Held::start(&router, "/v1/peers", b"{", None).await;
    // A third, on any route but the event stream, is refused at once.
    for req in [
        get("/metrics"),
        get("/v1/health"),
        get("/v1/stats"),
        post("/v1/messages", Body::from("{}"), None),
    ] {
        let refused = call(&router, req).await;
        assert_refused(refused, "api.max_concurrent_requests is 2").await;
    }
    // Event streams do not count against it.
    let stream = call(&router, get("/v1/events")).await;
    assert_eq!(stream.status(), StatusCode::OK);
    // One ends (its body is no message: 400), and a request is served again,
    // but only one.
    let (status, _) = answer(first.end(b"}").await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        call(&router, get("/metrics")).await.status(),
        StatusCode::OK
    );
    let third = Held::start(&router, "/v1/messages", b"{", None).await;
    let refused = call(&router, get("/metrics")).await;
    assert_refused(refused, "api.max_concurrent_requests").await;
    for held in [second, third] {
        let (status, _) = answer(held.end(b"}").await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn request_bodies_over_the_byte_budget_are_refused_until_room_comes_back() {
    const BUDGET: usize = 300_000;
    let caps = ApiConfig {
        max_body_bytes_in_flight: BUDGET,
        ..ApiConfig::default()
    };
    // Bodies of up to 200,000 + 64 KiB bytes.
    let (_node, router) = node_and_api(caps, |c| c.transfer.max_message_size = 200_000).await;
    // Declared lengths are reserved before the body is read: the budget is
    // exactly full with these two.
    let big = Held::start(&router, "/v1/messages", b"{", Some(200_000)).await;
    let rest = Held::start(&router, "/v1/messages", b"{", Some(BUDGET - 200_000)).await;
    // One byte more, declared or as it arrives, on either route with a body.
    for req in [
        post("/v1/messages", Body::from("{"), Some(1)),
        post("/v1/peers", Body::from("{"), Some(1)),
        post("/v1/messages", Body::from("{"), None),
    ] {
        let refused = call(&router, req).await;
        assert_refused(
            refused,
            "hold 300000 bytes and this one needs 1 more (api.max_body_bytes_in_flight is 300000)",
        )
        .await;
    }
    // Requests without a body pass.
    assert_eq!(
        call(&router, get("/metrics")).await.status(),
        StatusCode::OK
    );

    // The big one ends: its 200,000 bytes are free again. A body without a
    // Content-Length reserves its pieces as they come: 150,000 now.
    let (status, _) = answer(big.end(b"}").await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let streamed = Held::start(&router, "/v1/messages", &vec![b' '; 150_000], None).await;
    let refused = call(&router, post("/v1/peers", Body::from("{"), Some(50_001))).await;
    assert_refused(refused, "api.max_body_bytes_in_flight").await;
    let fits = Held::start(&router, "/v1/peers", b"{", Some(50_000)).await;
    for held in [rest, streamed, fits] {
        let (status, _) = answer(held.end(b"}").await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
    // All given back: the whole budget fits again.
    let big = Held::start(&router, "/v1/messages", b"{", Some(200_000)).await;
    let rest = Held::start(&router, "/v1/peers", b"{", Some(BUDGET - 200_000)).await;
    for held in [big, rest] {
        let (status, _) = answer(held.end(b"}").await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn a_message_body_counts_against_the_budget_until_its_send_is_answered() {
    // The smallest budget allowed: one largest body (64 MiB + 64 KiB).
    let max_message_size = peer_node::Config::default().transfer.max_message_size;
    let budget = peer_node::api::max_body_size(max_message_size);
    let caps = ApiConfig {
        max_body_bytes_in_flight: budget,
        ..ApiConfig::default()
    };
    let (node, router) = node_and_api(caps, |_| {}).await;
    let mut raw = RawPeer::connect(&node.addr).await;
    wait_connected(&node.handle, raw.entity_id()).await;
    let body = format!(
        r#"{{"to":"{}","msg_type":"message","payload":{{"pad":"{}"}}}}"#,
        raw.entity_id(),
        "x".repeat(10_000)
    );
    let len = body.len();
    let sending = tokio::spawn(router.clone().oneshot(post(
        "/v1/messages",
        Body::from(body),
        Some(len),
    )));
    // The peer runs the handshake the node starts, then holds its answer to
    // the message: the send is not answered yet.
    raw.accept_session(node.handle.entity_id()).await;
    let (env, _, channel) = raw.next_request().await;
    assert_eq!(env.msg_type.as_str(), "message");
    let over = budget - len + 1;
    let refused = call(&router, post("/v1/peers", Body::from("{}"), Some(over))).await;
    assert_refused(refused, &format!("needs {over} more")).await;

    raw.respond(channel, WireResponse::Accepted).await;
    let sent = sending.await.expect("task").expect("infallible");
    let (status, answer_body) = answer(sent).await;
    assert_eq!(status, StatusCode::OK, "{answer_body}");
    // Given back once answered: the same request now gets past the budget
    // (and fails on its body).
    let (status, _) =
        answer(call(&router, post("/v1/peers", Body::from("{}"), Some(over))).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn event_streams_over_their_cap_are_refused_until_one_closes() {
    let caps = ApiConfig {
        max_event_streams: 2,
        max_concurrent_requests: 1,
        ..ApiConfig::default()
    };
    let (_node, router) = node_and_api(caps, |_| {}).await;
    let first = call(&router, get("/v1/events")).await;
    let second = call(&router, get("/v1/events")).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(second.status(), StatusCode::OK);
    let refused = call(&router, get("/v1/events")).await;
    assert_refused(refused, "api.max_event_streams is 2").await;
    // Open streams take none of the request cap (1 here).
    assert_eq!(
        call(&router, get("/metrics")).await.status(),
        StatusCode::OK
    );
    // A stream counts until its client drops it.
    drop(first);
    let third = call(&router, get("/v1/events")).await;
    assert_eq!(third.status(), StatusCode::OK);
    let refused = call(&router, get("/v1/events")).await;
    assert_refused(refused, "api.max_event_streams").await;
}

/// `depth` arrays around a number.
fn nested(depth: usize, inner: &str) -> String {
    format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn a_payload_nested_too_deep_is_refused_400_before_it_is_sent() {
    let (_node, router) = node_and_api(ApiConfig::default(), |_| {}).await;
    // Not connected: a payload that passes the check is answered 404 by the node.
    let to = Identity::from_secret(&[9; 32]).entity_id();
    let send = |payload: String| {
        let body = format!(r#"{{"to":"{to}","msg_type":"message","payload":{payload}}}"#);
        call(&router, post("/v1/messages", Body::from(body), None))
    };
    let big = format!("\"{}\"", "x".repeat(40_000));
    // One level over the default limit (64), in one envelope or as a transfer.
    for payload in [nested(65, "1"), nested(65, &big), nested(100_000, "1")] {
        let (status, body) = answer(send(payload).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["code"], "INVALID_REQUEST");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("64") && message.contains("protocol.max_json_depth"),
            "{message}"
        );
    }
    for payload in [nested(64, "1"), nested(64, &big)] {
        let (status, body) = answer(send(payload).await).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["error"]["code"], "NOT_CONNECTED");
    }
}

/// The paths the router serves: those of the `.route("…")` calls in its
/// source.
fn routed_paths() -> BTreeSet<&'static str> {
    const SOURCE: &str = include_str!("../src/api/mod.rs");
    SOURCE
        .split(".route(")
        .skip(1)
        .map(|rest| {
            let path = rest.trim_start().strip_prefix('"').expect("a path literal");
            &path[..path.find('"').expect("the path's closing quote")]
        })
        .collect()
}

/// Fails unless every `$ref` in `v` points at something in `doc`.
fn check_refs(v: &Value, doc: &Value) {
    match v {
        Value::Object(fields) => {
            if let Some(target) = fields.get("$ref") {
                let pointer = target
                    .as_str()
                    .and_then(|t| t.strip_prefix('#'))
                    .unwrap_or_else(|| panic!("a $ref within the document: {target}"));
                assert!(doc.pointer(pointer).is_some(), "{target} resolves");
            }
            fields.values().for_each(|v| check_refs(v, doc));
        }
        Value::Array(items) => items.iter().for_each(|v| check_refs(v, doc)),
        _ => {}
    }
}

/// `path` with each `{parameter}` replaced by a value of the right form (64
/// hex digits: an entity id, and an id the node does not know).
fn sample(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(start) = rest.find('{') {
        let end = rest[start..].find('}').expect("closing brace") + start;
        out.push_str(&rest[..start]);
        out.push_str(&"ab".repeat(32));
        rest = &rest[end + 1..];
    }
    out + rest
}

#[tokio::test]
async fn the_openapi_description_names_every_route_and_only_routes() {
    let (_node, router) = node_and_api(ApiConfig::default(), |_| {}).await;
    let unauthenticated = |method: &str, uri: &str| {
        Request::builder()
            .method(method.to_uppercase().as_str())
            .uri(uri)
            .body(Body::empty())
            .expect("request")
    };
    let served = call(&router, unauthenticated("get", "/v1/openapi.json")).await;
    assert_eq!(served.headers()[header::CONTENT_TYPE], "application/json");
    let (status, doc) = answer(served).await;
    assert_eq!(status, StatusCode::OK, "served without a token");
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    check_refs(&doc, &doc);
    let paths = doc["paths"].as_object().expect("paths");

    for path in routed_paths() {
        assert!(
            paths.contains_key(path),
            "{path} is routed but not described"
        );
    }
    for (path, item) in paths {
        let uri = sample(path);
        for method in ["get", "post", "put", "patch", "delete"] {
            let mut req = unauthenticated(method, &uri);
            req.headers_mut().insert(
                header::AUTHORIZATION,
                format!("Bearer {TOKEN}").parse().expect("header"),
            );
            let response = call(&router, req).await;
            let status = response.status();
            let Some(op) = item.get(method) else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is routed but not described"
                );
                continue;
            };
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            if status == StatusCode::NOT_FOUND {
                // The router's own 404 has an empty body; a handler's is an error.
                let (_, body) = answer(response).await;
                assert!(body["error"]["code"].is_string(), "{method} {path}: {body}");
            }
            let documented = |status: StatusCode| op["responses"].get(status.as_str()).is_some();
            assert!(
                documented(status),
                "{method} {path}: {status} is not described"
            );
            // Public exactly where the description says so.
            let without_token = call(&router, unauthenticated(method, &uri)).await.status();
            let public = op["security"] == serde_json::json!([]);
            assert_eq!(
                without_token == StatusCode::UNAUTHORIZED,
                !public,
                "{method} {path} without a token: {without_token}"
            );
            assert!(
                documented(without_token),
                "{method} {path}: {without_token} is not described"
            );
        }
    }
}
