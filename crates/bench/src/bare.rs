//! Frames over a bare libp2p stream, no envelopes, no crypto beyond the
//! transport's: the ceiling `peer-load --mode bare` sets beside the nodes'
//! figures, and (`--mode connections`) what a message costs on a kept
//! connection against a fresh connection per message. Two swarms in this process (TCP + Noise + Yamux, or QUIC, as the
//! nodes use), one stream, the framing of the node's long-lived streams
//! (`id:u64 ‖ len:u32 ‖ body` out, `id:u64 ‖ 0x00` back), at most `in_flight`
//! frames unanswered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use futures::prelude::*;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Stream, StreamProtocol, Swarm, SwarmBuilder, noise, tcp, yamux};
use tokio::sync::Semaphore;

use crate::nodes::Transport;

const PROTOCOL: StreamProtocol = StreamProtocol::new("/peer-load/bare/1.0.0");
const BUFFER: usize = 64 * 1024;

fn swarm() -> Result<Swarm<libp2p_stream::Behaviour>> {
    Ok(SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build())
}

fn drive<B: NetworkBehaviour + Send>(mut swarm: Swarm<B>) -> tokio::task::JoinHandle<()>
where
    B::ToSwarm: Send,
{
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    })
}

/// Two swarms: `a` (returned, not yet connected) and `b`, listening at the
/// returned address, acknowledging every frame on every stream, driven on a
/// task of its own (the returned handle).
struct Pair {
    a: Swarm<libp2p_stream::Behaviour>,
    control: libp2p_stream::Control,
    to: libp2p::PeerId,
    addr: libp2p::Multiaddr,
    served: tokio::task::JoinHandle<()>,
}

/// Starts a [`Pair`] on `transport`.
async fn pair(transport: Transport) -> Result<Pair> {
    let (a, mut b) = (swarm()?, swarm()?);
    b.listen_on(transport.listen("127.0.0.1")?)?;
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = b.select_next_some().await {
            break address;
        }
    };
    let to = *b.local_peer_id();
    let mut incoming = b.behaviour().new_control().accept(PROTOCOL)?;
    let control = a.behaviour().new_control();
    let served = drive(b);
    tokio::spawn(async move {
        while let Some((_, stream)) = incoming.next().await {
            tokio::spawn(acknowledge(stream));
        }
    });
    Ok(Pair {
        a,
        control,
        to,
        addr,
        served,
    })
}

/// Sends `frames` frames of `frame_bytes` bytes and returns the seconds it
/// took until the last was acknowledged.
pub async fn run(
    transport: Transport,
    frames: u64,
    frame_bytes: usize,
    in_flight: usize,
) -> Result<f64> {
    let p = pair(transport).await?;
    let (mut a, mut control, to, addr, served) = (p.a, p.control, p.to, p.addr, p.served);
    a.dial(addr)?;
    loop {
        match a.select_next_some().await {
            SwarmEvent::ConnectionEstablished { .. } => break,
            SwarmEvent::OutgoingConnectionError { error, .. } => return Err(error.into()),
            _ => {}
        }
    }
    let tasks = [drive(a), served];
    let stream = control
        .open_stream(to, PROTOCOL)
        .await
        .map_err(|e| anyhow!("open: {e}"))?;
    let started = Instant::now();
    let (reader, writer) = stream.split();
    let window = Arc::new(Semaphore::new(in_flight.max(1)));
    let body = vec![0x5a; frame_bytes];
    let write = async {
        let mut w = futures::io::BufWriter::with_capacity(BUFFER, writer);
        for id in 0..frames {
            let permit = match window.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    w.flush().await?;
                    window.clone().acquire_owned().await?
                }
            };
            permit.forget();
            w.write_all(&id.to_be_bytes()).await?;
            w.write_all(&u32::try_from(frame_bytes)?.to_be_bytes())
                .await?;
            w.write_all(&body).await?;
        }
        w.flush().await?;
        anyhow::Ok(w)
    };
    let read = async {
        let mut r = futures::io::BufReader::with_capacity(BUFFER, reader);
        let mut ack = [0u8; 9];
        for _ in 0..frames {
            r.read_exact(&mut ack).await?;
            window.add_permits(1);
        }
        anyhow::Ok(())
    };
    let (w, ()) = futures::try_join!(write, read).context("bare stream")?;
    let secs = started.elapsed().as_secs_f64();
    drop(w);
    for t in tasks {
        t.abort();
    }
    Ok(secs)
}

/// One frame written and its acknowledgement read.
async fn round_trip(s: &mut Stream, body: &[u8]) -> Result<()> {
    let mut frame = Vec::with_capacity(12 + body.len());
    frame.extend_from_slice(&0u64.to_be_bytes());
    frame.extend_from_slice(&u32::try_from(body.len())?.to_be_bytes());
    frame.extend_from_slice(body);
    s.write_all(&frame).await?;
    s.flush().await?;
    let mut ack = [0u8; 9];
    s.read_exact(&mut ack).await?;
    Ok(())
}

/// The latency of `n` frames of `frame_bytes` sent one after another: on one
/// stream of one connection kept open (`fresh` false), or each on a new
/// connection (dial, transport handshake, a stream), closed after its frame.
pub async fn latencies(
    transport: Transport,
    n: u64,
    frame_bytes: usize,
    fresh: bool,
) -> Result<Vec<Duration>> {
    let p = pair(transport).await?;
    let (mut a, mut control, to, addr, served) = (p.a, p.control, p.to, p.addr, p.served);
    let body = vec![0x5a; frame_bytes];
    let mut kept: Option<Stream> = None;
    let mut out = Vec::new();
    for _ in 0..n {
        let started = Instant::now();
        if kept.is_none() {
            let dial = DialOpts::peer_id(to)
                .addresses(vec![addr.clone()])
                .condition(PeerCondition::Always)
                .build();
            a.dial(dial)?;
        }
        let held = kept.take();
        let exchange = async {
            let mut s = match held {
                Some(s) => s,
                None => control
                    .open_stream(to, PROTOCOL)
                    .await
                    .map_err(|e| anyhow!("open: {e}"))?,
            };
            round_trip(&mut s, &body).await?;
            anyhow::Ok(s)
        };
        tokio::pin!(exchange);
        let s = loop {
            tokio::select! {
                done = &mut exchange => break done?,
                _ = a.select_next_some() => {}
            }
        };
        out.push(started.elapsed());
        if fresh {
            drop(s);
            let ids: Vec<_> = a.connected_peers().copied().collect();
            for peer in ids {
                _ = a.disconnect_peer_id(peer);
            }
            while a.is_connected(&to) {
                a.select_next_some().await;
            }
        } else {
            kept = Some(s);
        }
    }
    served.abort();
    Ok(out)
}

/// Answers each frame with its id and kind 0, flushing when no more frames
/// are buffered.
async fn acknowledge(stream: Stream) -> Result<()> {
    let (reader, writer) = stream.split();
    let mut r = futures::io::BufReader::with_capacity(BUFFER, reader);
    let mut w = futures::io::BufWriter::with_capacity(BUFFER, writer);
    let mut head = [0u8; 12];
    let mut body = Vec::new();
    while r.read_exact(&mut head).await.is_ok() {
        let len = u32::from_be_bytes(head[8..].try_into()?) as usize;
        body.resize(len, 0);
        r.read_exact(&mut body).await?;
        w.write_all(&head[..8]).await?;
        w.write_all(&[0]).await?;
        if r.buffer().is_empty() {
            w.flush().await?;
        }
    }
    Ok(())
}
