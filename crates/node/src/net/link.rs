//! Long-lived envelope streams: `/peer-protocol/stream/1.2.0`.
//!
//! A node sends its requests to a peer on one stream of its own, opened at the
//! first request and kept while requests flow; the peer does the same the
//! other way. Requests are pipelined: each frame carries an id its answer
//! carries back, so answers may come in any order (PROTOCOL.md section 2.2).
//!
//! - request: `u64 id ‖ u32 length ‖ envelope bytes`;
//! - answer: `u64 id ‖` a response as on the per-envelope protocol
//!   ([`super::codec`]: kind 0 accepted, 1 reply, 2 refusal).
//!
//! The receiver reads a request only once it holds that request's share of the
//! inbound byte budgets (the same budgets, minimum rate and size limit as the
//! per-envelope protocol; each stream counts as a connection) and fewer than
//! `max_unanswered` of the stream's requests wait for their answers; until
//! then the stream is not read and flow control holds the sender back.
//!
//! A stream with nothing in flight for `idle` is closed by its sender (its
//! connection then closes after libp2p's idle timeout if nothing else uses it);
//! the receiver closes one on which no request began for twice that.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::prelude::*;
use libp2p::{PeerId, Stream, StreamProtocol};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

use super::codec::{self, Codec, Request, Response};

/// The protocol name of the long-lived envelope streams.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/peer-protocol/stream/1.2.0");

/// How links behave.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How long a request waits for its answer, and a stream for its opening.
    pub timeout: Duration,
    /// A stream with nothing in flight for this long is closed.
    pub idle: Duration,
    /// Largest reply envelope read.
    pub max_size: usize,
    /// Requests of one inbound stream waiting for their answers before the
    /// stream is read no further.
    pub max_unanswered: usize,
    /// Inbound streams one peer may hold open at once; more are refused.
    pub max_inbound_per_peer: usize,
}

/// What the links tell the node actor.
#[derive(Debug)]
pub enum Event {
    /// A peer's request, to answer through `channel`.
    Request {
        /// Who sent it.
        peer: PeerId,
        /// The envelope (or notice of an oversize one).
        request: Request,
        /// Where its answer goes.
        channel: Responder,
    },
    /// The answer to our request `id`.
    Response {
        /// The request's id.
        id: u64,
        /// The answer.
        response: Response,
        /// Whether the request went out more than once (a stream that carried
        /// it ended unanswered): a `REPLAY_DETECTED` answer then means an
        /// earlier copy arrived.
        resent: bool,
    },
    /// Our request `id` got no answer.
    Failure {
        /// The request's id.
        id: u64,
        /// Why.
        error: String,
    },
}

/// The way back for one inbound request's answer. Dropping it unanswered
/// frees its place (the peer's request then times out).
#[derive(Debug)]
pub struct Responder {
    id: u64,
    tx: mpsc::UnboundedSender<Answer>,
    slot: OwnedSemaphorePermit,
}

/// An answer on its way to the stream, holding its request's place.
#[derive(Debug)]
struct Answer {
    id: u64,
    response: Response,
    _slot: OwnedSemaphorePermit,
}

impl Responder {
    /// Hands the answer to the stream's writer; `false` if the stream is gone.
    pub fn send(self, response: Response) -> bool {
        let answer = Answer {
            id: self.id,
            response,
            _slot: self.slot,
        };
        // The channel holds at most `max_unanswered` answers: each holds a slot.
        self.tx.send(answer).is_ok()
    }
}

/// A request queued on a link: its id and envelope bytes.
type Outgoing = (u64, Bytes);

/// Times a link opens a stream for the same requests when the stream ends
/// before any answer came (the peer dropped it unread, as libp2p does when
/// streams arrive faster than they are taken), before they fail.
const OPEN_ATTEMPTS: u32 = 3;

/// A request on a stream, until its answer or its failure is handed on.
struct Sent {
    /// When it fails without an answer (kept when it is sent again).
    deadline: Instant,
    /// Its bytes, kept to send it again.
    bytes: Bytes,
    /// Whether it went out before, on a stream that ended unanswered.
    resent: bool,
}

/// A request waiting for a stream.
struct Waiting {
    id: u64,
    bytes: Bytes,
    /// Its deadline, if it was sent before.
    deadline: Option<Instant>,
    resent: bool,
}

impl From<Outgoing> for Waiting {
    fn from((id, bytes): Outgoing) -> Self {
        Self {
            id,
            bytes,
            deadline: None,
            resent: false,
        }
    }
}

/// What one stream has in flight.
#[derive(Default)]
struct InFlight {
    /// Requests by id.
    requests: BTreeMap<u64, Sent>,
    /// Whether any answer came on this stream.
    answered: bool,
}

type Pending = Arc<Mutex<InFlight>>;

fn lock(p: &Pending) -> MutexGuard<'_, InFlight> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// The node's links: one outbound stream task per peer it sends to, and the
/// server of inbound streams.
pub struct Links {
    control: libp2p_stream::Control,
    links: HashMap<PeerId, mpsc::UnboundedSender<Outgoing>>,
    speakers: HashSet<PeerId>,
    events: mpsc::Sender<Event>,
    settings: Settings,
    opened: Counter,
}

impl Links {
    /// Starts serving inbound streams (budgets from `inbound`, a root codec)
    /// and returns the outbound side. Events go to `events`; each stream
    /// opened counts in `opened`.
    pub fn start(
        mut control: libp2p_stream::Control,
        inbound: Codec,
        settings: Settings,
        events: mpsc::Sender<Event>,
        opened: Counter,
    ) -> Self {
        let incoming = control
            .accept(PROTOCOL)
            .expect("the stream protocol is registered once per swarm");
        tokio::spawn(serve_all(incoming, inbound, settings, events.clone()));
        Self {
            control,
            links: HashMap::new(),
            speakers: HashSet::new(),
            events,
            settings,
            opened,
        }
    }

    /// Whether `peer` announced the stream protocol (through identify).
    pub fn speaks(&self, peer: &PeerId) -> bool {
        self.speakers.contains(peer)
    }

    /// `peer` listed `protocols`: links are used to it if they include ours.
    pub fn identified(&mut self, peer: PeerId, protocols: &[StreamProtocol]) {
        if protocols.contains(&PROTOCOL) {
            self.speakers.insert(peer);
        } else {
            self.speakers.remove(&peer);
        }
    }

    /// The last connection to `peer` closed: its link ends, failing what it
    /// has in flight.
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.speakers.remove(peer);
        self.links.remove(peer);
    }

    /// Sends request `id` to `peer` on its link (started if there is none).
    /// The caller bounds how many requests a peer has in flight.
    pub fn send(&mut self, peer: PeerId, id: u64, bytes: Bytes) {
        let mut frame = (id, bytes);
        if let Some(tx) = self.links.get(&peer) {
            match tx.send(frame) {
                Ok(()) => return,
                Err(back) => frame = back.0,
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        _ = tx.send(frame);
        self.links.insert(peer, tx);
        tokio::spawn(link(
            Opener {
                control: self.control.clone(),
                peer,
                timeout: self.settings.timeout,
                opened: self.opened.clone(),
            },
            rx,
            self.events.clone(),
            self.settings,
        ));
    }
}

/// Opens one peer's streams.
struct Opener {
    control: libp2p_stream::Control,
    peer: PeerId,
    timeout: Duration,
    opened: Counter,
}

impl Opener {
    async fn open(&mut self) -> Result<Stream, String> {
        let open = self.control.open_stream(self.peer, PROTOCOL);
        let stream = tokio::time::timeout(self.timeout, open)
            .await
            .map_err(|_| "the stream did not open in time".to_owned())?
            .map_err(|e| e.to_string())?;
        self.opened.inc();
        Ok(stream)
    }
}

/// One peer's outbound link: opens a stream at the first request, keeps it
/// while requests flow, and opens another after an idle close or a failure.
/// Ends when the node drops the link.
///
/// A stream that ends before any answer came had none of its requests
/// handled (a responder closes a stream only after answering what it read):
/// they go out again, the same bytes, on a new stream, up to
/// [`OPEN_ATTEMPTS`] times, keeping their deadlines. Should one have been
/// handled after all, its copy is refused as a replay, never delivered twice.
/// Once the node dropped the link (its peer disconnected), nothing is sent
/// again and no stream opened: what is left fails.
async fn link(
    mut opener: Opener,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    events: mpsc::Sender<Event>,
    settings: Settings,
) {
    let peer = opener.peer;
    let pending: Pending = Arc::default();
    let mut again: VecDeque<Waiting> = VecDeque::new();
    let mut attempts = 0;
    loop {
        if rx.is_closed() {
            let mut left: Vec<u64> = again.drain(..).map(|w| w.id).collect();
            while let Ok((id, _)) = rx.try_recv() {
                left.push(id);
            }
            fail(&events, left, "not connected: the link to the peer closed").await;
            return;
        }
        if again.is_empty() {
            match rx.recv().await {
                Some(first) => again.push_back(first.into()),
                None => return,
            }
        }
        let ended = run_stream(
            &mut opener,
            &mut again,
            &mut rx,
            &pending,
            &events,
            settings,
        );
        let result = ended.await;
        let (requests, answered) = {
            let mut p = lock(&pending);
            (
                std::mem::take(&mut p.requests),
                std::mem::take(&mut p.answered),
            )
        };
        attempts = if answered { 1 } else { attempts + 1 };
        let error = match result {
            Err(e) if !answered && attempts < OPEN_ATTEMPTS && !requests.is_empty() => {
                tracing::debug!(%peer, error = %e, requests = requests.len(), "stream ended unanswered: sending again");
                again.extend(requests.into_iter().map(|(id, sent)| Waiting {
                    id,
                    bytes: sent.bytes,
                    deadline: Some(sent.deadline),
                    resent: true,
                }));
                tokio::time::sleep(Duration::from_millis(10 << attempts)).await;
                continue;
            }
            Ok(()) => "the link closed".to_owned(),
            Err(e) => e,
        };
        attempts = 0;
        if !requests.is_empty() {
            tracing::debug!(%peer, %error, requests = requests.len(), "link failed");
        }
        if !fail(&events, requests.into_keys().collect(), &error).await {
            return;
        }
    }
}

/// Hands a failure for each of `ids` to the node; `false` if it is stopping.
async fn fail(events: &mpsc::Sender<Event>, ids: Vec<u64>, error: &str) -> bool {
    for id in ids {
        let error = error.to_owned();
        if events.send(Event::Failure { id, error }).await.is_err() {
            return false;
        }
    }
    true
}

/// Opens a stream, writes the requests of `again`, then those that follow,
/// and reads the answers. `Ok` once the stream was closed for idleness or
/// the link dropped.
async fn run_stream(
    opener: &mut Opener,
    again: &mut VecDeque<Waiting>,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    pending: &Pending,
    events: &mpsc::Sender<Event>,
    settings: Settings,
) -> Result<(), String> {
    // The requests count as in flight from now: if the stream cannot be
    // opened, they fail (or go again).
    let queued: Vec<Outgoing> = {
        let mut p = lock(pending);
        again
            .drain(..)
            .map(|w| {
                let sent = Sent {
                    deadline: w
                        .deadline
                        .unwrap_or_else(|| Instant::now() + settings.timeout),
                    bytes: w.bytes.clone(),
                    resent: w.resent,
                };
                p.requests.insert(w.id, sent);
                (w.id, w.bytes)
            })
            .collect()
    };
    let stream = opener.open().await?;
    let (reader, writer) = stream.split();
    tokio::select! {
        r = write_requests(writer, queued, rx, pending, settings) => r,
        r = read_answers(reader, pending, events, settings.max_size) => r,
        r = expire(pending, events, settings.timeout) => r,
    }
}

/// Frames are written into this much buffer and leave at each flush, so a
/// burst of requests or answers goes out as a few transport frames.
const WRITE_BUFFER: usize = 64 * 1024;

async fn write_requests(
    w: futures::io::WriteHalf<Stream>,
    queued: Vec<Outgoing>,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    pending: &Pending,
    settings: Settings,
) -> Result<(), String> {
    let broken = |e: io::Error| format!("writing to the stream: {e}");
    let mut w = futures::io::BufWriter::with_capacity(WRITE_BUFFER, w);
    let mut queued = queued.into_iter();
    loop {
        let frame = match queued.next() {
            Some(frame) => frame,
            None => match tokio::time::timeout(settings.idle, rx.recv()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(_) if lock(pending).requests.is_empty() => {
                    _ = w.close().await;
                    return Ok(());
                }
                Err(_) => continue,
            },
        };
        // Whatever else is queued goes out with it, then one flush.
        let mut frame = Some(frame);
        while let Some((id, bytes)) = frame
            .take()
            .or_else(|| queued.next())
            .or_else(|| rx.try_recv().ok())
        {
            lock(pending).requests.entry(id).or_insert_with(|| Sent {
                deadline: Instant::now() + settings.timeout,
                bytes: bytes.clone(),
                resent: false,
            });
            w.write_all(&id.to_be_bytes()).await.map_err(broken)?;
            codec::write_frame(&mut w, &bytes).await.map_err(broken)?;
        }
        w.flush().await.map_err(broken)?;
    }
}

async fn read_answers(
    mut r: futures::io::ReadHalf<Stream>,
    pending: &Pending,
    events: &mpsc::Sender<Event>,
    max_size: usize,
) -> Result<(), String> {
    let broken = |e: io::Error| format!("reading from the stream: {e}");
    loop {
        let mut id = [0u8; 8];
        r.read_exact(&mut id).await.map_err(broken)?;
        let id = u64::from_be_bytes(id);
        let response = codec::read_response(&mut r, max_size)
            .await
            .map_err(broken)?;
        // Room for the event first: once the request leaves `pending`, its
        // event must go out with no wait that a cancelled stream could cut.
        let Ok(room) = events.reserve().await else {
            return Ok(());
        };
        // An answer to a request that timed out (or was never sent) is dropped.
        let sent = {
            let mut p = lock(pending);
            p.answered = true;
            p.requests.remove(&id)
        };
        if let Some(sent) = sent {
            room.send(Event::Response {
                id,
                response,
                resent: sent.resent,
            });
        }
    }
}

/// Fails each request whose answer is overdue; the stream stays.
async fn expire(
    pending: &Pending,
    events: &mpsc::Sender<Event>,
    timeout: Duration,
) -> Result<(), String> {
    loop {
        // Deadlines are `timeout` after sending, and ids grow with time: the
        // first entry is the earliest. With none, no deadline can come sooner
        // than `timeout` from now.
        let first = lock(pending)
            .requests
            .iter()
            .next()
            .map(|(id, sent)| (*id, sent.deadline));
        let Some((id, at)) = first else {
            tokio::time::sleep(timeout).await;
            continue;
        };
        tokio::time::sleep_until(at).await;
        let Ok(room) = events.reserve().await else {
            return Ok(());
        };
        if lock(pending).requests.remove(&id).is_some() {
            let error = format!("no answer within {timeout:?}");
            room.send(Event::Failure { id, error });
        }
    }
}

/// Inbound streams open per peer.
type Open = Arc<Mutex<HashMap<PeerId, usize>>>;

/// A peer's place among the open inbound streams, given back when dropped.
struct Place {
    open: Open,
    peer: PeerId,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// Takes inbound streams, at most `max_inbound_per_peer` per peer at once.
async fn serve_all(
    mut incoming: libp2p_stream::IncomingStreams,
    inbound: Codec,
    settings: Settings,
    events: mpsc::Sender<Event>,
) {
    let open: Open = Arc::default();
    while let Some((peer, stream)) = incoming.next().await {
        {
            let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
            let n = o.entry(peer).or_default();
            if *n >= settings.max_inbound_per_peer {
                tracing::debug!(%peer, "inbound stream refused: the peer has its streams open");
                continue;
            }
            *n += 1;
        }
        let place = Place {
            open: open.clone(),
            peer,
        };
        // A clone of the root codec is a fresh share of the inbound budget.
        let codec = inbound.clone();
        tokio::spawn(serve(peer, stream, codec, settings, events.clone(), place));
    }
}

/// Serves one inbound stream: reads requests, writes their answers.
async fn serve(
    peer: PeerId,
    stream: Stream,
    codec: Codec,
    settings: Settings,
    events: mpsc::Sender<Event>,
    _place: Place,
) {
    let (reader, writer) = stream.split();
    let (tx, rx) = mpsc::unbounded_channel();
    let reading = read_requests(reader, peer, codec, settings, tx, events);
    let writing = write_answers(writer, rx);
    tokio::pin!(reading, writing);
    tokio::select! {
        // The writer ends first only if the stream broke.
        () = &mut writing => return,
        r = &mut reading => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "inbound stream closed");
            }
        }
    }
    // Answers still owed go out before the stream closes.
    writing.await;
}

async fn read_requests(
    mut r: futures::io::ReadHalf<Stream>,
    peer: PeerId,
    codec: Codec,
    settings: Settings,
    tx: mpsc::UnboundedSender<Answer>,
    events: mpsc::Sender<Event>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(settings.max_unanswered.max(1)));
    loop {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let mut head = [0u8; 12];
        // A stream that carries nothing for twice the idle time is closed
        // (its sender closes it after the idle time itself).
        match tokio::time::timeout(settings.idle * 2, r.read_exact(&mut head[..1])).await {
            Err(_) => return Ok(()),
            Ok(Ok(())) => {}
            // The sender closed the stream between requests.
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
        }
        // Once begun, the header is due within the rate allowance.
        tokio::time::timeout(codec::RATE_ALLOWANCE, r.read_exact(&mut head[1..]))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request header too slow"))??;
        let (id, len) = head.split_at(8);
        let id = u64::from_be_bytes(id.try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes"));
        let request = codec.read_request_body(&mut r, len.into()).await?;
        let channel = Responder {
            id,
            tx: tx.clone(),
            slot,
        };
        let event = Event::Request {
            peer,
            request,
            channel,
        };
        if events.send(event).await.is_err() {
            return Ok(());
        }
    }
}

async fn write_answers(w: futures::io::WriteHalf<Stream>, mut rx: mpsc::UnboundedReceiver<Answer>) {
    let mut w = futures::io::BufWriter::with_capacity(WRITE_BUFFER, w);
    if let Err(e) = write_each_answer(&mut w, &mut rx).await {
        tracing::debug!(error = %e, "writing answers failed");
    }
}

/// Writes answers as they come, flushing when none is waiting; closes the
/// stream once every answer is written and no more can come.
async fn write_each_answer(
    w: &mut futures::io::BufWriter<futures::io::WriteHalf<Stream>>,
    rx: &mut mpsc::UnboundedReceiver<Answer>,
) -> io::Result<()> {
    while let Some(answer) = rx.recv().await {
        let mut next = Some(answer);
        while let Some(a) = next.take().or_else(|| rx.try_recv().ok()) {
            w.write_all(&a.id.to_be_bytes()).await?;
            codec::write_response(w, &a.response).await?;
        }
        w.flush().await?;
    }
    w.close().await
}
