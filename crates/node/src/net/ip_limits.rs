//! Caps on inbound connections per source address: established ones
//! (`network.max_connections_per_ip`), ones still being set up
//! (`network.max_pending_per_ip`), and new ones a minute
//! (`network.new_connections_per_ip_per_min`, a token bucket), counted per IPv4
//! address and per IPv6 /64 (one host usually holds a whole /64); and a
//! cool-down: an address whose peer misbehaved is refused new connections for a
//! while. Without them, one host with fresh PeerIds could take every connection
//! slot of the node, or make it run handshakes as fast as it can. A connection
//! that the caps refuse is refused while pending, before its handshake costs
//! anything. Connections this node dials are not counted, nor those without an
//! IP address.
//!
//! The behaviour sits after `connection_limits` in [`super::Behaviour`]: a
//! connection that those limits deny never reaches it, so it remembers at most
//! `network.max_pending_incoming` pending and `network.max_connections`
//! established connections.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::core::transport::PortUse;
use libp2p::core::{ConnectedPoint, Endpoint};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, ListenFailure, NetworkBehaviour,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// The caps, per IPv4 address or IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most established inbound connections.
    pub established: u32,
    /// Most inbound connections still being set up.
    pub pending: u32,
    /// New inbound connections a minute, sustained (at least 1).
    pub new_per_minute: u32,
    /// New inbound connections at once after a quiet while (at least 1).
    pub new_burst: u32,
}

/// Addresses tracked at most with no connection open (their new-connection
/// bucket still refilling, or cooling down); beyond it the idle ones are
/// forgotten (a forgotten address starts again with a full bucket).
const MAX_IDLE_GROUPS: usize = 65_536;

/// The addresses counted together: one IPv4 address, or one IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    /// An IPv4 address (also when written as an IPv4-mapped IPv6 address).
    V4(Ipv4Addr),
    /// An IPv6 /64: the address with its low 64 bits cleared.
    V6(Ipv6Addr),
}

impl Group {
    /// The group of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4),
                None => Self::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
            },
        }
    }

    /// The group of a multiaddr that starts with an IP address, such as
    /// `/ip4/…/tcp/…` or `/ip6/…/udp/…/quic-v1`; `None` for any other.
    pub fn of_addr(addr: &Multiaddr) -> Option<Self> {
        match addr.iter().next()? {
            Protocol::Ip4(ip) => Some(Self::of(ip.into())),
            Protocol::Ip6(ip) => Some(Self::of(ip.into())),
            _ => None,
        }
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(ip) => write!(f, "{ip}"),
            Self::V6(prefix) => write!(f, "{prefix}/64"),
        }
    }
}

/// Why a connection was denied: its group is at a cap, or cooling down.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Exceeded {
    /// At a count cap.
    #[error("at most {limit} {stage} inbound connections from {group} are allowed")]
    Count {
        /// The address or /64.
        group: Group,
        /// The cap.
        limit: u32,
        /// `pending` or `established`.
        stage: &'static str,
    },
    /// Its new-connection bucket is empty.
    #[error("at most {per_minute} new inbound connections a minute from {group} are allowed")]
    Rate {
        /// The address or /64.
        group: Group,
        /// The sustained rate.
        per_minute: u32,
    },
    /// A peer from it misbehaved a short while ago.
    #[error("{group} is refused new connections for a while: a peer from it misbehaved")]
    CoolingDown {
        /// The address or /64.
        group: Group,
    },
}

#[derive(Debug)]
struct Counts {
    pending: u32,
    established: u32,
    /// New-connection tokens, as of `refilled`.
    tokens: f64,
    refilled: Instant,
    cooling_until: Option<Instant>,
}

/// Counts inbound connections per [`Group`] and denies those over the caps.
#[derive(Debug)]
pub struct Behaviour {
    limits: Limits,
    pending: HashMap<ConnectionId, Group>,
    established: HashMap<ConnectionId, Group>,
    counts: HashMap<Group, Counts>,
}

impl Behaviour {
    /// A behaviour with no connections yet.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            pending: HashMap::new(),
            established: HashMap::new(),
            counts: HashMap::new(),
        }
    }

    fn counts(&self, group: Group) -> (u32, u32) {
        self.counts
            .get(&group)
            .map_or((0, 0), |c| (c.pending, c.established))
    }

    fn fresh(&self, now: Instant) -> Counts {
        Counts {
            pending: 0,
            established: 0,
            tokens: f64::from(self.limits.new_burst.max(1)),
            refilled: now,
            cooling_until: None,
        }
    }

    /// Refills `c`'s bucket up to `now`.
    fn refill(limits: &Limits, c: &mut Counts, now: Instant) {
        let per_sec = f64::from(limits.new_per_minute.max(1)) / 60.0;
        let elapsed = now.saturating_duration_since(c.refilled).as_secs_f64();
        c.tokens = (c.tokens + elapsed * per_sec).min(f64::from(limits.new_burst.max(1)));
        c.refilled = now;
    }

    /// Whether `group` can be forgotten at `now`: nothing open, its bucket
    /// full again, not cooling down.
    fn idle(limits: &Limits, c: &mut Counts, now: Instant) -> bool {
        Self::refill(limits, c, now);
        c.pending == 0
            && c.established == 0
            && c.tokens >= f64::from(limits.new_burst.max(1))
            && c.cooling_until.is_none_or(|t| t <= now)
    }

    /// Applies `change` to `group`'s counts, forgetting groups with nothing
    /// left to remember.
    fn update(&mut self, group: Group, change: impl FnOnce(&mut Counts)) {
        let now = Instant::now();
        let fresh = self.fresh(now);
        let counts = self.counts.entry(group).or_insert(fresh);
        change(counts);
        if Self::idle(&self.limits, counts, now) {
            self.counts.remove(&group);
        }
    }

    /// Refuses new connections from `group` for `period` (a peer from it
    /// misbehaved).
    pub fn cool_down(&mut self, group: Group, period: Duration) {
        let now = Instant::now();
        let fresh = self.fresh(now);
        self.counts.entry(group).or_insert(fresh).cooling_until = Some(now + period);
        self.bound_idle(now);
    }

    /// Forgets idle groups once there are more than [`MAX_IDLE_GROUPS`].
    fn bound_idle(&mut self, now: Instant) {
        let open = self.pending.len() + self.established.len();
        if self.counts.len() > open + MAX_IDLE_GROUPS {
            let limits = self.limits;
            self.counts
                .retain(|_, c| c.pending > 0 || c.established > 0 || !Self::idle(&limits, c, now));
        }
    }

    /// Admits a new pending connection from `group` at `now`, or says why not.
    fn admit(&mut self, group: Group, now: Instant) -> Result<(), Exceeded> {
        let limits = self.limits;
        let fresh = self.fresh(now);
        let c = self.counts.entry(group).or_insert(fresh);
        Self::refill(&limits, c, now);
        let refused = if c.cooling_until.is_some_and(|t| t > now) {
            Some(Exceeded::CoolingDown { group })
        } else if c.established >= limits.established {
            // Refused now rather than after a handshake it could not use.
            Some(Exceeded::Count {
                group,
                limit: limits.established,
                stage: "established",
            })
        } else if c.pending >= limits.pending {
            Some(Exceeded::Count {
                group,
                limit: limits.pending,
                stage: "pending",
            })
        } else if c.tokens < 1.0 {
            Some(Exceeded::Rate {
                group,
                per_minute: limits.new_per_minute,
            })
        } else {
            None
        };
        if let Some(e) = refused {
            if Self::idle(&limits, c, now) {
                self.counts.remove(&group);
            }
            self.bound_idle(now);
            return Err(e);
        }
        c.tokens -= 1.0;
        c.pending += 1;
        self.bound_idle(now);
        Ok(())
    }

    /// The connection `id` is no longer pending: set up, denied or failed.
    fn end_pending(&mut self, id: ConnectionId) {
        if let Some(group) = self.pending.remove(&id) {
            self.update(group, |c| c.pending = c.pending.saturating_sub(1));
        }
    }
}

fn deny(group: Group, limit: u32, stage: &'static str) -> ConnectionDenied {
    ConnectionDenied::new(Exceeded::Count {
        group,
        limit,
        stage,
    })
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(group) = Group::of_addr(remote) else {
            return Ok(());
        };
        self.admit(group, Instant::now())
            .map_err(ConnectionDenied::new)?;
        self.pending.insert(id, group);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.end_pending(id);
        if let Some(group) = Group::of_addr(remote)
            && self.counts(group).1 >= self.limits.established
        {
            return Err(deny(group, self.limits.established, "established"));
        }
        // Counted on `ConnectionEstablished`: a behaviour after this one may
        // still deny the connection.
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
                if let ConnectedPoint::Listener { send_back_addr, .. } = e.endpoint
                    && let Some(group) = Group::of_addr(send_back_addr)
                {
                    self.established.insert(e.connection_id, group);
                    self.update(group, |c| c.established += 1);
                }
            }
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                if let Some(group) = self.established.remove(&connection_id) {
                    self.update(group, |c| c.established = c.established.saturating_sub(1));
                }
            }
            FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.end_pending(connection_id);
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

#[cfg(test)]
mod tests {
    use libp2p::swarm::ListenError;
    use libp2p::swarm::behaviour::ConnectionEstablished;

    use super::*;

    const LIMITS: Limits = Limits {
        established: 16,
        pending: 8,
        new_per_minute: 6_000,
        new_burst: 1_000,
    };

    fn group(ip: &str) -> Group {
        Group::of(ip.parse().expect("ip"))
    }

    #[test]
    fn ipv6_addresses_group_by_64_and_ipv4_by_address() {
        assert_eq!(
            group("2001:db8:1:2::1"),
            group("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        assert_ne!(group("2001:db8:1:2::1"), group("2001:db8:1:3::1"));
        assert_eq!(
            group("2001:db8:1:2:abcd::9").to_string(),
            "2001:db8:1:2::/64"
        );
        assert_ne!(group("10.0.0.1"), group("10.0.0.2"));
        assert_eq!(group("10.0.0.1").to_string(), "10.0.0.1");
        // An IPv4-mapped address is the IPv4 host, not a /64 of its own.
        assert_eq!(group("::ffff:10.0.0.1"), group("10.0.0.1"));
        let quic: Multiaddr = "/ip6/2001:db8::7/udp/1/quic-v1".parse().expect("addr");
        assert_eq!(Group::of_addr(&quic), Some(group("2001:db8::")));
        let dns: Multiaddr = "/dns4/example.com/tcp/1".parse().expect("addr");
        assert_eq!(Group::of_addr(&dns), None);
    }

    fn reason(e: &ConnectionDenied) -> String {
        e.downcast_ref::<Exceeded>()
            .expect("denied by the IP caps")
            .to_string()
    }

    fn addr(ip: &str) -> Multiaddr {
        format!("/ip4/{ip}/tcp/4000").parse().expect("addr")
    }

    fn local() -> Multiaddr {
        addr("127.0.0.1")
    }

    /// Drives `b` through what the swarm does for an inbound connection from
    /// `ip`: pending, then established. `Err` if `b` denies either step.
    fn connect(b: &mut Behaviour, id: usize, ip: &str) -> Result<(), String> {
        let id = ConnectionId::new_unchecked(id);
        let remote = addr(ip);
        let fail = |b: &mut Behaviour, e: ConnectionDenied| {
            let error = reason(&e);
            b.on_swarm_event(FromSwarm::ListenFailure(ListenFailure {
                local_addr: &local(),
                send_back_addr: &remote,
                error: &ListenError::Denied { cause: e },
                connection_id: id,
                peer_id: None,
            }));
            Err(error)
        };
        if let Err(e) = b.handle_pending_inbound_connection(id, &local(), &remote) {
            return fail(b, e);
        }
        let peer = PeerId::random();
        if let Err(e) = b.handle_established_inbound_connection(id, peer, &local(), &remote) {
            return fail(b, e);
        }
        let endpoint = ConnectedPoint::Listener {
            local_addr: local(),
            send_back_addr: remote.clone(),
        };
        b.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
            peer_id: peer,
            connection_id: id,
            endpoint: &endpoint,
            failed_addresses: &[],
            other_established: 0,
        }));
        Ok(())
    }

    fn close(b: &mut Behaviour, id: usize, endpoint: &ConnectedPoint) {
        b.on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
            peer_id: PeerId::random(),
            connection_id: ConnectionId::new_unchecked(id),
            endpoint,
            cause: None,
            remaining_established: 0,
        }));
    }

    fn listener(ip: &str) -> ConnectedPoint {
        ConnectedPoint::Listener {
            local_addr: local(),
            send_back_addr: addr(ip),
        }
    }

    #[test]
    fn established_connections_are_capped_per_address_until_one_closes() {
        let mut b = Behaviour::new(Limits {
            established: 2,
            pending: 8,
            ..LIMITS
        });
        connect(&mut b, 1, "10.0.0.2").expect("first");
        connect(&mut b, 2, "10.0.0.2").expect("second");
        let err = connect(&mut b, 3, "10.0.0.2").expect_err("third");
        assert_eq!(
            err,
            "at most 2 established inbound connections from 10.0.0.2 are allowed"
        );
        connect(&mut b, 4, "10.0.0.3").expect("another address");
        // Outbound connections are neither checked nor counted.
        let dialer = ConnectedPoint::Dialer {
            address: addr("10.0.0.2"),
            role_override: Endpoint::Dialer,
            port_use: PortUse::Reuse,
        };
        b.handle_established_outbound_connection(
            ConnectionId::new_unchecked(5),
            PeerId::random(),
            &addr("10.0.0.2"),
            Endpoint::Dialer,
            PortUse::Reuse,
        )
        .expect("outbound is not capped");
        close(&mut b, 5, &dialer);
        connect(&mut b, 6, "10.0.0.2").expect_err("still two from 10.0.0.2");
        close(&mut b, 1, &listener("10.0.0.2"));
        connect(&mut b, 7, "10.0.0.2").expect("room after a close");
        for id in [2, 4, 7] {
            close(&mut b, id, &listener("10.0.0.2"));
        }
        assert!(b.established.is_empty() && b.pending.is_empty());
        // What is left is only buckets refilling, forgotten once full again.
        assert!(
            b.counts
                .values()
                .all(|c| c.pending == 0 && c.established == 0)
        );
    }

    #[test]
    fn new_connections_are_rate_limited_per_address_and_refused_while_cooling_down() {
        let mut b = Behaviour::new(Limits {
            new_per_minute: 60,
            new_burst: 2,
            ..LIMITS
        });
        let t0 = Instant::now();
        let (a, other) = (group("10.0.0.2"), group("10.0.0.3"));
        let admit = |b: &mut Behaviour, g: Group, at: Duration| {
            let r = b.admit(g, t0 + at).map_err(|e| e.to_string());
            // Pending counts are not what this test is about.
            if let Some(c) = b.counts.get_mut(&g) {
                c.pending = 0;
            }
            r
        };
        admit(&mut b, a, Duration::ZERO).expect("burst 1");
        admit(&mut b, a, Duration::ZERO).expect("burst 2");
        let err = admit(&mut b, a, Duration::ZERO).expect_err("bucket empty");
        assert_eq!(
            err,
            "at most 60 new inbound connections a minute from 10.0.0.2 are allowed"
        );
        admit(&mut b, other, Duration::ZERO).expect("another address has its own");
        // One a second comes back.
        admit(&mut b, a, Duration::from_millis(1000)).expect("refilled");
        // A cooling-down address is refused whatever its bucket holds; then it
        // is welcome again.
        b.cool_down(other, Duration::from_secs(60));
        let now = Instant::now().saturating_duration_since(t0);
        let err = admit(&mut b, other, now).expect_err("cooling down");
        assert!(err.contains("misbehaved"), "{err}");
        admit(&mut b, other, now + Duration::from_secs(61)).expect("cooled down");
    }

    #[test]
    fn an_address_at_its_established_cap_is_refused_before_its_handshake() {
        let mut b = Behaviour::new(Limits {
            established: 1,
            ..LIMITS
        });
        connect(&mut b, 1, "10.0.0.2").expect("first");
        let remote = addr("10.0.0.2");
        let err = b
            .handle_pending_inbound_connection(ConnectionId::new_unchecked(2), &local(), &remote)
            .map_err(|e| reason(&e))
            .expect_err("refused while pending");
        assert!(err.contains("established"), "{err}");
    }

    #[test]
    fn pending_connections_are_capped_per_64_and_freed_when_they_fail_or_finish() {
        let mut b = Behaviour::new(Limits {
            established: 16,
            pending: 2,
            ..LIMITS
        });
        let pend = |b: &mut Behaviour, id: usize, ip: &str| {
            let remote: Multiaddr = format!("/ip6/{ip}/tcp/1").parse().expect("addr");
            b.handle_pending_inbound_connection(ConnectionId::new_unchecked(id), &local(), &remote)
                .map_err(|e| reason(&e))
        };
        pend(&mut b, 1, "2001:db8::1").expect("first");
        pend(&mut b, 2, "2001:db8::2").expect("second, same /64");
        let err = pend(&mut b, 3, "2001:db8::ffff").expect_err("third");
        assert_eq!(
            err,
            "at most 2 pending inbound connections from 2001:db8::/64 are allowed"
        );
        pend(&mut b, 4, "2001:db8:0:1::1").expect("another /64");
        // A handshake that fails frees its place.
        b.on_swarm_event(FromSwarm::ListenFailure(ListenFailure {
            local_addr: &local(),
            send_back_addr: &addr("10.9.9.9"),
            error: &ListenError::Aborted,
            connection_id: ConnectionId::new_unchecked(1),
            peer_id: None,
        }));
        pend(&mut b, 5, "2001:db8::5").expect("room after a failure");
        // So does one that completes, even if a later check denies it.
        let remote: Multiaddr = "/ip6/2001:db8::2/tcp/1".parse().expect("addr");
        let id = ConnectionId::new_unchecked(2);
        b.handle_established_inbound_connection(id, PeerId::random(), &local(), &remote)
            .expect("set up");
        pend(&mut b, 6, "2001:db8::6").expect("room after a set-up");
        assert_eq!(b.counts(group("2001:db8::")), (2, 0));
    }
}
