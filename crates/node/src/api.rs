//! The local HTTP API (axum). Every route but `/v1/health` needs
//! `Authorization: Bearer <token>`, the token in `<data_dir>/api-token`.
//! Errors are JSON: `{"error": {"code": "...", "message": "..."}}`.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::BytesMut;
use futures::Stream;
use futures::StreamExt;
use peer_core::{EntityId, ErrorCode, MsgType};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use serde_json::value::RawValue;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_util::sync::CancellationToken;

use crate::node::{NodeError, NodeHandle};

/// Bytes a `POST /v1/messages` body may take beyond its payload.
const BODY_SLACK: usize = 64 * 1024;

#[derive(Clone)]
struct AppState {
    node: NodeHandle,
    token: String,
    stopping: CancellationToken,
    /// Largest request body: a message up to the transfer limit, and its JSON
    /// wrapping.
    body_limit: usize,
}

/// The API router over `node`, guarded by `token`. Event streams end when
/// `stopping` is cancelled, so a graceful shutdown does not wait on them.
pub fn router(node: NodeHandle, token: String, stopping: CancellationToken) -> Router {
    let body_limit = usize::try_from(node.max_message_size())
        .unwrap_or(usize::MAX)
        .saturating_add(BODY_SLACK);
    let state = AppState {
        node,
        token,
        stopping,
        body_limit,
    };
    let private = Router::new()
        .route("/v1/peers", get(list_peers).post(connect))
        .route("/v1/messages", axum::routing::post(send))
        .route("/v1/events", get(events))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/v1/health", get(health))
        .merge(private)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// An API error: HTTP status, a stable code and a message.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
    retry_after_ms: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_owned(),
            message: message.into(),
            retry_after_ms: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        match self.retry_after_ms {
            Some(ms) => {
                body["error"]["retry_after_ms"] = ms.into();
                let secs = ms.div_ceil(1000).max(1).to_string();
                (self.status, [(header::RETRY_AFTER, secs)], Json(body)).into_response()
            }
            None => (self.status, Json(body)).into_response(),
        }
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let message = e.to_string();
        let retry_after_ms = match &e {
            NodeError::Rejected { retry_after_ms, .. } => *retry_after_ms,
            _ => None,
        };
        let (status, code) = match e {
            NodeError::Rejected { code, .. } if code == ErrorCode::RateLimited.as_str() => {
                (StatusCode::TOO_MANY_REQUESTS, code)
            }
            NodeError::Rejected { code, .. } if code == ErrorCode::MessageTooLarge.as_str() => {
                (StatusCode::PAYLOAD_TOO_LARGE, code)
            }
            NodeError::Rejected { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code),
            NodeError::TooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::MessageTooLarge.as_str().into(),
            ),
            NodeError::NotConnected(_) => (StatusCode::NOT_FOUND, "NOT_CONNECTED".into()),
            NodeError::Invalid(_) => (StatusCode::BAD_REQUEST, "INVALID_REQUEST".into()),
            NodeError::Dial(_) => (StatusCode::BAD_GATEWAY, "DIAL_FAILED".into()),
            NodeError::Transport(_) => (StatusCode::GATEWAY_TIMEOUT, "DELIVERY_FAILED".into()),
            NodeError::Busy(_) | NodeError::TooManyTransfers { .. } | NodeError::Stopped => {
                (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE".into())
            }
        };
        Self {
            status,
            code,
            message,
            retry_after_ms,
        }
    }
}

/// Compares without leaking where the first difference is.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(
    State(s): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if same_token(t.as_bytes(), s.token.as_bytes()) => next.run(req).await,
        _ => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "send `Authorization: Bearer <token>`; the token is in <data-dir>/api-token",
        )
        .into_response(),
    }
}

fn body_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::MessageTooLarge.as_str(),
        "the request body is larger than this node takes: transfer.max_message_size plus 64 KiB",
    )
}

/// The request body, or a JSON error: 413 `MESSAGE_TOO_LARGE` over the body
/// limit (`transfer.max_message_size` + 64 KiB).
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            body_too_large()
        } else {
            ApiError::bad_request(e.body_text())
        }
    })
}

/// Reads a body of up to `limit` bytes into one buffer, sized from
/// `Content-Length` when given: a large message is neither copied once more
/// nor held twice, as collecting it piece by piece would.
async fn read_large_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(body_too_large());
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0));
    let mut data = body.into_data_stream();
    while let Some(piece) = data.next().await {
        let piece = piece.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        if buf.len().saturating_add(piece.len()) > limit {
            return Err(body_too_large());
        }
        buf.extend_from_slice(&piece);
    }
    Ok(buf.freeze())
}

fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

async fn health(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let addrs = s.node.listen_addrs().await?;
    Ok(Json(json!({
        "status": "ok",
        "entity_id": s.node.entity_id(),
        "peer_id": s.node.peer_id().to_string(),
        "listen_addrs": addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "version": env!("CARGO_PKG_VERSION"),
        "protocol_version": peer_core::PROTOCOL_VERSION,
    })))
}

#[derive(Deserialize)]
struct ConnectBody {
    addr: String,
}

async fn connect(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body: ConnectBody = parse_json(&read_body(body)?)?;
    let addr = body.addr.parse().map_err(|e| {
        ApiError::bad_request(format!("addr {:?} is not a multiaddr: {e}", body.addr))
    })?;
    let peer = s.node.connect(addr).await?;
    Ok(Json(
        serde_json::to_value(peer).map_err(|e| ApiError::bad_request(e.to_string()))?,
    ))
}

async fn list_peers(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let peers = s.node.peers().await?;
    Ok(Json(json!(peers)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody<'a> {
    to: String,
    msg_type: String,
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// The part of `body` that `inner` covers, without copying if `inner` is a
/// slice of `body` (a borrowed `RawValue` is) and most of it: a slice keeps the
/// whole body alive, so a small payload in a padded body is copied out.
fn sub_bytes(body: &Bytes, inner: &str) -> Bytes {
    let start = (inner.as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
    match start.checked_add(inner.len()) {
        Some(end) if end <= body.len() && body.len() - inner.len() <= BODY_SLACK => {
            body.slice(start..end)
        }
        _ => Bytes::copy_from_slice(inner.as_bytes()),
    }
}

async fn send(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = read_large_body(&headers, body, s.body_limit).await?;
    let (to, msg_type, payload) = read_send_body(&body)?;
    // The payload shares the body's buffer; only the payload is kept.
    drop(body);
    let delivered = s.node.send(to, msg_type, payload).await?;
    Ok(Json(json!(delivered)))
}

/// The recipient, type and payload (as the exact JSON text sent) of a
/// `POST /v1/messages` body.
fn read_send_body(bytes: &Bytes) -> Result<(EntityId, MsgType, Bytes), ApiError> {
    let body: SendBody = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let to: EntityId = body
        .to
        .parse()
        .map_err(|e| ApiError::bad_request(format!("to: {e}")))?;
    let msg_type: MsgType = body
        .msg_type
        .parse()
        .map_err(|e| ApiError::bad_request(format!("msg_type: {e}")))?;
    Ok((to, msg_type, sub_bytes(bytes, body.payload.get())))
}

async fn events(
    State(s): State<AppState>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = BroadcastStream::new(s.node.subscribe()).map(|item| {
        // Written straight into the stream's buffer: a reassembled message may
        // be tens of MiB.
        let event = match item {
            Ok(event) => SseEvent::default().json_data(&event),
            Err(BroadcastStreamRecvError::Lagged(missed)) => {
                SseEvent::default().json_data(json!({"type": "lagged", "missed": missed}))
            }
        };
        Ok(event.unwrap_or_else(|e| SseEvent::default().comment(format!("unwritable event: {e}"))))
    });
    let stream = stream.take_until(s.stopping.cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn stats(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(json!(s.node.stats().await?)))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.node.metrics().encode(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_rate_limit_becomes_429_with_retry_after() {
        let e = NodeError::Rejected {
            code: "RATE_LIMITED".into(),
            reason: "over the task rate limit".into(),
            retry_after_ms: Some(1500),
        };
        let response = ApiError::from(e).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let other = NodeError::Rejected {
            code: "INVALID_SIGNATURE".into(),
            reason: String::new(),
            retry_after_ms: None,
        };
        let response = ApiError::from(other).into_response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(!response.headers().contains_key(header::RETRY_AFTER));
    }

    #[test]
    fn a_payload_shares_its_body_unless_the_body_is_mostly_something_else() {
        let body = Bytes::from(format!(r#"{{"payload":"{}"}}"#, "x".repeat(100)));
        let text = std::str::from_utf8(&body[11..113]).expect("utf8");
        let shared = sub_bytes(&body, text);
        assert_eq!(&shared[..], text.as_bytes());
        assert_eq!(shared.as_ptr(), text.as_ptr(), "no copy");
        let padded = Bytes::from(format!("{}{}", "x".repeat(10), " ".repeat(BODY_SLACK + 1)));
        let small = std::str::from_utf8(&padded[..10]).expect("utf8");
        assert_ne!(
            sub_bytes(&padded, small).as_ptr(),
            small.as_ptr(),
            "copied out"
        );
        let elsewhere = "not in the body";
        assert_eq!(&sub_bytes(&body, elsewhere)[..], elsewhere.as_bytes());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"abc", b"abcd"));
        assert!(!same_token(b"", b"a"));
    }
}
