//! The local HTTP API (axum). Every route but `/v1/health`,
//! `/v1/openapi.json` and `/.well-known/agent-card.json` needs
//! `Authorization: Bearer <token>`, the token in `<data_dir>/api-token`.
//! Errors are JSON: `{"error": {"code": "...", "message": "..."}}`. Every
//! route is described in `openapi.json` beside this file (OpenAPI 3.1),
//! served at `/v1/openapi.json`.
//!
//! Three caps bound what clients can make the API hold, each answered at once
//! with `503 UNAVAILABLE` and `Retry-After: 1` rather than queued: requests
//! being handled (`api.max_concurrent_requests`, event streams aside), bytes of
//! request bodies held (`api.max_body_bytes_in_flight`) and open event streams
//! (`api.max_event_streams`). Each is a tokio [`Semaphore`].

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::BytesMut;
use futures::StreamExt;
use peer_core::{EntityId, ErrorCode, MsgType};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

mod events;

use crate::config::ApiConfig;
use crate::inbox::MAX_PAGE;
use crate::node::{NewTask, NodeError, NodeHandle, TaskChange};
use crate::services::card::signed as card_signed;
use crate::services::card::{CardContent, SignedCard};
use crate::services::tasks::task::{Artifact, Role, State as TaskState};

/// The OpenAPI 3.1 description of every route of [`router`].
const OPENAPI: &str = include_str!("openapi.json");

/// Bytes a `POST /v1/messages` body may take beyond its payload.
const BODY_SLACK: usize = 64 * 1024;

/// Largest request body the API reads: a message of `max_message_size`
/// (`transfer.max_message_size`) and 64 KiB of JSON around it.
pub fn max_body_size(max_message_size: u64) -> usize {
    usize::try_from(max_message_size)
        .unwrap_or(usize::MAX)
        .saturating_add(BODY_SLACK)
}

#[derive(Clone)]
struct AppState {
    node: NodeHandle,
    token: String,
    stopping: CancellationToken,
    /// Largest request body: a message up to the transfer limit, and its JSON
    /// wrapping.
    body_limit: usize,
    /// One permit per request being handled (`api.max_concurrent_requests`).
    requests: Cap,
    /// One permit per byte of request bodies held (`api.max_body_bytes_in_flight`).
    body_bytes: Cap,
    /// One permit per open event stream (`api.max_event_streams`).
    streams: Cap,
}

/// A semaphore and the configured count it started with.
#[derive(Clone)]
struct Cap {
    permits: Arc<Semaphore>,
    max: usize,
}

impl Cap {
    fn new(max: usize) -> Self {
        // A tokio semaphore holds at most 2^61 permits: far more than any
        // count or byte total the API could reach.
        let max = max.min(Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Permits taken now.
    fn taken(&self) -> usize {
        self.max.saturating_sub(self.permits.available_permits())
    }
}

/// The API router over `node`, guarded by `token`, with the caps of `config`
/// (`config.listen` is the caller's to bind). Event streams end when
/// `stopping` is cancelled, so a graceful shutdown does not wait on them.
pub fn router(
    node: NodeHandle,
    config: &ApiConfig,
    token: String,
    stopping: CancellationToken,
) -> Router {
    let body_limit = max_body_size(node.max_message_size());
    let state = AppState {
        node,
        token,
        stopping,
        body_limit,
        requests: Cap::new(config.max_concurrent_requests),
        body_bytes: Cap::new(config.max_body_bytes_in_flight),
        streams: Cap::new(config.max_event_streams),
    };
    let limited = middleware::from_fn_with_state(state.clone(), limit_requests);
    let authorized = middleware::from_fn_with_state(state.clone(), require_token);
    // The token is checked first: a client without it takes no permit.
    let calls = Router::new()
        .route("/v1/peers", get(list_peers).post(connect))
        .route("/v1/messages", axum::routing::post(send))
        .route("/v1/stats", get(stats))
        .route("/v1/inbox", get(inbox))
        .route("/v1/inbox/ack", axum::routing::post(ack))
        .route("/v1/tasks", get(list_tasks).post(delegate))
        .route("/v1/tasks/{task_id}", get(get_task))
        .route(
            "/v1/tasks/{task_id}/cancel",
            axum::routing::post(cancel_task),
        )
        .route(
            "/v1/tasks/{task_id}/status",
            axum::routing::post(task_status),
        )
        .route(
            "/v1/tasks/{task_id}/result",
            axum::routing::post(task_result),
        )
        .route("/v1/card", get(own_card).put(set_card))
        .route("/v1/peers/{entity_id}/card", get(peer_card))
        .route("/v1/peers/{entity_id}", get(find_peer))
        .route("/v1/discover", get(discover))
        .route("/v1/discovery", get(discovery_stats))
        .route("/metrics", get(metrics))
        .route_layer(limited.clone())
        .route_layer(authorized.clone());
    // An event stream counts against `api.max_event_streams` instead.
    let streams = Router::new()
        .route("/v1/events", get(events::events))
        .route_layer(authorized);
    Router::new()
        .route("/v1/health", get(health))
        // Documentation: the same for every node of this version, and as
        // public as the source it comes from.
        .route("/v1/openapi.json", get(openapi))
        // Public by nature (A2A tooling reads it without credentials), and
        // served only on the local API.
        .route("/.well-known/agent-card.json", get(agent_card))
        .route_layer(limited)
        .merge(calls)
        .merge(streams)
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

    /// 503 `UNAVAILABLE` with `Retry-After: 1`: an API cap is reached.
    fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after_ms: Some(1000),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message)
        }
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
            NodeError::CircuitOpen(open) => Some(open.retry_after_ms),
            _ => None,
        };
        let (status, code) = match e {
            NodeError::Rejected { code, .. }
                if code == ErrorCode::RateLimited.as_str()
                    || code == ErrorCode::InboxFull.as_str() =>
            {
                (StatusCode::TOO_MANY_REQUESTS, code)
            }
            NodeError::Rejected { code, .. } if code == ErrorCode::MessageTooLarge.as_str() => {
                (StatusCode::PAYLOAD_TOO_LARGE, code)
            }
            NodeError::Rejected { code, .. } if code == ErrorCode::InvalidState.as_str() => {
                (StatusCode::CONFLICT, code)
            }
            NodeError::Rejected { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code),
            NodeError::NotFound(_) => (StatusCode::NOT_FOUND, "NOT_FOUND".into()),
            NodeError::TooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::MessageTooLarge.as_str().into(),
            ),
            NodeError::NotConnected(_) => (StatusCode::NOT_FOUND, "NOT_CONNECTED".into()),
            NodeError::Invalid(_) => (StatusCode::BAD_REQUEST, "INVALID_REQUEST".into()),
            NodeError::Dial(_) => (StatusCode::BAD_GATEWAY, "DIAL_FAILED".into()),
            NodeError::Transport(_) => (StatusCode::GATEWAY_TIMEOUT, "DELIVERY_FAILED".into()),
            NodeError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "STORAGE_FAILED".into()),
            NodeError::CircuitOpen(_) => (StatusCode::SERVICE_UNAVAILABLE, "CIRCUIT_OPEN".into()),
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

/// Serves the request if fewer than `api.max_concurrent_requests` are being
/// handled, else refuses it at once with 503. The permit is held until the
/// handler has answered.
async fn limit_requests(State(s): State<AppState>, req: Request, next: Next) -> Response {
    match s.requests.permits.clone().try_acquire_owned() {
        Ok(_handling) => next.run(req).await,
        Err(_) => ApiError::unavailable(format!(
            "too many API requests at once (api.max_concurrent_requests is {}); retry later",
            s.requests.max
        ))
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

/// Bytes of a request body reserved against `api.max_body_bytes_in_flight`;
/// dropping it gives them back.
struct Reserved {
    cap: Cap,
    permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Reserved {
    fn new(cap: &Cap) -> Self {
        Self {
            cap: cap.clone(),
            permit: None,
            bytes: 0,
        }
    }

    /// Grows the reservation to `bytes` (503 if the budget lacks room).
    fn grow_to(&mut self, bytes: usize) -> Result<(), ApiError> {
        while self.bytes < bytes {
            // Semaphores hand out at most u32::MAX permits at a time.
            let step = u32::try_from(bytes - self.bytes).unwrap_or(u32::MAX);
            let more = self
                .cap
                .permits
                .clone()
                .try_acquire_many_owned(step)
                .map_err(|_| {
                    ApiError::unavailable(format!(
                        "request bodies being handled hold {} bytes and this one needs {} more (api.max_body_bytes_in_flight is {}); retry later",
                        self.cap.taken(),
                        bytes - self.bytes,
                        self.cap.max
                    ))
                })?;
            match &mut self.permit {
                Some(held) => held.merge(more),
                None => self.permit = Some(more),
            }
            self.bytes += step as usize;
        }
        Ok(())
    }
}

/// Reads a body of up to the body limit (`transfer.max_message_size` + 64 KiB)
/// into one buffer, sized from `Content-Length` when given: a large message is
/// neither copied once more nor held twice, as collecting it piece by piece
/// would. The body's bytes are reserved against `api.max_body_bytes_in_flight`
/// before they are read: its `Content-Length` at once, else each piece as it
/// arrives. The handler keeps the reservation for as long as it holds the body
/// or a part of it. 413 `MESSAGE_TOO_LARGE` over the body limit, 503
/// `UNAVAILABLE` over the budget.
async fn read_body(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Bytes, Reserved), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > s.body_limit) {
        return Err(body_too_large());
    }
    let mut reserved = Reserved::new(&s.body_bytes);
    reserved.grow_to(declared.unwrap_or(0))?;
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0));
    let mut data = body.into_data_stream();
    while let Some(piece) = data.next().await {
        let piece = piece.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        let len = buf.len().saturating_add(piece.len());
        if len > s.body_limit {
            return Err(body_too_large());
        }
        reserved.grow_to(len)?;
        buf.extend_from_slice(&piece);
    }
    Ok((buf.freeze(), reserved))
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

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

#[derive(Deserialize)]
struct ConnectBody {
    addr: String,
}

async fn connect(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    // The body and its reservation are done with once parsed.
    let body: ConnectBody = parse_json(&read_body(&s, &headers, body).await?.0)?;
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
    let (body, reserved) = read_body(&s, &headers, body).await?;
    let (to, msg_type, payload) = read_send_body(&body)?;
    // The payload shares the body's buffer; only the payload is kept.
    drop(body);
    let delivered = s.node.send(to, msg_type, payload).await;
    // The body's bytes count until the send is answered: until then the node
    // holds the payload (a chunked message's for its whole transfer), and the
    // payload holds the body's buffer.
    drop(reserved);
    Ok(Json(json!(delivered?)))
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboxQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

/// `GET /v1/inbox?after=&limit=`: a page of the events waiting.
async fn inbox(
    State(s): State<AppState>,
    Query(q): Query<InboxQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_PAGE}"
        )));
    }
    let page = s.node.inbox(q.after, limit).await?;
    let next_after = page.last().map_or(q.after, |e| e.id);
    Ok(Json(json!({"events": page, "next_after": next_after})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckBody {
    up_to: u64,
}

/// `POST /v1/inbox/ack {"up_to": N}`: releases the events up to N.
async fn ack(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body: AckBody = parse_json(&read_body(&s, &headers, body).await?.0)?;
    let acked = s.node.ack(body.up_to).await?;
    Ok(Json(json!(acked)))
}

/// `POST /v1/tasks {"to","skill","input","deadline_s"?,"priority"?}` →
/// `{"task_id"}`, once the task is stored.
async fn delegate(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let new: NewTask = parse_json(&read_body(&s, &headers, body).await?.0)?;
    let task = s.node.delegate(new).await?;
    Ok(Json(json!({"task_id": task.task_id})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TasksQuery {
    role: Option<Role>,
    state: Option<String>,
}

/// `GET /v1/tasks?role=&state=` → `{"tasks": [...]}`.
async fn list_tasks(
    State(s): State<AppState>,
    Query(q): Query<TasksQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let state = match q.state.as_deref() {
        Some(name) => Some(TaskState::parse(name).ok_or_else(|| {
            ApiError::bad_request(format!(
                "state {name:?} is none of submitted, working, input-required, completed, failed, canceled, rejected"
            ))
        })?),
        None => None,
    };
    let tasks = s.node.task_list(q.role, state).await?;
    Ok(Json(json!({"tasks": tasks})))
}

/// `GET /v1/tasks/{id}`.
async fn get_task(
    State(s): State<AppState>,
    Path(task_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(json!(s.node.task(task_id).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    message: Option<String>,
}

/// `POST /v1/tasks/{id}/cancel {"message"?}` (the body may be empty).
async fn cancel_task(
    State(s): State<AppState>,
    Path(task_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = read_body(&s, &headers, body).await?.0;
    let message = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        parse_json::<CancelBody>(&body)?.message
    };
    let task = s
        .node
        .change_task(TaskChange::Cancel { task_id, message })
        .await?;
    Ok(Json(json!(task)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusBody {
    state: String,
    message: Option<String>,
}

/// `POST /v1/tasks/{id}/status {"state","message"?}`.
async fn task_status(
    State(s): State<AppState>,
    Path(task_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body: StatusBody = parse_json(&read_body(&s, &headers, body).await?.0)?;
    let state = TaskState::parse(&body.state).ok_or_else(|| {
        ApiError::bad_request(format!(
            "state {:?} is none of working, input-required, failed, rejected",
            body.state
        ))
    })?;
    let change = TaskChange::Status {
        task_id,
        state,
        message: body.message,
    };
    Ok(Json(json!(s.node.change_task(change).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultBody {
    output: serde_json::Value,
    #[serde(default)]
    artifacts: Vec<Artifact>,
}

/// `POST /v1/tasks/{id}/result {"output","artifacts"?}`.
async fn task_result(
    State(s): State<AppState>,
    Path(task_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body: ResultBody = parse_json(&read_body(&s, &headers, body).await?.0)?;
    let change = TaskChange::Complete {
        task_id,
        output: body.output,
        artifacts: body.artifacts,
    };
    Ok(Json(json!(s.node.change_task(change).await?)))
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

/// A signed card in its wire form, `{"card":{...},"signature":"..."}`, the
/// card's bytes exactly as signed.
fn signed_card(card: &SignedCard) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        card.to_payload(),
    )
        .into_response()
}

async fn own_card(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(signed_card(&*s.node.card()?))
}

async fn set_card(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let content: CardContent = parse_json(&read_body(&s, &headers, body).await?.0)?;
    Ok(signed_card(&*s.node.set_card(content).await?))
}

async fn peer_card(
    State(s): State<AppState>,
    Path(entity_id): Path<String>,
) -> Result<Response, ApiError> {
    let peer: EntityId = entity_id
        .parse()
        .map_err(|e| ApiError::bad_request(format!("entity_id: {e}")))?;
    match s.node.peer_card(peer).await? {
        Some(card) => Ok(signed_card(&card)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("no card of {peer} is known, and it is not connected to be asked"),
        )),
    }
}

/// `GET /v1/peers/{entity_id}`: the peer, looked up in the DHT if needed.
async fn find_peer(
    State(s): State<AppState>,
    Path(entity_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let peer: EntityId = entity_id
        .parse()
        .map_err(|e| ApiError::bad_request(format!("entity_id: {e}")))?;
    Ok(Json(json!(s.node.find(peer).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscoverQuery {
    capability: String,
}

/// `GET /v1/discover?capability=X`: the peers offering X.
async fn discover(
    State(s): State<AppState>,
    Query(q): Query<DiscoverQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if q.capability.is_empty() || q.capability.len() > peer_core::registry::MAX_FIELD {
        return Err(ApiError::bad_request(format!(
            "capability must be 1 to {} bytes",
            peer_core::registry::MAX_FIELD
        )));
    }
    let peers = s.node.discover(q.capability.clone()).await?;
    Ok(Json(json!({"capability": q.capability, "peers": peers})))
}

/// `GET /v1/discovery`: what discovery knows and did.
async fn discovery_stats(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(json!(s.node.discovery_stats().await?)))
}

async fn agent_card(State(s): State<AppState>) -> Result<Response, ApiError> {
    let body = card_signed::agent_card(&*s.node.card()?);
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
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
    fn each_node_error_has_its_status_and_code() {
        let cases = [
            (
                NodeError::Storage("database error: disk full".into()),
                500,
                "STORAGE_FAILED",
            ),
            (
                NodeError::Transport("no answer".into()),
                504,
                "DELIVERY_FAILED",
            ),
            (NodeError::Dial("refused".into()), 502, "DIAL_FAILED"),
            (NodeError::Stopped, 503, "UNAVAILABLE"),
            (NodeError::Busy(1), 503, "UNAVAILABLE"),
            (NodeError::Invalid("bad".into()), 400, "INVALID_REQUEST"),
            (NodeError::NotFound("no task".into()), 404, "NOT_FOUND"),
        ];
        for (e, status, code) in cases {
            let message = e.to_string();
            let api = ApiError::from(e);
            assert_eq!((api.status.as_u16(), api.code.as_str()), (status, code));
            assert_eq!(api.message, message, "the node's words reach the client");
        }
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
