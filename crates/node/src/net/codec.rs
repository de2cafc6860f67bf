//! Framing of the `/peer-protocol/1.2.0` request-response protocol.
//!
//! A request is one envelope: `u32 length ‖ envelope bytes`. A response is one
//! byte of kind: `0` = accepted (nothing follows), `1` = reply (`u32 length ‖
//! envelope bytes`: a `pong`, a handshake step, or an `error` from a peer that
//! sends refusals that way), or `2` = refusal (`u32 length ‖ JSON object`, the
//! fields of an `error` payload, unsigned: the connection already proves who
//! answers). A request longer than the limit is not buffered: its body is read
//! and discarded, and the receiver answers `MESSAGE_TOO_LARGE`.
//!
//! Inbound bodies are buffered against two byte budgets: their connection's
//! share (`network.max_inbound_bytes_per_connection`) and then the node's
//! (`network.max_inbound_buffer_bytes`). A reader waits for both before it
//! allocates, and both come back when the request is dropped. So however many
//! peers and streams there are, inbound buffers never exceed the node's budget,
//! and the streams of one connection wait only behind each other. Once a body
//! has its budget it must arrive at `network.min_inbound_bytes_per_sec` after a
//! one-second allowance, or the stream is dropped.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::prelude::*;
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The protocol name negotiated on each stream.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/peer-protocol/1.2.0");

/// Largest refusal body read (response kind 2); a longer one is invalid data.
pub const MAX_REFUSAL: u64 = 64 * 1024;

/// Time a request body gets on top of its length divided by the minimum rate.
pub const RATE_ALLOWANCE: Duration = Duration::from_secs(1);

/// A request: an envelope's bytes, or (inbound only) notice of an oversize frame.
#[derive(Debug)]
pub enum Request {
    /// An envelope's bytes, not yet checked.
    Envelope(Frame),
    /// A frame of this many bytes, over the limit; its body was discarded.
    Oversize(u64),
}

/// Envelope bytes, holding their share of the inbound budgets until dropped.
#[derive(Debug)]
pub struct Frame {
    /// The bytes.
    pub bytes: Vec<u8>,
    _budget: Option<Budget>,
}

/// Bytes taken from a connection's share and from the node's budget.
#[derive(Debug)]
struct Budget {
    _connection: OwnedSemaphorePermit,
    _node: OwnedSemaphorePermit,
}

impl Frame {
    /// Bytes to send (outbound frames take no inbound budget).
    pub fn outbound(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            _budget: None,
        }
    }
}

/// The receiver's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The envelope was verified and accepted.
    Accepted,
    /// A signed reply envelope (`pong`, a handshake step, or `error`).
    Reply(Vec<u8>),
    /// The envelope was refused.
    Refused(Refusal),
}

/// A refusal: the fields of an `error` envelope's payload (PROTOCOL.md
/// section 6), sent unsigned as response kind 2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The wire code, such as `RATE_LIMITED`; unknown codes are kept as they are.
    pub error_code: String,
    /// Why, for humans.
    pub error_message: String,
    /// The refused envelope's `message_id`, when the bytes got that far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_message_id: Option<String>,
    /// How long to wait before sending again (with `RATE_LIMITED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl Refusal {
    /// The refusal of envelope `id` with `rejection`.
    pub fn new(
        rejection: &peer_core::Rejection,
        id: Option<peer_core::MessageId>,
        retry_after: Option<std::time::Duration>,
    ) -> Self {
        Self {
            error_code: rejection.code.as_str().to_owned(),
            error_message: rejection.reason.clone(),
            original_message_id: id.map(|i| i.to_string()),
            retry_after_ms: retry_after.map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

/// What a codec reads and how much it buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame read, in bytes.
    pub max_size: usize,
    /// Inbound bodies buffered at once by the whole node, in bytes.
    pub node_bytes: usize,
    /// Inbound bodies buffered at once by one connection, in bytes.
    pub connection_bytes: usize,
    /// Slowest rate a body may arrive at once it has its budget, in bytes per
    /// second (after [`RATE_ALLOWANCE`]).
    pub min_rate: u64,
}

/// The codec. The caller guarantees `max_size <= connection_bytes <=
/// node_bytes` (the configuration checks it); a frame larger than a budget
/// would wait for it forever.
///
/// Each connection has its own share of the inbound budget, and the codec finds
/// its connection through cloning. libp2p-request-response 0.30 clones the
/// behaviour's codec exactly once per connection handler
/// (`Behaviour::handle_established_{inbound,outbound}_connection`), and each
/// handler clones its own codec once per stream (`Handler::on_fully_negotiated_*`).
/// So a clone of the root codec (the one given to the behaviour) starts a new
/// connection with a fresh share, and a clone of a connection's codec is one of
/// its streams and uses the same share. `tests/limits.rs`
/// `one_connection_using_its_share_does_not_hold_up_another` checks this
/// against real swarms.
#[derive(Debug)]
pub struct Codec {
    limits: Limits,
    node: Arc<Semaphore>,
    connection: Arc<Semaphore>,
    root: bool,
}

fn semaphore(bytes: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS)))
}

impl Codec {
    /// The root codec, to give to the request-response behaviour. Read from
    /// directly (as unit tests do), it behaves as one connection.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            node: semaphore(limits.node_bytes),
            connection: semaphore(limits.connection_bytes),
            root: true,
        }
    }

    /// Another root codec drawing on the same node budget.
    pub fn sibling(&self) -> Self {
        Self {
            limits: self.limits,
            node: self.node.clone(),
            connection: semaphore(self.limits.connection_bytes),
            root: true,
        }
    }

    /// Waits for `len` bytes of the connection's share, then of the node's budget.
    async fn reserve(&self, len: u64) -> io::Result<Budget> {
        // len <= max_size <= the budgets, which fit in u32 permits.
        let permits = u32::try_from(len).map_err(io::Error::other)?;
        let connection = self.connection.clone().acquire_many_owned(permits);
        let connection = connection.await.map_err(io::Error::other)?;
        let node = self.node.clone().acquire_many_owned(permits);
        let node = node.await.map_err(io::Error::other)?;
        Ok(Budget {
            _connection: connection,
            _node: node,
        })
    }

    /// Reads a `len`-byte body into `buf` (or, without one, drains it), at no
    /// less than the minimum rate all along: `n` bytes must have arrived
    /// [`RATE_ALLOWANCE`] + `n` / rate after `start`, for every `n`. So a
    /// sender that trickles a byte a second is cut after about the allowance,
    /// not after the whole body's time.
    async fn paced<T: AsyncRead + Unpin>(
        &self,
        io: &mut T,
        len: u64,
        mut buf: Option<&mut [u8]>,
    ) -> io::Result<()> {
        let rate = self.limits.min_rate.max(1);
        let start = tokio::time::Instant::now();
        let mut scratch = [0u8; 16 * 1024];
        let mut got: u64 = 0;
        while got < len {
            let due = RATE_ALLOWANCE
                + Duration::from_nanos((got + 1).saturating_mul(1_000_000_000) / rate);
            let left = usize::try_from(len - got).unwrap_or(usize::MAX);
            let into = match buf.as_deref_mut() {
                Some(b) => {
                    let from = usize::try_from(got).map_err(io::Error::other)?;
                    &mut b[from..]
                }
                None => &mut scratch[..left.min(16 * 1024)],
            };
            let n = match tokio::time::timeout_at(start + due, io.read(into)).await {
                Ok(n) => n?,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "{got} of {len} bytes received in {due:?}: slower than the minimum of {rate} bytes/s"
                        ),
                    ));
                }
            };
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            got += n as u64;
        }
        Ok(())
    }

    /// Reads a request body of `len` bytes (its length already read): over
    /// the size limit it is drained and becomes [`Request::Oversize`];
    /// otherwise it waits for its budget, then arrives at the minimum rate.
    pub(crate) async fn read_request_body<T: AsyncRead + Unpin>(
        &self,
        io: &mut T,
        len: u64,
    ) -> io::Result<Request> {
        if len > self.limits.max_size as u64 {
            self.paced(io, len, None).await?;
            return Ok(Request::Oversize(len));
        }
        let budget = self.reserve(len).await?;
        // The clock starts once the budget is ours: waiting for it is not the
        // sender's fault.
        let mut bytes = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
        self.paced(io, len, Some(&mut bytes)).await?;
        Ok(Request::Envelope(Frame {
            bytes,
            _budget: Some(budget),
        }))
    }
}

impl Clone for Codec {
    /// A clone of the root codec is a new connection, with a fresh share of the
    /// inbound budget; a clone of a connection's codec shares its connection's.
    /// See [`Codec`] for why this matches how libp2p clones codecs.
    fn clone(&self) -> Self {
        let connection = if self.root {
            semaphore(self.limits.connection_bytes)
        } else {
            self.connection.clone()
        };
        Self {
            limits: self.limits,
            node: self.node.clone(),
            connection,
            root: false,
        }
    }
}

async fn read_len<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<u64> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    Ok(u32::from_be_bytes(len).into())
}

async fn read_body<T: AsyncRead + Unpin>(io: &mut T, len: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

pub(crate) async fn write_frame<T: AsyncWrite + Unpin>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| io::Error::other("frame over 4 GiB"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await
}

/// Reads a response (kind byte, then its body); a reply longer than
/// `max_size` or a refusal longer than [`MAX_REFUSAL`] is invalid data.
pub(crate) async fn read_response<T: AsyncRead + Unpin>(
    io: &mut T,
    max_size: usize,
) -> io::Result<Response> {
    let mut kind = [0u8; 1];
    io.read_exact(&mut kind).await?;
    match kind[0] {
        0 => Ok(Response::Accepted),
        1 => {
            let len = read_len(io).await?;
            if len > max_size as u64 {
                return Err(invalid("reply over the size limit"));
            }
            read_body(io, len).await.map(Response::Reply)
        }
        2 => {
            let len = read_len(io).await?;
            if len > MAX_REFUSAL {
                return Err(invalid(format!(
                    "refusal of {len} bytes, over {MAX_REFUSAL}"
                )));
            }
            let body = read_body(io, len).await?;
            serde_json::from_slice(&body)
                .map(Response::Refused)
                .map_err(|e| invalid(format!("refusal is not its JSON object: {e}")))
        }
        k => Err(invalid(format!("unknown response kind {k}"))),
    }
}

/// Writes a response: its kind byte, then its body (nothing is flushed or closed).
pub(crate) async fn write_response<T: AsyncWrite + Unpin>(
    io: &mut T,
    res: &Response,
) -> io::Result<()> {
    match res {
        Response::Accepted => io.write_all(&[0]).await,
        Response::Reply(bytes) => {
            io.write_all(&[1]).await?;
            write_frame(io, bytes).await
        }
        Response::Refused(refusal) => {
            io.write_all(&[2]).await?;
            write_frame(io, &serde_json::to_vec(refusal)?).await
        }
    }
}

fn invalid(text: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, text.into())
}

impl libp2p::request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let len = read_len(io).await?;
        self.read_request_body(io, len).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_response(io, self.limits.max_size).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            Request::Envelope(frame) => write_frame(io, &frame.bytes).await?,
            Request::Oversize(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "Oversize is only read, never sent",
                ));
            }
        }
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_response(io, &res).await?;
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;
    use futures::io::Cursor;
    use libp2p::request_response::Codec as _;

    fn limits(max_size: usize, connection_bytes: usize, node_bytes: usize) -> Limits {
        Limits {
            max_size,
            node_bytes,
            connection_bytes,
            min_rate: 1000,
        }
    }

    async fn written(c: &mut Codec, bytes: Vec<u8>) -> Cursor<Vec<u8>> {
        let mut buf = Cursor::new(Vec::new());
        let req = Request::Envelope(Frame::outbound(bytes));
        c.write_request(&PROTOCOL, &mut buf, req)
            .await
            .expect("write");
        buf.set_position(0);
        buf
    }

    async fn read(c: &mut Codec, bytes: Vec<u8>) -> Frame {
        let mut buf = written(c, bytes).await;
        match c.read_request(&PROTOCOL, &mut buf).await.expect("read") {
            Request::Envelope(f) => f,
            other => panic!("{other:?}"),
        }
    }

    fn refusal(original: Option<&str>, retry_after_ms: Option<u64>) -> Refusal {
        Refusal {
            error_code: "RATE_LIMITED".into(),
            error_message: "slow down".into(),
            original_message_id: original.map(str::to_owned),
            retry_after_ms,
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversize_is_discarded() {
        let mut c = Codec::new(limits(8, 16, 16));
        assert_eq!(read(&mut c, b"hello".to_vec()).await.bytes, b"hello");
        let mut big = written(&mut c, vec![7; 20]).await;
        let got = c.read_request(&PROTOCOL, &mut big).await.expect("read");
        assert!(matches!(got, Request::Oversize(20)));
        assert_eq!(big.position(), 24, "the body was consumed, not buffered");

        let responses = [
            Response::Accepted,
            Response::Reply(b"pong".to_vec()),
            Response::Refused(refusal(None, None)),
            Response::Refused(refusal(
                Some("76bc7f9e-dbee-4af8-bb33-fb05f7f073c4"),
                Some(300),
            )),
        ];
        for res in responses {
            let mut buf = Cursor::new(Vec::new());
            c.write_response(&PROTOCOL, &mut buf, res.clone())
                .await
                .expect("write");
            buf.set_position(0);
            let back = c.read_response(&PROTOCOL, &mut buf).await.expect("read");
            assert_eq!(back, res);
        }
    }

    #[tokio::test]
    async fn a_refusal_is_kind_2_with_the_error_payload_fields() {
        let mut c = Codec::new(limits(8, 16, 16));
        let mut buf = Cursor::new(Vec::new());
        let res = Response::Refused(refusal(Some("m-1"), Some(300)));
        c.write_response(&PROTOCOL, &mut buf, res)
            .await
            .expect("write");
        let wire = buf.into_inner();
        assert_eq!(wire[0], 2);
        let len = u32::from_be_bytes([wire[1], wire[2], wire[3], wire[4]]) as usize;
        assert_eq!(len, wire.len() - 5);
        let json: serde_json::Value = serde_json::from_slice(&wire[5..]).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "error_code": "RATE_LIMITED",
                "error_message": "slow down",
                "original_message_id": "m-1",
                "retry_after_ms": 300,
            })
        );
        // Without the optional fields, they are absent rather than null.
        let mut buf = Cursor::new(Vec::new());
        let res = Response::Refused(refusal(None, None));
        c.write_response(&PROTOCOL, &mut buf, res)
            .await
            .expect("write");
        let json: serde_json::Value = serde_json::from_slice(&buf.get_ref()[5..]).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"error_code": "RATE_LIMITED", "error_message": "slow down"})
        );
    }

    async fn read_kind_2(body: &[u8]) -> io::Result<Response> {
        let mut c = Codec::new(limits(8, 16, 16));
        let len = u32::try_from(body.len()).expect("fits");
        let mut wire = vec![2];
        wire.extend_from_slice(&len.to_be_bytes());
        wire.extend_from_slice(body);
        c.read_response(&PROTOCOL, &mut Cursor::new(wire)).await
    }

    #[tokio::test]
    async fn refusals_over_64_kib_or_not_the_json_object_are_invalid_data() {
        let pad = "x".repeat(MAX_REFUSAL as usize);
        let over = serde_json::json!({"error_code": "X", "error_message": pad}).to_string();
        let err = read_kind_2(over.as_bytes()).await.expect_err("too long");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("over 65536"), "{err}");
        // At the cap it is read (the reason is for humans, any length).
        let empty = r#"{"error_code":"X","error_message":""}"#;
        let pad = "x".repeat(MAX_REFUSAL as usize - empty.len());
        let at = format!(r#"{{"error_code":"X","error_message":"{pad}"}}"#);
        assert_eq!(at.len() as u64, MAX_REFUSAL);
        assert!(matches!(
            read_kind_2(at.as_bytes()).await,
            Ok(Response::Refused(_))
        ));
        for bad in [&b"not json"[..], br#"{"error_message":"no code"}"#] {
            let err = read_kind_2(bad).await.expect_err("not a refusal");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        }
    }

    #[tokio::test]
    async fn inbound_bodies_hold_budget_until_dropped() {
        let mut c = Codec::new(limits(8, 10, 10));
        let first = read(&mut c, vec![1; 8]).await;
        assert_eq!(c.node.available_permits(), 2);
        // A second 8-byte body, on another connection, must wait until the
        // first is dropped.
        let mut two = written(&mut c, vec![2; 8]).await;
        let mut reader = c.clone();
        let protocol = PROTOCOL;
        let mut read_two = Box::pin(reader.read_request(&protocol, &mut two));
        assert!((&mut read_two).now_or_never().is_none(), "waits for budget");
        drop(first);
        assert!(matches!(
            read_two.await.expect("read"),
            Request::Envelope(_)
        ));
        assert_eq!(c.node.available_permits(), 10, "all budget is back");
    }

    #[tokio::test]
    async fn a_connection_waits_only_behind_its_own_streams() {
        let root = Codec::new(limits(8, 8, 32));
        let a = root.clone();
        let (mut a1, mut a2, mut b) = (a.clone(), a.clone(), root.clone());
        let held = read(&mut a1, vec![1; 8]).await;
        assert_eq!(a.connection.available_permits(), 0, "a's share is taken");
        // Another stream of the same connection waits, even for one byte and
        // with most of the node's budget free.
        let mut small = written(&mut a2, vec![2]).await;
        let protocol = PROTOCOL;
        let mut waiting = Box::pin(a2.read_request(&protocol, &mut small));
        assert!(
            (&mut waiting).now_or_never().is_none(),
            "behind its own stream"
        );
        // Another connection reads at once, from its own share.
        assert_eq!(read(&mut b, vec![3; 8]).await.bytes, vec![3; 8]);
        drop(held);
        assert!(matches!(waiting.await.expect("read"), Request::Envelope(_)));
        assert_eq!(root.node.available_permits(), 32, "all budget is back");
    }

    /// Yields `head` at once, then `step` bytes of `body` every `every`.
    struct Trickle {
        head: Vec<u8>,
        body: Vec<u8>,
        step: usize,
        every: Duration,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    impl Trickle {
        fn new(len: u32, step: usize, every_ms: u64) -> Self {
            Self {
                head: len.to_be_bytes().to_vec(),
                body: vec![9; len as usize],
                step,
                every: Duration::from_millis(every_ms),
                sleep: None,
            }
        }
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let this = &mut *self;
            let (from, n) = if this.head.is_empty() {
                let every = this.every;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
                futures::ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
                let n = this.step.min(this.body.len());
                (&mut this.body, n)
            } else {
                let n = this.head.len();
                (&mut this.head, n)
            };
            let n = n.min(buf.len());
            buf[..n].copy_from_slice(&from[..n]);
            from.drain(..n);
            Poll::Ready(Ok(n))
        }
    }

    async fn trickled(c: &mut Codec, len: u32, step: usize, every_ms: u64) -> io::Result<Request> {
        c.read_request(&PROTOCOL, &mut Trickle::new(len, step, every_ms))
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_slower_than_the_minimum_rate_is_dropped_at_its_deadline() {
        // At 1,000 bytes/s, n bytes are due 1 s + n ms after the budget is
        // taken: 100 bytes every 99 ms keep ahead (the allowance absorbs the
        // steps), 100 every 201 ms fall behind by 1 s after 2 s or so.
        let mut c = Codec::new(limits(1000, 1000, 1000));
        let on_time = trickled(&mut c, 1000, 100, 99).await.expect("keeps up");
        assert!(matches!(on_time, Request::Envelope(_)));
        drop(on_time);
        let err = trickled(&mut c, 1000, 100, 201)
            .await
            .expect_err("too slow");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert_eq!(c.node.available_permits(), 1000, "the budget is back");
        assert_eq!(c.connection.available_permits(), 1000);
        // An oversize body is drained under the same rule.
        let drained = trickled(&mut c, 2000, 200, 199).await.expect("keeps up");
        assert!(matches!(drained, Request::Oversize(2000)));
        let err = trickled(&mut c, 2000, 200, 401)
            .await
            .expect_err("too slow");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_that_stalls_early_is_cut_after_the_allowance_not_the_whole_body() {
        // 1,000 bytes at 1,000 bytes/s would have 2 s in all, but the first
        // 100 bytes are due by 1.1 s: a stream that sends nothing is cut then.
        let mut c = Codec::new(limits(1000, 1000, 1000));
        let started = tokio::time::Instant::now();
        let err = trickled(&mut c, 1000, 100, 5_000)
            .await
            .expect_err("stalled");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1000) && took < Duration::from_millis(1100),
            "{took:?}"
        );
        assert_eq!(c.node.available_permits(), 1000, "the budget is back");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_budget_does_not_count_against_the_rate() {
        let mut c = Codec::new(limits(1000, 1000, 1000));
        let held = read(&mut c, vec![1; 1000]).await;
        let mut stream = c.clone();
        let reader = tokio::spawn(async move { trickled(&mut stream, 1000, 100, 99).await });
        // Far past the body's 2 s, but it has no budget yet.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!reader.is_finished(), "still waiting for budget");
        drop(held);
        let read = reader
            .await
            .expect("task")
            .expect("read at the rate once it has budget");
        assert!(matches!(read, Request::Envelope(_)));
    }
}
