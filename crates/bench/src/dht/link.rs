//! A link with a fixed one-way latency, for libp2p's in-memory transport: a
//! reader sees each piece of data `latency` after it arrived, so a request and
//! its answer take at least one round trip of `2 × latency` whatever the CPU
//! does.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

/// Largest read from the underlying stream at once.
const CHUNK: usize = 16 * 1024;

/// A byte stream whose reads are delayed by a fixed latency; order is kept and
/// writes pass straight through. With a latency of zero it is the stream itself.
pub struct Delayed<S> {
    inner: S,
    latency: Duration,
    /// Data that arrived, with the instant it may be read.
    queue: VecDeque<(Instant, Vec<u8>)>,
    /// How much of the front of `queue` was already read.
    offset: usize,
    /// When the end of the stream, or its error, may be seen.
    end: Option<(Instant, Option<io::Error>)>,
    /// Wakes the reader when the front of `queue` (or `end`) is due.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S> Delayed<S> {
    /// `inner` with reads delayed by `latency`.
    pub fn new(inner: S, latency: Duration) -> Self {
        Self {
            inner,
            latency,
            queue: VecDeque::new(),
            offset: 0,
            end: None,
            timer: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Delayed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.latency.is_zero() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        // Take in everything that has arrived, stamped with when it is due.
        let mut scratch = [0u8; CHUNK];
        while this.end.is_none() {
            let due = Instant::now() + this.latency;
            match Pin::new(&mut this.inner).poll_read(cx, &mut scratch) {
                Poll::Ready(Ok(0)) => this.end = Some((due, None)),
                Poll::Ready(Ok(n)) => this.queue.push_back((due, scratch[..n].to_vec())),
                Poll::Ready(Err(e)) => this.end = Some((due, Some(e))),
                Poll::Pending => break,
            }
        }
        loop {
            let due = match (this.queue.front(), &this.end) {
                (Some((due, _)), _) | (None, Some((due, _))) => *due,
                // The inner stream will wake us.
                (None, None) => return Poll::Pending,
            };
            if due <= Instant::now() {
                break;
            }
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            timer.as_mut().reset(due);
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        if let Some((_, data)) = this.queue.front() {
            let n = buf.len().min(data.len() - this.offset);
            buf[..n].copy_from_slice(&data[this.offset..this.offset + n]);
            this.offset += n;
            if this.offset == data.len() {
                this.queue.pop_front();
                this.offset = 0;
            }
            return Poll::Ready(Ok(n));
        }
        match this.end.as_mut().and_then(|(_, error)| error.take()) {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Ready(Ok(0)),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Delayed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use futures::{AsyncReadExt, SinkExt, TryStreamExt};

    use super::*;

    #[tokio::test]
    async fn data_is_read_a_latency_after_it_arrived_and_in_order() {
        let latency = Duration::from_millis(50);
        let (mut tx, rx) = futures::channel::mpsc::unbounded::<io::Result<Vec<u8>>>();
        let mut reader = Delayed::new(rx.into_async_read(), latency);
        let start = Instant::now();
        tx.send(Ok(b"one".to_vec())).await.expect("send");
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(Ok(b"two".to_vec())).await.expect("send");
        });
        let mut got = [0u8; 3];
        reader.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"one");
        assert!(start.elapsed() >= latency);
        later.await.expect("sender");
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.expect("read");
        assert_eq!(rest, b"two");
        assert!(start.elapsed() >= latency + Duration::from_millis(20));
    }
}
