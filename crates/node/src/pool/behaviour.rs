//! The pool's libp2p behaviour: every dial to a known peer, whoever starts it
//! (the agent, discovery, Kademlia, a parked send), passes its circuit breaker
//! in `handle_pending_outbound_connection`, so an open breaker stops the dial
//! before any address is tried; the dial's outcome is the breaker's call
//! outcome. The actor reaches the same breakers through
//! [`Behaviour::allow_send`], [`Behaviour::answered`] and
//! [`Behaviour::failure`] for requests on a connection. Time is read here, at
//! the edge; the breakers themselves take it as a number.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, DialError, DialFailure, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId, ping};
use peer_core::EntityId;

use super::breaker::Refused;
use super::retry::Budget;
use super::{Breakers, Counters, Dial, PoolConfig, PoolView};
use crate::clock::Monotonic;
use crate::net::entity_of;

/// A dial refused because the peer's breaker is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitOpen {
    /// The peer.
    pub entity_id: EntityId,
    /// Ms until it lets trial calls through.
    pub retry_after_ms: u64,
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "circuit open for {}: its last calls failed; no dial for {} ms",
            self.entity_id, self.retry_after_ms
        )
    }
}

impl std::error::Error for CircuitOpen {}

/// The breakers, and the dials whose outcome they wait for.
pub struct Behaviour {
    breakers: Breakers,
    retries: Budget,
    clock: Monotonic,
    dialing: HashMap<ConnectionId, EntityId>,
}

impl Behaviour {
    /// No peer remembered yet.
    pub fn new(config: &PoolConfig) -> Self {
        Self {
            breakers: Breakers::new(config),
            retries: Budget::new(config.retry(), 0),
            clock: Monotonic::new(Instant::now()),
            dialing: HashMap::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.ms(Instant::now())
    }

    /// Asks to send a request to `peer`; refused (and counted) while its
    /// breaker is open. An allowed send's outcome must be reported.
    pub fn allow_send(&mut self, peer: EntityId) -> Result<(), CircuitOpen> {
        let now = self.now_ms();
        self.breakers
            .allow(peer, now)
            .map_err(|Refused { retry_after_ms }| {
                self.breakers.count_send_refused();
                CircuitOpen {
                    entity_id: peer,
                    retry_after_ms,
                }
            })
    }

    /// A send needs a connection to its peer: `reused` if one is open (else
    /// it waits for a dial).
    pub fn acquire(&mut self, reused: bool) {
        let c = self.breakers.counters();
        c.acquisitions.inc();
        if reused {
            c.reuses.inc();
        }
    }

    /// A request to `peer` was answered (even with a refusal) `latency` after
    /// it was sent.
    pub fn answered(&mut self, peer: EntityId, latency: Duration) {
        self.breakers
            .counters()
            .latency
            .observe(latency.as_secs_f64());
        let now = self.now_ms();
        self.breakers.success(peer, now);
    }

    /// The outcome of a keep-alive ping (libp2p's ping, every
    /// `pool.keep_alive_secs` on each connection): the connection to close
    /// when it failed, since a connection that no longer answers would take
    /// every request sent on it down with it.
    pub fn validated(&mut self, event: &ping::Event) -> Option<ConnectionId> {
        let c = self.breakers.counters();
        match event.result {
            Ok(_) => {
                c.validations.inc();
                None
            }
            Err(_) => {
                c.validation_failures.inc();
                c.evictions.inc();
                Some(event.connection)
            }
        }
    }

    /// A first attempt of a send that may be retried went out: the retry
    /// budget earns its share.
    pub fn sent_first(&mut self) {
        let now = self.now_ms();
        self.retries.sent(now);
    }

    /// Whether retry `attempt` (1 for the first) of a send may go, and after
    /// how long (exponential backoff with full jitter from `random`).
    pub fn retry(&mut self, attempt: u32, random: u64) -> Option<Duration> {
        let now = self.now_ms();
        if !self.retries.try_retry(now, attempt) {
            return None;
        }
        self.breakers.counters().retries.inc();
        let wait = self.retries.settings().backoff_ms(attempt, random);
        Some(Duration::from_millis(wait))
    }

    /// A request to `peer` got no answer: timeout, or the connection broke.
    pub fn failure(&mut self, peer: EntityId) {
        self.breakers.counters().send_failures.inc();
        let now = self.now_ms();
        self.breakers.failure(peer, now);
    }

    /// The counters, for `/metrics`.
    pub fn counters(&self) -> &Counters {
        self.breakers.counters()
    }

    /// The pool's part of `/v1/stats`.
    pub fn view(&mut self) -> PoolView {
        let now = self.now_ms();
        PoolView {
            totals: self.breakers.counters().totals(),
            open_breakers: self.breakers.open(now),
            breakers: self.breakers.peers(now),
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if let Some(entity) = peer.as_ref().and_then(entity_of) {
            let now = self.now_ms();
            if let Err(Refused { retry_after_ms }) = self.breakers.allow(entity, now) {
                self.breakers.count_dial(Dial::Refused);
                return Err(ConnectionDenied::new(CircuitOpen {
                    entity_id: entity,
                    retry_after_ms,
                }));
            }
            self.dialing.insert(id, entity);
        }
        self.breakers.count_dial(Dial::Started);
        Ok(Vec::new())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                if let Some(entity) = self.dialing.remove(&e.connection_id) {
                    let now = self.now_ms();
                    self.breakers.success(entity, now);
                } else if e.endpoint.is_listener()
                    && let Some(entity) = entity_of(&e.peer_id)
                {
                    // The peer reached us: whatever failed before, it is back
                    // (a restarted peer that dials this node need not wait
                    // out the open time).
                    self.breakers.reachable(entity);
                }
            }
            FromSwarm::DialFailure(DialFailure {
                connection_id,
                error,
                ..
            }) => {
                let entity = self.dialing.remove(&connection_id);
                // Denied: refused by this node's own limits (or by the
                // breaker itself, never counted as started), not the peer.
                if matches!(error, DialError::Denied { .. }) {
                    return;
                }
                self.breakers.count_dial(Dial::Failed);
                if let Some(entity) = entity {
                    let now = self.now_ms();
                    self.breakers.failure(entity, now);
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
