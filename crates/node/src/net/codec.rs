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
//! Inbound bodies are buffered only against a node-wide byte budget
//! (`network.max_inbound_buffer_bytes`): a reader waits for budget before it
//! allocates, and the budget comes back when the request is dropped. So however
//! many peers and streams there are, inbound buffers never exceed the budget.

use std::io;
use std::sync::Arc;

use futures::prelude::*;
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The protocol name negotiated on each stream.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/peer-protocol/1.2.0");

/// Largest refusal body read (response kind 2); a longer one is invalid data.
pub const MAX_REFUSAL: u64 = 64 * 1024;

/// A request: an envelope's bytes, or (inbound only) notice of an oversize frame.
#[derive(Debug)]
pub enum Request {
    /// An envelope's bytes, not yet checked.
    Envelope(Frame),
    /// A frame of this many bytes, over the limit; its body was discarded.
    Oversize(u64),
}

/// Envelope bytes, holding their share of the inbound budget until dropped.
#[derive(Debug)]
pub struct Frame {
    /// The bytes.
    pub bytes: Vec<u8>,
    _budget: Option<OwnedSemaphorePermit>,
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

/// The codec; `max_size` bounds every frame it reads, `budget` all inbound
/// bodies buffered at once.
#[derive(Debug, Clone)]
pub struct Codec {
    max_size: usize,
    budget: Arc<Semaphore>,
}

impl Codec {
    /// A codec reading frames of at most `max_size` bytes, with at most
    /// `budget_bytes` of inbound bodies buffered across all its clones. The
    /// caller guarantees `budget_bytes >= max_size` (the configuration checks it).
    pub fn new(max_size: usize, budget_bytes: usize) -> Self {
        Self {
            max_size,
            budget: Arc::new(Semaphore::new(budget_bytes.min(Semaphore::MAX_PERMITS))),
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

async fn write_frame<T: AsyncWrite + Unpin>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| io::Error::other("frame over 4 GiB"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await
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
        if len > self.max_size as u64 {
            futures::io::copy(io.take(len), &mut futures::io::sink()).await?;
            return Ok(Request::Oversize(len));
        }
        // len <= max_size <= budget, which fits in u32 permits.
        let permits = u32::try_from(len).map_err(io::Error::other)?;
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(io::Error::other)?;
        let bytes = read_body(io, len).await?;
        Ok(Request::Envelope(Frame {
            bytes,
            _budget: Some(permit),
        }))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut kind = [0u8; 1];
        io.read_exact(&mut kind).await?;
        match kind[0] {
            0 => Ok(Response::Accepted),
            1 => {
                let len = read_len(io).await?;
                if len > self.max_size as u64 {
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
        match res {
            Response::Accepted => io.write_all(&[0]).await?,
            Response::Reply(bytes) => {
                io.write_all(&[1]).await?;
                write_frame(io, &bytes).await?;
            }
            Response::Refused(refusal) => {
                io.write_all(&[2]).await?;
                write_frame(io, &serde_json::to_vec(&refusal)?).await?;
            }
        }
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use libp2p::request_response::Codec as _;

    fn block<F: Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    fn written(c: &mut Codec, bytes: Vec<u8>) -> Cursor<Vec<u8>> {
        let mut buf = Cursor::new(Vec::new());
        let req = Request::Envelope(Frame::outbound(bytes));
        block(c.write_request(&PROTOCOL, &mut buf, req)).expect("write");
        buf.set_position(0);
        buf
    }

    fn refusal(original: Option<&str>, retry_after_ms: Option<u64>) -> Refusal {
        Refusal {
            error_code: "RATE_LIMITED".into(),
            error_message: "slow down".into(),
            original_message_id: original.map(str::to_owned),
            retry_after_ms,
        }
    }

    #[test]
    fn frames_round_trip_and_oversize_is_discarded() {
        let mut c = Codec::new(8, 16);
        let mut buf = written(&mut c, b"hello".to_vec());
        match block(c.read_request(&PROTOCOL, &mut buf)).expect("read") {
            Request::Envelope(f) => assert_eq!(f.bytes, b"hello"),
            other => panic!("{other:?}"),
        }
        let mut big = written(&mut c, vec![7; 20]);
        let got = block(c.read_request(&PROTOCOL, &mut big)).expect("read");
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
            block(c.write_response(&PROTOCOL, &mut buf, res.clone())).expect("write");
            buf.set_position(0);
            assert_eq!(
                block(c.read_response(&PROTOCOL, &mut buf)).expect("read"),
                res
            );
        }
    }

    #[tokio::test]
    async fn a_refusal_is_kind_2_with_the_error_payload_fields() {
        let mut c = Codec::new(8, 16);
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
        let mut c = Codec::new(8, 16);
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

    #[test]
    fn inbound_bodies_hold_budget_until_dropped() {
        let mut c = Codec::new(8, 10);
        let mut one = written(&mut c, vec![1; 8]);
        let first = block(c.read_request(&PROTOCOL, &mut one)).expect("read");
        assert_eq!(c.budget.available_permits(), 2);
        // A second 8-byte body must wait until the first is dropped.
        let mut two = written(&mut c, vec![2; 8]);
        let mut reader = c.clone();
        let protocol = PROTOCOL;
        let mut read = Box::pin(reader.read_request(&protocol, &mut two));
        assert!(
            futures::FutureExt::now_or_never(&mut read).is_none(),
            "waits for budget"
        );
        drop(first);
        assert!(matches!(block(read).expect("read"), Request::Envelope(_)));
        assert_eq!(c.budget.available_permits(), 10, "all budget is back");
    }
}
