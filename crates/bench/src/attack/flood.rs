//! Floods on one connection: a swarm that speaks the envelope protocol keeps
//! many requests in flight to T, each a frame this module makes, until the
//! deadline, and counts T's answers by kind.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use futures::future::BoxFuture;
use peer_core::{Envelope, Identity, MessageId};
use peer_node::libp2p::request_response;
use peer_node::libp2p::swarm::SwarmEvent;
use peer_node::libp2p::{PeerId, Swarm};
use peer_node::net::codec::{Frame, Request, Response};
use peer_node::net::{self, Behaviour, BehaviourEvent};
use peer_node::node::now_ms;

use super::{Attack, Options, Report, Target, dial, fresh_identity, signed};
use crate::nodes::metric;

/// How long answers to requests in flight are awaited after the deadline.
const DRAIN: Duration = Duration::from_secs(5);

/// T's counter of peer sightings written to its database.
const COMMITS: &str = "peer_store_commits_total";

/// Drives `swarm` for `time`, ignoring its events.
async fn swarm_idle(swarm: &mut Swarm<Behaviour>, time: Duration) {
    _ = tokio::time::timeout(time, async {
        loop {
            swarm.select_next_some().await;
        }
    })
    .await;
}

/// The frames a flood sends.
enum Frames {
    /// One `message` envelope from the connection's own identity with one bit
    /// of its signature's `S` flipped, sent again and again with a fresh id,
    /// nonce and timestamp (no signing: the signature stays wrong).
    Garbage(Box<Envelope>),
    /// Envelopes made ahead, used in turn (again from the first once all
    /// were sent).
    Pool {
        frames: Vec<Vec<u8>>,
        next: usize,
        wrapped: bool,
    },
}

impl Frames {
    fn next(&mut self) -> Vec<u8> {
        match self {
            Self::Garbage(env) => {
                env.message_id = MessageId::from_random(rand::random());
                env.nonce = rand::random();
                env.timestamp_ms = now_ms();
                env.encode()
            }
            Self::Pool {
                frames,
                next,
                wrapped,
            } => {
                if *next == frames.len() {
                    *next = 0;
                    *wrapped = true;
                }
                *next += 1;
                frames[*next - 1].clone()
            }
        }
    }
}

/// A flood prepared: connected, with its frames.
pub(super) struct Flood {
    swarm: Swarm<Behaviour>,
    peer: PeerId,
    in_flight: usize,
    frames: Frames,
    target: Target,
}

/// `garbage`: envelopes with bad signatures from the connection's own
/// identity. One bit of `S` is flipped, so `S` stays canonical and `R` a
/// valid point: T does the whole verification to find it wrong (with every
/// byte flipped, a non-canonical `S` would be refused before that).
pub(super) async fn garbage(target: &Target, options: &Options) -> Result<Flood> {
    let identity = fresh_identity();
    let payload = crate::pace::payload(options.payload_bytes).to_vec();
    let mut env = signed(&identity, target.node.entity_id(), "message", payload);
    env.signature[32] ^= 1;
    Flood::connect(target, options, &identity, Frames::Garbage(Box::new(env))).await
}

/// `identities`: validly signed pings, each from an identity of its own (not
/// the connection's, so T must refuse them `WRONG_SENDER`). They are signed
/// ahead on every core, `options.identities` of them.
pub(super) async fn identities(target: &Target, options: &Options) -> Result<Flood> {
    let to = target.node.entity_id();
    let count = options.identities;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    let frames = tokio::task::spawn_blocking(move || {
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|i| {
                    let n = count / threads + usize::from(i < count % threads);
                    s.spawn(move || {
                        (0..n)
                            .map(|_| signed(&fresh_identity(), to, "ping", br#"{"n":1}"#.to_vec()))
                            .map(|env| env.encode())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect::<Vec<_>>()
        })
    })
    .await?;
    eprintln!(
        "identities: {} pings from fresh identities signed in {:.1} s",
        frames.len(),
        started.elapsed().as_secs_f64()
    );
    let frames = Frames::Pool {
        frames,
        next: 0,
        wrapped: false,
    };
    Flood::connect(target, options, &fresh_identity(), frames).await
}

/// T's answers, by kind.
#[derive(Debug, Default)]
struct Counts {
    sent: u64,
    accepted: u64,
    replies: u64,
    refused: BTreeMap<String, u64>,
    failed: u64,
    first_failure: Option<String>,
    closed: bool,
}

impl Counts {
    fn answered(&self) -> u64 {
        self.accepted + self.replies + self.refused.values().sum::<u64>()
    }
}

impl Flood {
    async fn connect(
        target: &Target,
        options: &Options,
        identity: &Identity,
        frames: Frames,
    ) -> Result<Self> {
        let key = net::keypair(identity.secret_bytes());
        let (mut swarm, _) = net::build_swarm(key, &super::attacker_config())
            .map_err(|e| anyhow::anyhow!("attacker swarm: {e}"))?;
        let commits = metric(&target.node, COMMITS);
        let peer = dial(&mut swarm, target.tcp.clone())
            .await
            .context("the attacker's dial")?;
        // T writes down the new connection's peer on a thread of its own:
        // wait for that, so the run counts only what the flood causes.
        for _ in 0..500 {
            if metric(&target.node, COMMITS) > commits {
                break;
            }
            swarm_idle(&mut swarm, Duration::from_millis(10)).await;
        }
        Ok(Self {
            swarm,
            peer,
            in_flight: options.in_flight,
            frames,
            target: target.clone(),
        })
    }

    fn send(&mut self, counts: &mut Counts) {
        counts.sent += 1;
        let frame = Frame::outbound(self.frames.next());
        self.swarm
            .behaviour_mut()
            .envelopes
            .send_request(&self.peer, Request::Envelope(frame));
    }

    /// Floods until `until`, then waits up to [`DRAIN`] for the answers still
    /// due.
    async fn flood(&mut self, until: Instant) -> Counts {
        let mut counts = Counts::default();
        let mut outstanding = 0usize;
        for _ in 0..self.in_flight {
            self.send(&mut counts);
            outstanding += 1;
        }
        let timer = tokio::time::sleep_until(until.into());
        tokio::pin!(timer);
        let mut issuing = true;
        while outstanding > 0 {
            let event = tokio::select! {
                () = &mut timer => {
                    if !issuing {
                        break;
                    }
                    issuing = false;
                    timer.as_mut().reset((until + DRAIN).into());
                    continue;
                }
                event = self.swarm.select_next_some() => event,
            };
            match event {
                SwarmEvent::Behaviour(BehaviourEvent::Envelopes(
                    request_response::Event::Message {
                        message: request_response::Message::Response { response, .. },
                        ..
                    },
                )) => match response {
                    Response::Accepted => counts.accepted += 1,
                    Response::Reply(_) => counts.replies += 1,
                    Response::Refused(r) => *counts.refused.entry(r.error_code).or_default() += 1,
                },
                SwarmEvent::Behaviour(BehaviourEvent::Envelopes(
                    request_response::Event::OutboundFailure { error, .. },
                )) => {
                    counts.failed += 1;
                    counts
                        .first_failure
                        .get_or_insert_with(|| error.to_string());
                }
                SwarmEvent::ConnectionClosed { .. } => {
                    counts.closed = true;
                    break;
                }
                _ => continue,
            }
            outstanding -= 1;
            if issuing {
                self.send(&mut counts);
                outstanding += 1;
            }
        }
        counts
    }
}

impl Attack for Flood {
    fn run(mut self: Box<Self>, until: Instant) -> BoxFuture<'static, Result<Report>> {
        Box::pin(async move {
            let (signed, commits) = ("peer_envelopes_signed_total", COMMITS);
            let node = self.target.node.clone();
            let (signed0, commits0) = (metric(&node, signed), metric(&node, commits));
            let started = Instant::now();
            let counts = self.flood(until).await;
            let secs = started.elapsed().as_secs_f64();
            let mut r = Report::default();
            r.add("in_flight", self.in_flight)
                .add("sent", counts.sent)
                .add("answered", counts.answered())
                .add(
                    "answered_per_s",
                    format!("{:.0}", counts.answered() as f64 / secs),
                );
            for (code, n) in &counts.refused {
                r.add(format!("refused_{code}"), n).add(
                    format!("refused_{code}_per_s"),
                    format!("{:.0}", *n as f64 / secs),
                );
            }
            r.add("accepted", counts.accepted)
                .add("replies", counts.replies);
            r.add("failed", counts.failed);
            if let Some(why) = &counts.first_failure {
                r.add("first_failure", format!("{why:?}"));
            }
            if counts.closed {
                r.add("connection_closed_by_node", "yes");
            }
            match &self.frames {
                Frames::Garbage(_) => {
                    r.add(
                        "t_signed_delta",
                        metric(&node, signed).saturating_sub(signed0),
                    )
                    .add(
                        "t_commits_delta",
                        metric(&node, commits).saturating_sub(commits0),
                    );
                }
                Frames::Pool {
                    frames, wrapped, ..
                } => {
                    r.add("identities", frames.len())
                        .add("identities_reused", if *wrapped { "yes" } else { "no" });
                }
            }
            Ok(r)
        })
    }
}
