//! `GET /v1/events`: the agent's event stream (server-sent events).
//!
//! Each event is written as body frames of its own rather than through axum's
//! `Sse`, which serializes every event into one new buffer: a message's
//! payload (a reassembled message may be tens of MiB) goes out as frames that
//! share the payload's memory, and only the text around it is written anew.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, BytesMut};
use futures::{StreamExt, stream};
use memchr::memchr2;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::{ApiError, AppState};
use crate::inbox::Stored;
use crate::json::RawJson;
use crate::node::{Event, NodeHandle};

/// A comment line goes out after this long, so that proxies and clients
/// see the stream is alive.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Pieces of an event's text at least this long go out as frames of their
/// own, shared; shorter ones are copied together into one frame.
const SHARE_FROM: usize = 64 * 1024;

/// Where an event stream starts: after `Last-Event-ID`, or `?after=`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    after: Option<u64>,
}

/// An event stream, if fewer than `api.max_event_streams` are open (else 503);
/// it counts until the client goes away or the node stops. It starts with the
/// durable events stored after `Last-Event-ID` (or `?after=`; with neither,
/// every event still in the inbox), then goes on with live ones. A durable
/// event carries its inbox id as the SSE `id`.
pub(super) async fn events(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("Last-Event-ID must be an event id (a decimal number)")
                })?,
        ),
        None => None,
    };
    let after = last_event_id.or(query.after).unwrap_or(0);
    let subscriber = s.streams.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::unavailable(format!(
            "too many event streams open (api.max_event_streams is {}); close one or retry later",
            s.streams.max
        ))
    })?;
    // Subscribed before the inbox is read: an event stored meanwhile is in
    // both, and the id tells the copies apart.
    let feed = Feed {
        node: s.node.clone(),
        live: s.node.subscribe(),
        cursor: after,
        backlog: VecDeque::new(),
        catching_up: true,
        failed: false,
    };
    // `None` marks the end of the feed, which ends the merged stream.
    let events = stream::unfold(feed, |mut feed| async move {
        let frames = feed.next().await?;
        Some((Some(frames), feed))
    })
    .chain(stream::once(async { None }));
    let keep_alive = stream::unfold((), |()| async {
        tokio::time::sleep(KEEP_ALIVE).await;
        Some((Some(vec![Bytes::from_static(b":\n\n")]), ()))
    });
    let body = stream::select(events, keep_alive)
        .take_while(|frames| std::future::ready(frames.is_some()))
        .flat_map(|frames| stream::iter(frames.unwrap_or_default()))
        // The stream owns the permit: it is given back when it is dropped.
        .map(move |frame| {
            let _subscriber = &subscriber;
            Ok::<_, Infallible>(frame)
        })
        .take_until(s.stopping.cancelled_owned());
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// Events published while a reader catches up wait in the broadcast channel
/// (`api.event_buffer`); a reader that falls further behind than that is told
/// (`{"type":"lagged"}`) and reads the durable ones from the inbox again.
struct Feed {
    node: NodeHandle,
    live: tokio::sync::broadcast::Receiver<Event>,
    /// The id of the last durable event sent.
    cursor: u64,
    backlog: VecDeque<Stored>,
    catching_up: bool,
    /// Reading the inbox failed: the stream ends after saying so, and the
    /// client resumes from its `Last-Event-ID` (going on with live events
    /// would move its id past stored events it never got).
    failed: bool,
}

impl Feed {
    /// Events read from the inbox at once while catching up.
    const PAGE: usize = 256;

    /// The next event's frames, or `None` once the node has stopped.
    async fn next(&mut self) -> Option<Vec<Bytes>> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(stored) = self.backlog.pop_front() {
                self.cursor = stored.id;
                let json = Bytes::from(String::from(Box::<str>::from(stored.event)));
                return Some(frames(Some(stored.id), [json]));
            }
            if self.catching_up {
                match self.node.inbox(self.cursor, Self::PAGE).await {
                    Ok(page) if page.is_empty() => self.catching_up = false,
                    Ok(page) => self.backlog.extend(page),
                    Err(e) => {
                        self.failed = true;
                        let error =
                            json!({"type": "error", "message": format!("reading the inbox: {e}")});
                        return Some(frames(None, [Bytes::from(error.to_string())]));
                    }
                }
                continue;
            }
            match self.live.recv().await {
                Ok(event) => {
                    let id = event.event_id();
                    if id.is_some_and(|id| id <= self.cursor) {
                        continue;
                    }
                    if let Some(id) = id {
                        self.cursor = id;
                    }
                    return Some(match json_pieces(&event) {
                        Ok(json) => frames(id, json),
                        Err(e) => vec![Bytes::from(format!(": unwritable event: {e}\n\n"))],
                    });
                }
                Err(RecvError::Lagged(missed)) => {
                    self.catching_up = true;
                    let lagged = json!({"type": "lagged", "missed": missed});
                    return Some(frames(None, [Bytes::from(lagged.to_string())]));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

/// The JSON text of `event`, in pieces: a message's payload is shared with
/// the event, not copied.
fn json_pieces(event: &Event) -> Result<Vec<Bytes>, serde_json::Error> {
    if let Event::Message { payload, .. } = event
        && payload.as_str().len() >= SHARE_FROM
    {
        // The payload is the message's last field: its text is the rest of
        // the event, the payload, and the closing brace.
        let mut head = event.clone();
        if let Event::Message { payload, .. } = &mut head {
            *payload = RawJson::null();
        }
        let mut head = serde_json::to_vec(&head)?;
        if let Some(cut) = head.len().checked_sub(b"null}".len())
            && head[cut..] == *b"null}"
        {
            head.truncate(cut);
            return Ok(vec![
                Bytes::from(head),
                payload.to_bytes(),
                Bytes::from_static(b"}"),
            ]);
        }
    }
    Ok(vec![Bytes::from(serde_json::to_vec(event)?)])
}

/// One event as body frames: `id: <id>` if it has one, its JSON text as
/// `data:` lines (a line break in the text, which JSON allows only as
/// whitespace, starts a new `data:` line; readers join them with `\n`), then
/// the blank line that ends it.
fn frames(id: Option<u64>, json: impl IntoIterator<Item = Bytes>) -> Vec<Bytes> {
    let mut out = Frames::default();
    if let Some(id) = id {
        out.copy(format!("id: {id}\n").as_bytes());
    }
    out.copy(b"data: ");
    for mut piece in json {
        while let Some(at) = memchr2(b'\n', b'\r', &piece) {
            let line = piece.split_to(at);
            let crlf = piece.starts_with(b"\r\n");
            piece.advance(if crlf { 2 } else { 1 });
            out.push(line);
            out.copy(b"\ndata: ");
        }
        out.push(piece);
    }
    out.copy(b"\n\n");
    out.finish()
}

/// Body frames being gathered: short pieces are copied together, long ones
/// go as they are.
#[derive(Default)]
struct Frames {
    done: Vec<Bytes>,
    short: BytesMut,
}

impl Frames {
    fn copy(&mut self, bytes: &[u8]) {
        self.short.extend_from_slice(bytes);
    }

    fn push(&mut self, piece: Bytes) {
        if piece.len() < SHARE_FROM {
            self.copy(&piece);
        } else {
            self.flush();
            self.done.push(piece);
        }
    }

    fn flush(&mut self) {
        if !self.short.is_empty() {
            self.done.push(self.short.split().freeze());
        }
    }

    fn finish(mut self) -> Vec<Bytes> {
        self.flush();
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peer_core::EntityId;
    use proptest::prelude::*;

    /// What an SSE reader makes of one event's frames: its id and its data
    /// (the `data:` lines joined with `\n`).
    fn read(frames: &[Bytes]) -> (Option<u64>, String) {
        let text: Vec<u8> = frames.concat();
        let text = String::from_utf8(text).expect("utf8");
        let event = text.strip_suffix("\n\n").expect("ends with a blank line");
        let (mut id, mut data) = (None, Vec::new());
        for line in event.split('\n') {
            if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.parse().expect("id"));
            } else {
                data.push(line.strip_prefix("data: ").expect("a data line"));
            }
        }
        (id, data.join("\n"))
    }

    fn message(payload: &str) -> Event {
        let mut event = Event::message(
            "m1",
            EntityId([3; 32]),
            "message",
            RawJson::parse(payload.as_bytes().to_vec(), 64).expect("json"),
        );
        event.set_event_id(9);
        event
    }

    #[test]
    fn an_event_is_an_id_line_data_lines_and_a_blank_line() {
        let frames = frames(Some(12), [Bytes::from_static(br#"{"a":1}"#)]);
        assert_eq!(frames.concat(), b"id: 12\ndata: {\"a\":1}\n\n");
        let frames = frames_of(None, "[1,\n2,\r\n3,\r4]");
        assert_eq!(
            frames.concat(),
            b"data: [1,\ndata: 2,\ndata: 3,\ndata: 4]\n\n"
        );
    }

    fn frames_of(id: Option<u64>, text: &str) -> Vec<Bytes> {
        frames(id, [Bytes::copy_from_slice(text.as_bytes())])
    }

    #[test]
    fn a_large_payload_goes_out_shared_and_the_text_is_the_events_json() {
        let payload = format!("{{\"blob\": \"{}\",\n\"n\": 1}}", "x".repeat(SHARE_FROM));
        let event = message(&payload);
        let pieces = json_pieces(&event).expect("pieces");
        assert_eq!(pieces.concat(), serde_json::to_vec(&event).expect("json"));
        let Event::Message { payload: held, .. } = &event else {
            unreachable!()
        };
        assert_eq!(
            pieces[1].as_ptr(),
            held.as_str().as_ptr(),
            "the payload is not copied"
        );
        let frames = frames(event.event_id(), pieces);
        assert!(
            frames.iter().any(|f| f.as_ptr() == held.as_str().as_ptr()),
            "nor in the frames"
        );
        let (id, data) = read(&frames);
        assert_eq!(id, Some(9));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&data).expect("json"),
            serde_json::to_value(&event).expect("value")
        );
        // A small message is written whole.
        let small = message(r#"{"n": 1}"#);
        assert_eq!(
            json_pieces(&small).expect("pieces"),
            vec![Bytes::from(serde_json::to_vec(&small).expect("json"))]
        );
    }

    proptest! {
        /// Whatever the pieces and wherever the line breaks, a reader gets
        /// the text back with each line break (`\r\n`, `\r` or `\n`) as `\n`.
        #[test]
        fn readers_get_the_text_back(
            parts in proptest::collection::vec(
                proptest::collection::vec(prop_oneof![Just("\n"), Just("\r"), Just("\r\n"), Just("ab"), Just("{\"x\": 1}")], 0..20),
                1..5,
            ),
            big in any::<bool>(),
        ) {
            let mut pieces: Vec<Bytes> = parts.iter().map(|p| Bytes::from(p.concat())).collect();
            if big {
                pieces.push(Bytes::from("y".repeat(SHARE_FROM)));
            }
            let text = String::from_utf8(pieces.concat()).expect("utf8");
            // A `\r` that ends one piece and a `\n` that starts the next are
            // two line breaks; within one piece they are one.
            let expected: String = pieces
                .iter()
                .map(|p| std::str::from_utf8(p).expect("utf8").replace("\r\n", "\n").replace('\r', "\n"))
                .collect();
            let (id, data) = read(&frames(Some(1), pieces));
            prop_assert_eq!(id, Some(1));
            prop_assert_eq!(data, expected, "from {:?}", text);
        }
    }
}
