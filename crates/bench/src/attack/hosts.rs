//! Attacks from another host: many swarms, each with a fresh identity, that
//! connect to T over QUIC from [`ATTACKER_IP`] and ping it once.
//!
//! A QUIC swarm dials from the socket it listens on, so one listening on
//! 127.0.0.2 connects from 127.0.0.2: another host as far as T's per-IP caps
//! are concerned (a TCP swarm would dial from 127.0.0.1).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use peer_node::libp2p::request_response;
use peer_node::libp2p::swarm::SwarmEvent;
use peer_node::libp2p::{Multiaddr, Swarm};
use peer_node::net::codec::{Frame, Request, Response};
use peer_node::net::{self, Behaviour, BehaviourEvent};
use peer_node::{Config, NodeError, NodeHandle};

use super::{Attack, Options, Report, Target, dial, fresh_identity, signed};
use crate::nodes::{self, Transport, metric};
use crate::pace;

/// The attacker host's address.
pub const ATTACKER_IP: &str = "127.0.0.2";

/// Time a host gets to connect and have its ping answered.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long after the flood starts a fresh honest node dials T (`connections`).
const HONEST_DIAL_AFTER: Duration = Duration::from_secs(1);

/// A swarm with a fresh identity connected to T, which answered its ping.
struct Host {
    swarm: Swarm<Behaviour>,
}

/// Why a host did not get in: `dial` (the connection failed), `closed` (T
/// closed it before answering), `ping` (the ping's stream failed),
/// `timeout`, or `setup` (this side could not start).
#[derive(Debug)]
struct Refused {
    kind: &'static str,
    text: String,
}

impl Refused {
    fn new(kind: &'static str, text: impl ToString) -> Self {
        Self {
            kind,
            text: text.to_string(),
        }
    }
}

impl Host {
    /// Connects to `target` from [`ATTACKER_IP`] and pings it.
    async fn connect(target: &Target) -> Result<Self, Refused> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::try_connect(target))
            .await
            .unwrap_or_else(|_| Err(Refused::new("timeout", "no pong in time")))
    }

    async fn try_connect(target: &Target) -> Result<Self, Refused> {
        let identity = fresh_identity();
        let key = net::keypair(identity.secret_bytes());
        let setup = |e: &dyn std::fmt::Display| Refused::new("setup", e);
        let (mut swarm, _) =
            net::build_swarm(key, &super::attacker_config()).map_err(|e| setup(&e))?;
        let listen = Transport::Quic.listen(ATTACKER_IP).map_err(|e| setup(&e))?;
        swarm.listen_on(listen).map_err(|e| setup(&e))?;
        loop {
            if let SwarmEvent::NewListenAddr { .. } = swarm.select_next_some().await {
                break;
            }
        }
        let peer = dial(&mut swarm, target.quic.clone())
            .await
            .map_err(|e| Refused::new("dial", format!("{e:#}")))?;
        let ping = signed(
            &identity,
            target.node.entity_id(),
            "ping",
            br#"{"n":1}"#.to_vec(),
        );
        let id = swarm
            .behaviour_mut()
            .envelopes
            .send_request(&peer, Request::Envelope(Frame::outbound(ping.encode())));
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(BehaviourEvent::Envelopes(
                    request_response::Event::Message {
                        message:
                            request_response::Message::Response {
                                request_id,
                                response,
                            },
                        ..
                    },
                )) if request_id == id => {
                    return match response {
                        Response::Reply(_) => Ok(Self { swarm }),
                        Response::Refused(r) => Err(Refused::new("ping", r.error_code)),
                        Response::Accepted => Err(Refused::new("ping", "accepted, no pong")),
                    };
                }
                SwarmEvent::Behaviour(BehaviourEvent::Envelopes(
                    request_response::Event::OutboundFailure {
                        request_id, error, ..
                    },
                )) if request_id == id => return Err(Refused::new("ping", error)),
                SwarmEvent::ConnectionClosed { cause, .. } => {
                    return Err(Refused::new("closed", format!("{cause:?}")));
                }
                _ => {}
            }
        }
    }

    /// Keeps the connection open until `until`; whether T kept it open too.
    async fn hold(mut self, until: Instant) -> bool {
        let end = tokio::time::sleep_until(until.into());
        tokio::pin!(end);
        loop {
            tokio::select! {
                () = &mut end => return true,
                event = self.swarm.select_next_some() => {
                    if let SwarmEvent::ConnectionClosed { num_established: 0, .. } = event {
                        return false;
                    }
                }
            }
        }
    }
}

/// Hosts that did not get in, by [`Refused::kind`], with the first reason of each.
#[derive(Debug, Default)]
struct Refusals(BTreeMap<&'static str, (u64, String)>);

impl Refusals {
    fn add(&mut self, r: Refused) {
        self.0.entry(r.kind).or_insert((0, r.text)).0 += 1;
    }

    fn total(&self) -> u64 {
        self.0.values().map(|(n, _)| n).sum()
    }

    fn report(&self, r: &mut Report) {
        for (kind, (n, first)) in &self.0 {
            r.add(format!("refused_{kind}"), n);
            eprintln!("  first `{kind}`: {first}");
        }
    }
}

/// A fresh honest node with default settings, listening on 127.0.0.1, in a
/// data directory of its own.
struct Newcomer {
    node: NodeHandle,
    _dir: tempfile::TempDir,
}

impl Newcomer {
    /// Starts one on the nodes' runtime.
    fn start(target: &Target) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = Config::default();
        config.network.listen = vec![Transport::Tcp.listen("127.0.0.1")?];
        let _nodes = target.nodes.enter();
        let node = nodes::start(dir.path(), config)?;
        Ok(Self { node, _dir: dir })
    }

    /// Dials `addr`: how long it took, or why it failed.
    async fn connect(&self, addr: Multiaddr) -> Result<Duration, NodeError> {
        let started = Instant::now();
        self.node.connect(addr).await?;
        Ok(started.elapsed())
    }
}

/// `connections`: up to `options.connections` attempts from [`ATTACKER_IP`],
/// `options.dialers` at a time, each from a fresh PeerId; those T accepts are
/// held until the deadline. A second after the flood starts, a fresh honest
/// node dials T's TCP address from 127.0.0.1.
pub(super) struct Connections {
    target: Target,
    attempts: usize,
    dialers: usize,
}

impl Connections {
    pub(super) fn new(target: &Target, options: &Options) -> Self {
        Self {
            target: target.clone(),
            attempts: options.connections,
            dialers: options.dialers.max(1),
        }
    }
}

impl Attack for Connections {
    fn run(self: Box<Self>, until: Instant) -> BoxFuture<'static, Result<Report>> {
        Box::pin(async move {
            let honest = {
                let target = self.target.clone();
                self.target.nodes.spawn(async move {
                    tokio::time::sleep(HONEST_DIAL_AFTER).await;
                    let newcomer = Newcomer::start(&target)?;
                    let dialed = newcomer.connect(target.tcp.clone()).await;
                    // Stay connected until the end, as an honest peer would.
                    tokio::time::sleep_until(until.into()).await;
                    anyhow::Ok(dialed)
                })
            };
            let started = Instant::now();
            let mut dialing = FuturesUnordered::new();
            let mut held = Vec::new();
            let mut refusals = Refusals::default();
            let (mut tried, mut accepted, mut peak) = (0, 0, 0);
            let mut flood_took = None;
            let end = tokio::time::sleep_until(until.into());
            tokio::pin!(end);
            loop {
                while tried < self.attempts && dialing.len() < self.dialers {
                    let target = self.target.clone();
                    dialing.push(tokio::spawn(async move { Host::connect(&target).await }));
                    tried += 1;
                }
                if dialing.is_empty() && flood_took.is_none() {
                    flood_took = Some(started.elapsed());
                }
                let done = tokio::select! {
                    () = &mut end => break,
                    Some(done) = dialing.next() => done,
                };
                match done {
                    Ok(Ok(host)) => {
                        accepted += 1;
                        held.push(tokio::spawn(host.hold(until)));
                        peak = peak.max(metric(&self.target.node, "peer_connected_peers"));
                    }
                    Ok(Err(refused)) => refusals.add(refused),
                    Err(e) => refusals.add(Refused::new("setup", e)),
                }
            }
            // Attempts still under way at the deadline are not counted.
            let unfinished = dialing.len();
            for attempt in &dialing {
                attempt.abort();
            }
            let mut kept = 0;
            for h in held {
                kept += u64::from(h.await.unwrap_or(false));
            }
            let mut r = Report::default();
            r.add("tried", tried - unfinished)
                .add("accepted", accepted)
                .add("refused", refusals.total());
            refusals.report(&mut r);
            r.add("held_to_end", kept)
                .add("t_connected_peers_peak", peak);
            if let Some(took) = flood_took {
                r.add("attempts_took_s", format!("{:.1}", took.as_secs_f64()));
            }
            match honest.await? {
                Ok(Ok(took)) => r.add("honest_dial", format!("ok_in_{}ms", took.as_millis())),
                Ok(Err(e)) => r.add("honest_dial", format!("{:?}", format!("failed: {e}"))),
                Err(e) => r.add("honest_dial", format!("{:?}", format!("not run: {e}"))),
            };
            Ok(r)
        })
    }
}

/// `rate-table`: `options.dialers` workers, each connecting from
/// [`ATTACKER_IP`] with a fresh identity, pinging once (T gives the identity
/// rate buckets) and disconnecting, again and again until the deadline. Then
/// a brand-new honest node connects and sends one `message`.
pub(super) struct RateTable {
    target: Target,
    dialers: usize,
    payload_bytes: usize,
}

impl RateTable {
    pub(super) fn new(target: &Target, options: &Options) -> Self {
        Self {
            target: target.clone(),
            dialers: options.dialers.max(1),
            payload_bytes: options.payload_bytes,
        }
    }
}

impl Attack for RateTable {
    fn run(self: Box<Self>, until: Instant) -> BoxFuture<'static, Result<Report>> {
        Box::pin(async move {
            let limited = r#"peer_messages_rejected_total{code="RATE_LIMITED"}"#;
            let limited0 = metric(&self.target.node, limited);
            let started = Instant::now();
            let workers: Vec<_> = (0..self.dialers)
                .map(|_| {
                    let target = self.target.clone();
                    tokio::spawn(async move {
                        let (mut churned, mut refusals) = (0u64, Refusals::default());
                        while Instant::now() < until {
                            match Host::connect(&target).await {
                                // Dropping the swarm closes its connection.
                                Ok(host) => {
                                    drop(host);
                                    churned += 1;
                                }
                                Err(refused) => refusals.add(refused),
                            }
                        }
                        (churned, refusals)
                    })
                })
                .collect();
            let (mut churned, mut refusals) = (0, Refusals::default());
            for w in workers {
                let (n, mut rs) = w.await?;
                churned += n;
                for (kind, (count, text)) in std::mem::take(&mut rs.0) {
                    refusals.0.entry(kind).or_insert((0, text)).0 += count;
                }
            }
            let secs = started.elapsed().as_secs_f64();
            let mut r = Report::default();
            r.add("identities_pinged", churned)
                .add("per_s", format!("{:.0}", churned as f64 / secs))
                .add("refused", refusals.total());
            refusals.report(&mut r);
            r.add(
                "t_rate_limited_delta",
                metric(&self.target.node, limited).saturating_sub(limited0),
            );
            let (target, payload) = (self.target.clone(), pace::payload(self.payload_bytes));
            let verdict = self.target.nodes.spawn(async move {
                let newcomer = Newcomer::start(&target)?;
                anyhow::Ok(match newcomer.connect(target.tcp.clone()).await {
                    Err(e) => format!("{:?}", format!("no connection: {e}")),
                    Ok(_) => {
                        let to = target.node.entity_id();
                        match pace::send(newcomer.node.clone(), to, payload).await {
                            Ok(took) => format!("accepted_in_{}ms", took.as_millis()),
                            Err(NodeError::Rejected { code, .. }) => format!("refused_{code}"),
                            Err(e) => format!("{:?}", format!("failed: {e}")),
                        }
                    }
                })
            });
            r.add("newcomer_message", verdict.await??);
            Ok(r)
        })
    }
}
