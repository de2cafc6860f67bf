//! The health rules, with time passed in: which tracked peers are due a beat,
//! and what an answer, a failed beat or a missed interval does to a peer's
//! health. No I/O: the service sends the beats this asks for and reports
//! their outcomes back.
//!
//! A peer is tracked from its first connection. Every `interval_ms` on its own
//! grid (starting one interval after it was first tracked) it is due a beat:
//! a beat still unanswered then counts as missed, and so does an interval
//! spent disconnected (no beat is sent to a disconnected peer). A beat that
//! fails before that (refused, or the connection broke) counts as missed at
//! once, and only once. An answer resets the missed count.
//!
//! - `unreachable`: `missed_limit` (3) or more beats missed in a row;
//! - `degraded`: at least one missed, or the latest round trip took longer
//!   than `degraded_rtt_ms`;
//! - `healthy`: otherwise (also a newly connected peer, before its first beat).

use std::collections::HashMap;

use peer_core::EntityId;
use serde::Serialize;

use super::HeartbeatConfig;
use crate::json::RawJson;
use crate::service::RequestId;

/// A peer's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Answering, in time.
    Healthy,
    /// Missed at least one beat, or answering slowly.
    Degraded,
    /// Missed `heartbeat.missed_limit` beats in a row.
    Unreachable,
}

impl Health {
    /// Every state, in the order of [`Counts`].
    pub const ALL: [Health; 3] = [Health::Healthy, Health::Degraded, Health::Unreachable];

    /// Its name on the wire and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Unreachable => "unreachable",
        }
    }

    fn index(self) -> usize {
        match self {
            Health::Healthy => 0,
            Health::Degraded => 1,
            Health::Unreachable => 2,
        }
    }
}

/// Tracked peers per state, indexed as [`Health::ALL`].
pub type Counts = [usize; 3];

/// The last status a peer reported (`status_report`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusView {
    /// When it arrived, ms since the Unix epoch.
    pub received_ms: u64,
    /// Its payload, as sent.
    pub payload: RawJson,
}

/// What `GET /v1/peers` shows of a tracked peer (its `health` object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthView {
    /// Its state.
    pub state: Health,
    /// The round trip of its latest answered beat, in ms.
    pub rtt_ms: Option<u64>,
    /// Beats sent to it.
    pub sent: u64,
    /// Beats it answered in time.
    pub received: u64,
    /// Beats that failed: refused, lost with the connection, or not answered
    /// within one interval.
    pub failed: u64,
    /// Beats missed in a row: failed ones and intervals spent disconnected.
    pub missed: u32,
    /// When it last answered a beat, ms since the Unix epoch.
    pub last_seen_ms: Option<u64>,
    /// The last status it reported, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_report: Option<StatusView>,
}

/// One tracked peer.
#[derive(Debug)]
struct Tracked {
    state: Health,
    /// Monotonic ms when it entered `state`.
    since_ms: u64,
    connected: bool,
    missed: u32,
    sent: u64,
    received: u64,
    failed: u64,
    rtt_ms: Option<u64>,
    last_seen_ms: Option<u64>,
    /// Monotonic ms of its next beat.
    next_beat_ms: u64,
    /// The beat waiting for its answer, and when it was sent.
    in_flight: Option<(RequestId, u64)>,
    status: Option<StatusView>,
}

/// A peer whose health changed.
pub type Change = (EntityId, Health);

/// What [`Monitor::tick`] found due.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// The connected peers to send a beat to now, each with the beat's number
    /// (1 for its first); the caller reports each with [`Monitor::sent`].
    pub due: Vec<(EntityId, u64)>,
    /// Beats counted as failed: still unanswered after an interval.
    pub failed: u64,
    /// Peers whose health changed.
    pub changes: Vec<Change>,
}

/// The tracked peers and their health.
#[derive(Debug)]
pub struct Monitor {
    interval_ms: u64,
    missed_limit: u32,
    degraded_rtt_ms: u64,
    max_peers: usize,
    peers: HashMap<EntityId, Tracked>,
    counts: Counts,
    /// The earliest `next_beat_ms`; lowered when a peer is added, recomputed
    /// at each tick.
    next_beat_ms: Option<u64>,
}

impl Monitor {
    /// No peers, with the rules of `config`.
    pub fn new(config: &HeartbeatConfig) -> Self {
        Self {
            interval_ms: config.interval_ms.max(1),
            missed_limit: config.missed_limit.max(1),
            degraded_rtt_ms: config.degraded_rtt_ms,
            max_peers: config.max_peers.max(1),
            peers: HashMap::new(),
            counts: [0; 3],
            next_beat_ms: None,
        }
    }

    /// When the next peer is due a beat (monotonic ms).
    pub fn next_beat_ms(&self) -> Option<u64> {
        self.next_beat_ms
    }

    /// Tracked peers per state.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// The state `missed` beats in a row and a latest round trip of `rtt_ms`
    /// make.
    fn rule(&self, missed: u32, rtt_ms: Option<u64>) -> Health {
        if missed >= self.missed_limit {
            Health::Unreachable
        } else if missed > 0 || rtt_ms.is_some_and(|r| r > self.degraded_rtt_ms) {
            Health::Degraded
        } else {
            Health::Healthy
        }
    }

    /// Tracks `peer` if it is not: healthy, first due a beat one interval
    /// from `now_ms`. At `max_peers`, the peer unreachable the longest is
    /// forgotten first (then the degraded, then the healthy; disconnected
    /// before connected; each the longest in its state first).
    fn track(&mut self, peer: EntityId, now_ms: u64) -> &mut Tracked {
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.max_peers {
            let oldest = self
                .peers
                .iter()
                .min_by_key(|(id, t)| {
                    let rank = match t.state {
                        Health::Unreachable => 0,
                        Health::Degraded => 1,
                        Health::Healthy => 2,
                    };
                    (rank, t.connected, t.since_ms, **id)
                })
                .map(|(id, _)| *id);
            if let Some(gone) = oldest.and_then(|id| self.peers.remove(&id)) {
                self.counts[gone.state.index()] -= 1;
            }
        }
        let next_beat_ms = now_ms.saturating_add(self.interval_ms);
        if !self.peers.contains_key(&peer) {
            self.counts[Health::Healthy.index()] += 1;
            self.next_beat_ms = Some(
                self.next_beat_ms
                    .map_or(next_beat_ms, |n| n.min(next_beat_ms)),
            );
        }
        self.peers.entry(peer).or_insert(Tracked {
            state: Health::Healthy,
            since_ms: now_ms,
            connected: false,
            missed: 0,
            sent: 0,
            received: 0,
            failed: 0,
            rtt_ms: None,
            last_seen_ms: None,
            next_beat_ms,
            in_flight: None,
            status: None,
        })
    }

    /// Sets `peer`'s state from its figures; the change, if any.
    fn settle(&mut self, peer: EntityId, now_ms: u64) -> Option<Change> {
        let t = self.peers.get(&peer)?;
        let state = self.rule(t.missed, t.rtt_ms);
        let t = self.peers.get_mut(&peer)?;
        if t.state == state {
            return None;
        }
        self.counts[t.state.index()] -= 1;
        self.counts[state.index()] += 1;
        t.state = state;
        t.since_ms = now_ms;
        Some((peer, state))
    }

    /// `peer` connected (again).
    pub fn connected(&mut self, peer: EntityId, now_ms: u64) {
        self.track(peer, now_ms).connected = true;
    }

    /// `peer`'s last connection closed; it stays tracked, and each interval
    /// until it is back counts as missed.
    pub fn disconnected(&mut self, peer: EntityId) {
        if let Some(t) = self.peers.get_mut(&peer) {
            t.connected = false;
        }
    }

    /// The beats due by `now_ms`, and what the intervals that ended did: a
    /// beat unanswered, or a peer still disconnected, is a missed beat.
    pub fn tick(&mut self, now_ms: u64) -> Tick {
        let mut tick = Tick::default();
        let mut missed = Vec::new();
        for (id, t) in &mut self.peers {
            if t.next_beat_ms > now_ms {
                continue;
            }
            t.next_beat_ms = t.next_beat_ms.saturating_add(self.interval_ms);
            if t.next_beat_ms <= now_ms {
                // The node was stalled for more than an interval: one beat, not a burst.
                t.next_beat_ms = now_ms.saturating_add(self.interval_ms);
            }
            if t.in_flight.take().is_some() {
                t.failed += 1;
                tick.failed += 1;
                t.missed = t.missed.saturating_add(1);
                missed.push(*id);
            } else if !t.connected {
                t.missed = t.missed.saturating_add(1);
                missed.push(*id);
            }
            if t.connected {
                tick.due.push((*id, t.sent + 1));
            }
        }
        self.next_beat_ms = self.peers.values().map(|t| t.next_beat_ms).min();
        tick.changes = missed
            .into_iter()
            .filter_map(|id| self.settle(id, now_ms))
            .collect();
        tick
    }

    /// A beat `id` went to `peer` at `now_ms`.
    pub fn sent(&mut self, peer: EntityId, id: RequestId, now_ms: u64) {
        if let Some(t) = self.peers.get_mut(&peer) {
            t.sent += 1;
            t.in_flight = Some((id, now_ms));
        }
    }

    /// `peer` answered beat `id` at `now_ms` (monotonic; `wall_ms` for
    /// people). `None` if the beat was not waiting for its answer (it was
    /// already counted as missed, or the peer forgotten); else its round trip
    /// in ms and the change, if any.
    pub fn answered(
        &mut self,
        peer: EntityId,
        id: RequestId,
        now_ms: u64,
        wall_ms: u64,
    ) -> Option<(u64, Option<Change>)> {
        let t = self.peers.get_mut(&peer)?;
        let (_, sent_ms) = t.in_flight.take_if(|(waiting, _)| *waiting == id)?;
        let rtt_ms = now_ms.saturating_sub(sent_ms);
        t.received += 1;
        t.missed = 0;
        t.rtt_ms = Some(rtt_ms);
        t.last_seen_ms = Some(wall_ms);
        Some((rtt_ms, self.settle(peer, now_ms)))
    }

    /// Beat `id` to `peer` failed (refused, or the request broke): missed now.
    /// `None` if it was not waiting (as for [`Monitor::answered`]); else the
    /// change, if any.
    pub fn failed(&mut self, peer: EntityId, id: RequestId, now_ms: u64) -> Option<Option<Change>> {
        let t = self.peers.get_mut(&peer)?;
        t.in_flight.take_if(|(waiting, _)| *waiting == id)?;
        t.failed += 1;
        t.missed = t.missed.saturating_add(1);
        Some(self.settle(peer, now_ms))
    }

    /// Records the latest `status_report` of `peer`, connected since it sent
    /// one (tracking it if needed).
    pub fn report(&mut self, peer: EntityId, now_ms: u64, status: StatusView) {
        let t = self.track(peer, now_ms);
        t.connected = true;
        t.status = Some(status);
    }

    /// What the API shows of `peer`, if it is tracked.
    pub fn view(&self, peer: &EntityId) -> Option<HealthView> {
        let t = self.peers.get(peer)?;
        Some(HealthView {
            state: t.state,
            rtt_ms: t.rtt_ms,
            sent: t.sent,
            received: t.received,
            failed: t.failed,
            missed: t.missed,
            last_seen_ms: t.last_seen_ms,
            status_report: t.status.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: u64 = 1_000;

    fn config() -> HeartbeatConfig {
        HeartbeatConfig {
            interval_ms: INTERVAL,
            missed_limit: 3,
            degraded_rtt_ms: 200,
            max_peers: 10,
            ..HeartbeatConfig::default()
        }
    }

    fn peer(b: u8) -> EntityId {
        EntityId([b; 32])
    }

    /// Ticks at `now`, sends the due beats with ids from `next`, and returns
    /// the beats sent and the changes.
    fn tick(
        m: &mut Monitor,
        now: u64,
        next: &mut u64,
    ) -> (Vec<(EntityId, RequestId)>, Vec<Change>) {
        let Tick { due, changes, .. } = m.tick(now);
        let sent = due
            .into_iter()
            .map(|(p, _)| {
                *next += 1;
                let id = RequestId(*next);
                m.sent(p, id, now);
                (p, id)
            })
            .collect();
        (sent, changes)
    }

    fn state(m: &Monitor, p: EntityId) -> Health {
        m.view(&p).expect("tracked").state
    }

    #[test]
    fn an_answered_beat_keeps_a_peer_healthy_and_measures_the_round_trip() {
        let mut m = Monitor::new(&config());
        let mut ids = 0;
        let a = peer(1);
        m.connected(a, 0);
        assert_eq!(state(&m, a), Health::Healthy, "healthy from the start");
        assert_eq!(
            m.next_beat_ms(),
            Some(INTERVAL),
            "first beat one interval on"
        );
        assert_eq!(
            tick(&mut m, INTERVAL - 1, &mut ids).0,
            vec![],
            "not due yet"
        );
        let (sent, changes) = tick(&mut m, INTERVAL, &mut ids);
        assert_eq!(sent.len(), 1);
        assert!(changes.is_empty());
        assert_eq!(
            m.answered(a, sent[0].1, INTERVAL + 40, 5_000),
            Some((40, None))
        );
        let v = m.view(&a).expect("tracked");
        assert_eq!(
            (
                v.state,
                v.rtt_ms,
                v.sent,
                v.received,
                v.failed,
                v.last_seen_ms
            ),
            (Health::Healthy, Some(40), 1, 1, 0, Some(5_000))
        );
        assert_eq!(m.next_beat_ms(), Some(2 * INTERVAL));
        assert_eq!(m.counts(), [1, 0, 0]);
    }

    #[test]
    fn one_missed_beat_degrades_three_make_unreachable_an_answer_heals() {
        let mut m = Monitor::new(&config());
        let mut ids = 0;
        let a = peer(1);
        m.connected(a, 0);
        let (sent, _) = tick(&mut m, INTERVAL, &mut ids);
        // Unanswered by the next beat: missed, and failed.
        let t = m.tick(2 * INTERVAL);
        assert_eq!(
            (t.due, t.failed),
            (vec![(a, 2)], 1),
            "the second beat is due"
        );
        assert_eq!(t.changes, vec![(a, Health::Degraded)]);
        ids += 1;
        m.sent(a, RequestId(ids), 2 * INTERVAL);
        let (_, changes) = tick(&mut m, 3 * INTERVAL, &mut ids);
        assert!(changes.is_empty(), "still degraded after 2");
        let (sent4, changes) = tick(&mut m, 4 * INTERVAL, &mut ids);
        assert_eq!(changes, vec![(a, Health::Unreachable)]);
        assert_eq!(m.counts(), [0, 0, 1]);
        // A late answer to a beat already counted as missed changes nothing.
        assert_eq!(m.answered(a, sent[0].1, 4 * INTERVAL + 5, 1), None);
        assert_eq!(state(&m, a), Health::Unreachable);
        // The beat in flight is answered: healthy at once.
        assert_eq!(
            m.answered(a, sent4[0].1, 4 * INTERVAL + 10, 2),
            Some((10, Some((a, Health::Healthy))))
        );
        let v = m.view(&a).expect("tracked");
        assert_eq!((v.sent, v.received, v.failed, v.missed), (4, 1, 3, 0));
    }

    #[test]
    fn a_slow_answer_degrades_and_a_failed_beat_counts_once() {
        let mut m = Monitor::new(&config());
        let mut ids = 0;
        let a = peer(1);
        m.connected(a, 0);
        let (sent, _) = tick(&mut m, INTERVAL, &mut ids);
        assert_eq!(
            m.answered(a, sent[0].1, INTERVAL + 201, 1),
            Some((201, Some((a, Health::Degraded)))),
            "over degraded_rtt_ms"
        );
        let (sent, _) = tick(&mut m, 2 * INTERVAL, &mut ids);
        assert_eq!(
            m.answered(a, sent[0].1, 2 * INTERVAL + 200, 1),
            Some((200, Some((a, Health::Healthy)))),
            "at the bound is fine"
        );
        let (sent, _) = tick(&mut m, 3 * INTERVAL, &mut ids);
        // Refused at once: missed now, not again at the next beat.
        assert_eq!(
            m.failed(a, sent[0].1, 3 * INTERVAL + 1),
            Some(Some((a, Health::Degraded)))
        );
        assert_eq!(m.failed(a, sent[0].1, 3 * INTERVAL + 2), None, "once");
        let (sent, changes) = tick(&mut m, 4 * INTERVAL, &mut ids);
        assert!(changes.is_empty());
        let v = m.view(&a).expect("tracked");
        assert_eq!((v.failed, v.missed), (1, 1));
        assert_eq!(
            m.answered(a, sent[0].1, 4 * INTERVAL + 3, 1),
            Some((3, Some((a, Health::Healthy))))
        );
    }

    #[test]
    fn a_disconnected_peer_is_not_beaten_turns_unreachable_and_heals_when_back() {
        let mut m = Monitor::new(&config());
        let mut ids = 0;
        let a = peer(1);
        m.connected(a, 0);
        let (sent, _) = tick(&mut m, INTERVAL, &mut ids);
        m.answered(a, sent[0].1, INTERVAL + 1, 1);
        m.disconnected(a);
        let mut seen = Vec::new();
        for n in 2..=4 {
            let (sent, changes) = tick(&mut m, n * INTERVAL, &mut ids);
            assert!(sent.is_empty(), "no beat while disconnected");
            seen.extend(changes);
        }
        assert_eq!(seen, vec![(a, Health::Degraded), (a, Health::Unreachable)]);
        let v = m.view(&a).expect("still tracked");
        assert_eq!(
            (v.sent, v.failed, v.missed),
            (1, 0, 3),
            "missed, not failed"
        );
        // More intervals away: still unreachable, no new change.
        assert!(tick(&mut m, 5 * INTERVAL, &mut ids).1.is_empty());
        m.connected(a, 5 * INTERVAL + 500);
        assert_eq!(state(&m, a), Health::Unreachable, "back, not answered yet");
        let (sent, _) = tick(&mut m, 6 * INTERVAL, &mut ids);
        assert_eq!(sent.len(), 1, "beaten again once connected");
        assert_eq!(
            m.answered(a, sent[0].1, 6 * INTERVAL + 7, 9),
            Some((7, Some((a, Health::Healthy))))
        );
    }

    #[test]
    fn a_stalled_node_sends_one_beat_not_a_burst() {
        let mut m = Monitor::new(&config());
        let mut ids = 0;
        m.connected(peer(1), 0);
        let (sent, _) = tick(&mut m, 10 * INTERVAL + 3, &mut ids);
        assert_eq!(sent.len(), 1);
        assert_eq!(m.next_beat_ms(), Some(11 * INTERVAL + 3));
        assert!(tick(&mut m, 11 * INTERVAL, &mut ids).0.is_empty());
    }

    #[test]
    fn at_the_bound_the_peer_unreachable_longest_is_forgotten_first() {
        let mut m = Monitor::new(&HeartbeatConfig {
            max_peers: 3,
            ..config()
        });
        let mut ids = 0;
        let (a, b, c, d, e) = (peer(1), peer(2), peer(3), peer(4), peer(5));
        // a and b connect and leave at once; b leaves one interval later.
        m.connected(a, 0);
        m.connected(b, 0);
        m.connected(c, 0);
        m.disconnected(a);
        for n in 1..=4 {
            if n == 2 {
                m.disconnected(b);
            }
            let (sent, _) = tick(&mut m, n * INTERVAL, &mut ids);
            for (p, id) in sent {
                m.answered(p, id, n * INTERVAL + 1, 1);
            }
        }
        assert_eq!(state(&m, a), Health::Unreachable);
        assert_eq!(state(&m, b), Health::Unreachable);
        assert_eq!(state(&m, c), Health::Healthy);
        assert_eq!((m.peers.len(), m.counts()), (3, [1, 0, 2]));
        // A fourth peer: a, unreachable since interval 3, goes before b (4).
        m.connected(d, 5 * INTERVAL);
        assert!(m.view(&a).is_none(), "the longest unreachable is forgotten");
        assert!(m.view(&b).is_some() && m.view(&c).is_some() && m.view(&d).is_some());
        assert_eq!((m.peers.len(), m.counts()), (3, [2, 0, 1]));
        // A fifth: b, the last unreachable one.
        m.connected(e, 5 * INTERVAL);
        assert!(m.view(&b).is_none());
        assert_eq!((m.peers.len(), m.counts()), (3, [3, 0, 0]));
        // A peer already tracked coming back forgets no one.
        m.disconnected(c);
        m.connected(c, 5 * INTERVAL);
        assert_eq!(m.peers.len(), 3);
    }

    #[test]
    fn a_status_report_is_kept_with_the_peer() {
        let mut m = Monitor::new(&config());
        let status = StatusView {
            received_ms: 7,
            payload: RawJson::parse(br#"{"load":0.5}"#.to_vec(), 8).expect("json"),
        };
        m.report(peer(1), 0, status.clone());
        let v = m.view(&peer(1)).expect("tracked");
        assert_eq!(v.status_report, Some(status));
        assert_eq!(
            serde_json::to_value(&v).expect("json"),
            serde_json::json!({"state": "healthy", "rtt_ms": null, "sent": 0,
                "received": 0, "failed": 0, "missed": 0, "last_seen_ms": null,
                "status_report": {"received_ms": 7, "payload": {"load": 0.5}}})
        );
    }
}
