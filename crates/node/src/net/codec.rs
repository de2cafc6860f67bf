//! Framing of the `/peer-protocol/1.2.0` request-response protocol.
//!
//! A request is one envelope: `u32 length ‖ envelope bytes`. A response is one
//! byte of kind, `0` = accepted (nothing follows) or `1` = reply (`u32 length ‖
//! envelope bytes`: a `pong`, or an `error` carrying the rejection). A request
//! longer than the limit is not buffered: its body is read and discarded, and the
//! receiver answers `MESSAGE_TOO_LARGE`.

use std::io;

use futures::prelude::*;
use libp2p::StreamProtocol;

/// The protocol name negotiated on each stream.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/peer-protocol/1.2.0");

/// An inbound request as read off the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// An envelope's bytes, not yet checked.
    Envelope(Vec<u8>),
    /// A frame of this many bytes, over the limit; its body was discarded.
    Oversize(u64),
}

/// The receiver's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The envelope was verified and accepted.
    Accepted,
    /// A signed reply envelope (`pong` or `error`).
    Reply(Vec<u8>),
}

/// The codec; `max_size` bounds every frame it reads.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    /// Largest envelope read into memory, in bytes.
    pub max_size: usize,
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
        read_body(io, len).await.map(Request::Envelope)
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
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "reply over the size limit",
                    ));
                }
                read_body(io, len).await.map(Response::Reply)
            }
            k => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown response kind {k}"),
            )),
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
            Request::Envelope(bytes) => write_frame(io, &bytes).await?,
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

    #[test]
    fn frames_round_trip_and_oversize_is_discarded() {
        let mut c = Codec { max_size: 8 };
        let mut buf = Cursor::new(Vec::new());
        block(c.write_request(&PROTOCOL, &mut buf, Request::Envelope(b"hello".to_vec())))
            .expect("write");
        buf.set_position(0);
        let got = block(c.read_request(&PROTOCOL, &mut buf)).expect("read");
        assert_eq!(got, Request::Envelope(b"hello".to_vec()));

        let mut big = Cursor::new(Vec::new());
        block(c.write_request(&PROTOCOL, &mut big, Request::Envelope(vec![7; 20]))).expect("write");
        big.set_position(0);
        let got = block(c.read_request(&PROTOCOL, &mut big)).expect("read");
        assert_eq!(got, Request::Oversize(20));
        assert_eq!(big.position(), 24, "the body was consumed, not buffered");

        for res in [Response::Accepted, Response::Reply(b"pong".to_vec())] {
            let mut buf = Cursor::new(Vec::new());
            block(c.write_response(&PROTOCOL, &mut buf, res.clone())).expect("write");
            buf.set_position(0);
            assert_eq!(
                block(c.read_response(&PROTOCOL, &mut buf)).expect("read"),
                res
            );
        }
    }
}
