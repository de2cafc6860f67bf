//! The malicious node: Mallory, a raw libp2p swarm with the node's own
//! behaviours (Kademlia in server mode, gossipsub) but none of its checks,
//! attacks real nodes on 127.0.0.1 with forged, stale, expired, future-dated
//! and oversize peer records: asking a node to hold them (PUT_VALUE),
//! answering its lookups with them (GET_VALUE from her own store), and
//! announcing them over gossipsub. Each is refused where it arrives
//! and counted (`DiscoveryStats::refused`), and is never stored, returned,
//! believed or forwarded.

mod common;

use std::time::Duration;

use common::{TestNode, start_node_with, wait_connected};
use futures::StreamExt;
use libp2p::kad::store::RecordStore;
use libp2p::swarm::SwarmEvent;
use libp2p::{PeerId, Swarm, kad};
use peer_core::registry::{self, Content, Signed};
use peer_core::{EntityId, Identity};
use peer_node::net::{self, Behaviour};
use peer_node::node::now_ms;
use peer_node::services::discovery::table::Source;
use peer_node::{Config, NodeError};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

const TCP: &str = "/ip4/127.0.0.1/tcp/0";

/// Where the honest records say their entity listens: nothing answers there,
/// so a dial fails at once.
const NOWHERE: &str = "/ip4/127.0.0.1/tcp/1";

/// Where Mallory's forgeries send their entity's traffic.
const MALLORY_ADDR: &str = "/ip4/127.0.0.1/tcp/2";

/// Short periods, as in `discovery.rs`.
fn fast(c: &mut Config) {
    c.discovery.query_secs = 2;
    c.discovery.random_walk_secs = 2;
    c.discovery.query_timeout_secs = 5;
}

/// Waits until `check` holds, up to `secs`.
async fn until<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {secs} s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many records `node` refused as `what` (`store:expired`, ...).
async fn refused(node: &TestNode, what: &str) -> u64 {
    let stats = node.handle.discovery_stats().await.expect("stats");
    stats.refused.get(what).copied().unwrap_or(0)
}

/// Whether `node`'s peer list (connections and the discovery table) has
/// `entity` at all.
async fn knows(node: &TestNode, entity: EntityId) -> bool {
    let peers = node.handle.peers().await.expect("peers");
    peers.iter().any(|p| p.entity_id == entity)
}

/// `who`'s record with sequence number `seq`, signed by `who` as its node
/// would sign it (one address where nothing answers, capability `code`,
/// valid for an hour from now), after `tune` changed the content.
fn record(who: &Identity, seq: u64, tune: impl FnOnce(&mut Content)) -> Signed {
    let mut content = Content {
        addresses: vec![NOWHERE.into()],
        capabilities: vec!["code".into()],
        issued_at: now_ms(),
        ttl: 3_600,
        seq,
    };
    tune(&mut content);
    registry::sign(who, content)
}

/// `value` with its `record` object changed by `edit` (and written out
/// again), the signature left as it was.
fn tampered(value: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(value).expect("a record is JSON");
    edit(&mut v["record"]);
    serde_json::to_vec(&v).expect("JSON")
}

/// `value` as a node shows a record it found (`PeerInfo::record`).
fn as_json(value: &[u8]) -> Option<serde_json::Value> {
    Some(serde_json::from_slice(value).expect("a record is JSON"))
}

/// The bad records Mallory can make for Alice's entity, by herself or from
/// records of Alice's, each with the reason a node gives for refusing it
/// (`wrong_key` only applies to a record stored under a DHT key). The test
/// holds Alice's key: her untampered records are bad by their time or size
/// alone.
fn forgeries(alice: &Identity, mallory: &Identity, seq: u64) -> Vec<(&'static str, Vec<u8>)> {
    let alice_id = alice.entity_id().to_string();
    let hour_ms = 3_600_000;
    let oversize = record(alice, seq, |c| {
        c.capabilities = (0..24)
            .map(|i| format!("{i:02}-{}", "x".repeat(240)))
            .collect();
    });
    let limits = Config::default().discovery.record_limits();
    assert!(oversize.value.len() > limits.max_bytes);
    let roomy = registry::Limits {
        max_bytes: oversize.value.len(),
        ..limits
    };
    assert!(
        registry::verify_value(&oversize.value, now_ms(), roomy).is_ok(),
        "the oversize record is bad by its size alone"
    );
    vec![
        // Signed by Mallory's key, naming Alice's entity.
        (
            "key_mismatch",
            tampered(&record(mallory, seq, |_| {}).value, |r| {
                r["entity_id"] = alice_id.into();
            }),
        ),
        // Alice's record pointing at Mallory, Alice's signature kept.
        (
            "bad_signature",
            tampered(&record(alice, seq, |_| {}).value, |r| {
                r["addresses"] = json!([MALLORY_ADDR]);
            }),
        ),
        // Mallory's own record, valid, under Alice's key.
        ("wrong_key", record(mallory, seq, |_| {}).value),
        // Alice's, run out an hour ago.
        (
            "expired",
            record(alice, seq, |c| c.issued_at -= 2 * hour_ms).value,
        ),
        // Alice's, dated an hour ahead (it would outlive its ttl).
        (
            "future",
            record(alice, seq, |c| c.issued_at += hour_ms).value,
        ),
        // Alice's, larger than `discovery.max_record_bytes`.
        ("too_large", oversize.value),
    ]
}

/// Something to do with Mallory's swarm, on her task.
type Job = Box<dyn FnOnce(&mut Swarm<Behaviour>) + Send>;

/// The malicious node: the node's behaviours on a swarm driven by a task of
/// its own, which does what the test asks and nothing else (it checks no
/// record, answers no envelope). Her Kademlia serves whatever her store
/// holds.
struct Mallory {
    identity: Identity,
    /// The node she attacks.
    victim: PeerId,
    jobs: mpsc::UnboundedSender<Job>,
}

impl Mallory {
    /// Mallory, connected to `victim` and to nobody else. `listen`: she
    /// listens on 127.0.0.1 too, and so tells the victim (identify) an
    /// address its routing table takes her at; without it the victim has no
    /// address of hers to give anyone.
    async fn connect(victim: &TestNode, listen: bool) -> Self {
        let identity = Identity::from_secret(&rand::random());
        let mut config = Config::default();
        config.discovery.mdns = false;
        // Her store and messages take records larger than a node accepts.
        config.discovery.max_record_bytes = 64 * 1024;
        // One connection, to the victim: her own Kademlia would otherwise
        // dial the peers the victim names in its answers.
        config.network.max_connections = 1;
        let (mut swarm, _) =
            net::build_swarm(net::keypair(identity.secret_bytes()), &config).expect("swarm");
        if listen {
            swarm.listen_on(TCP.parse().expect("addr")).expect("listen");
            while !matches!(
                swarm.select_next_some().await,
                SwarmEvent::NewListenAddr { .. }
            ) {}
        }
        swarm.dial(victim.addr.clone()).expect("dial");
        let victim_peer = loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => break peer_id,
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    panic!("Mallory could not connect: {error}")
                }
                _ => {}
            }
        };
        let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    job = queue.recv() => match job {
                        Some(job) => job(&mut swarm),
                        None => return,
                    },
                    _ = swarm.select_next_some() => {}
                }
            }
        });
        wait_connected(&victim.handle, identity.entity_id()).await;
        Self {
            identity,
            victim: victim_peer,
            jobs,
        }
    }

    /// Runs `f` on her swarm, on her task.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Swarm<Behaviour>) -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |swarm| _ = tx.send(f(swarm)));
        assert!(self.jobs.send(job).is_ok(), "Mallory's task runs");
        rx.await.expect("Mallory's task answers")
    }

    /// Asks the victim to hold `value` under `key` (a PUT_VALUE to it alone).
    async fn put_to_victim(&self, key: Vec<u8>, value: Vec<u8>) {
        let victim = self.victim;
        self.with(move |s| {
            kademlia(s).put_record_to(
                kad::Record::new(key, value),
                std::iter::once(victim),
                kad::Quorum::One,
            );
        })
        .await;
    }

    /// Puts `value` under `key` in her own store (replacing what was there):
    /// her answer to a lookup of `key`.
    async fn hold(&self, key: Vec<u8>, value: Vec<u8>) {
        self.with(move |s| {
            kademlia(s)
                .store_mut()
                .put(kad::Record::new(key, value))
                .expect("Mallory's store takes it");
        })
        .await;
    }

    /// Publishes `data` on the announce topic.
    async fn publish(&self, data: Vec<u8>) {
        self.with(move |s| {
            gossip(s)
                .publish(net::dht::announce_topic(), data)
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .await
        .expect("published");
    }

    /// Whether she knows the victim subscribes to the announce topic (so a
    /// publication reaches it).
    async fn victim_subscribed(&self) -> bool {
        let victim = self.victim;
        self.with(move |s| {
            let topic = net::dht::announce_topic().hash();
            gossip(s)
                .all_peers()
                .any(|(p, topics)| *p == victim && topics.contains(&&topic))
        })
        .await
    }

    /// Announces genuine records of fresh entities until `observer` has
    /// learnt one (a publication made before the victim's mesh takes the
    /// observer in is not forwarded to it); returns that entity.
    async fn announce_until_learnt(&self, observer: &TestNode) -> EntityId {
        for _ in 0..10 {
            let fresh = Identity::from_secret(&rand::random());
            self.publish(record(&fresh, 1, |_| {}).value).await;
            let learnt = async {
                while !observer
                    .handle
                    .peers()
                    .await
                    .expect("peers")
                    .iter()
                    .any(|p| p.entity_id == fresh.entity_id() && p.verified)
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            if tokio::time::timeout(Duration::from_secs(2), learnt)
                .await
                .is_ok()
            {
                return fresh.entity_id();
            }
        }
        panic!("no announce of Mallory's reached the observer through the victim");
    }
}

/// Mallory's Kademlia.
fn kademlia(s: &mut Swarm<Behaviour>) -> &mut kad::Behaviour<kad::store::MemoryStore> {
    s.behaviour_mut().kad.as_mut().expect("Kademlia is on")
}

/// Mallory's gossipsub.
fn gossip(s: &mut Swarm<Behaviour>) -> &mut libp2p::gossipsub::Behaviour {
    s.behaviour_mut()
        .gossipsub
        .as_mut()
        .expect("gossipsub is on")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_sent_to_a_node_to_hold_are_refused_and_the_genuine_one_kept() {
    let victim = start_node_with(TCP, fast).await;
    let mallory = Mallory::connect(&victim, false).await;
    let alice = Identity::from_secret(&rand::random());
    let key = registry::peer_key(&alice.entity_id());

    // Alice's genuine record, handed over by Mallory: held.
    let genuine = record(&alice, 2, |_| {});
    mallory
        .put_to_victim(key.clone(), genuine.value.clone())
        .await;
    until(10, "the victim holds Alice's genuine record", || async {
        let s = victim.handle.discovery_stats().await.expect("stats");
        s.stored == 1
    })
    .await;

    // Then each bad one, in turn: the forgeries carry a higher sequence
    // number than the held record (they would replace it if believed).
    let mut attacks = forgeries(&alice, &mallory.identity, 3);
    // An older record of Alice's, and another one with the held number.
    attacks.push(("stale", record(&alice, 1, |_| {}).value));
    attacks.push((
        "stale",
        record(&alice, 2, |c| c.addresses = vec![MALLORY_ADDR.into()]).value,
    ));
    for (reason, value) in attacks {
        let what = format!("store:{reason}");
        let before = refused(&victim, &what).await;
        mallory.put_to_victim(key.clone(), value).await;
        until(10, &what, || async {
            refused(&victim, &what).await > before
        })
        .await;
    }

    // Nor can the older record be planted under a key of Alice's the
    // victim does not hold yet (her capability-index key).
    let what = "store:stale";
    let before = refused(&victim, what).await;
    let cap_key = registry::capability_key(&alice.entity_id(), "code");
    mallory
        .put_to_victim(cap_key, record(&alice, 1, |_| {}).value)
        .await;
    until(10, what, || async { refused(&victim, what).await > before }).await;

    let s = victim.handle.discovery_stats().await.expect("stats");
    assert_eq!((s.stored, s.held_records), (1, 1), "{s:?}");
    // Asked for Alice, the victim answers with her genuine record.
    let found = victim.handle.find(alice.entity_id()).await.expect("found");
    assert_eq!(found.record, as_json(&genuine.value));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_found_by_a_lookup_are_refused_and_never_returned() {
    let victim = start_node_with(TCP, fast).await;
    // She listens, so the victim's routing table takes her and its lookups
    // ask her.
    let mallory = Mallory::connect(&victim, true).await;
    let alice = Identity::from_secret(&rand::random());
    let key = registry::peer_key(&alice.entity_id());

    // Mallory answers a lookup of Alice with each bad record in turn; the
    // victim finds nothing (until its routing table has her, nothing is
    // refused either).
    for (reason, value) in forgeries(&alice, &mallory.identity, 1) {
        mallory.hold(key.clone(), value).await;
        let what = format!("lookup:{reason}");
        until(10, &what, || async {
            let e = victim
                .handle
                .find(alice.entity_id())
                .await
                .expect_err("a bad record is never returned");
            assert!(matches!(e, NodeError::NotFound(_)), "{e}");
            refused(&victim, &what).await >= 1
        })
        .await;
    }
    assert!(!knows(&victim, alice.entity_id()).await);

    // Stale: the victim finds Alice's genuine record (she is away)...
    let genuine = record(&alice, 2, |_| {});
    mallory.hold(key.clone(), genuine.value.clone()).await;
    let found = victim.handle.find(alice.entity_id()).await.expect("found");
    assert_eq!(found.record, as_json(&genuine.value));
    // ...then Mallory serves an older one, pointing at her. A message to
    // Alice fails to reach her address and has her looked up again: the
    // older record is refused, and the message fails.
    let older = record(&alice, 1, |c| c.addresses = vec![MALLORY_ADDR.into()]);
    mallory.hold(key, older.value).await;
    until(20, "lookup:stale", || async {
        let sent = victim
            .handle
            .send(
                alice.entity_id(),
                "message".parse().expect("type"),
                b"{}".to_vec(),
            )
            .await;
        assert!(sent.is_err(), "Alice is nowhere: {sent:?}");
        refused(&victim, "lookup:stale").await >= 1
    })
    .await;
    let found = victim.handle.find(alice.entity_id()).await.expect("found");
    assert_eq!(found.record, as_json(&genuine.value));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announces_with_a_bad_signature_or_a_bad_record_are_dropped_and_not_forwarded() {
    // The observer is connected to the victim only; Mallory to the victim
    // only, with no address anyone could dial her at.
    let victim = start_node_with(TCP, fast).await;
    let observer = start_node_with(TCP, fast).await;
    observer
        .handle
        .connect(victim.addr.clone())
        .await
        .expect("the observer connects");
    let mallory = Mallory::connect(&victim, false).await;
    until(10, "Mallory sees the victim subscribed", || async {
        mallory.victim_subscribed().await
    })
    .await;

    // The forwarding path works: a genuine announce of Mallory's reaches
    // the observer, through the victim.
    let relayed = mallory.announce_until_learnt(&observer).await;
    let seen = observer.handle.find(relayed).await.expect("learnt");
    assert_eq!(seen.sources, vec![Source::Announce]);

    // Every bad record of Dave's that can be announced (an announce has no
    // DHT key to be wrong), among them his genuine record re-addressed to
    // Mallory with his signature kept: each refused by the victim.
    let dave = Identity::from_secret(&rand::random());
    for (reason, value) in forgeries(&dave, &mallory.identity, 1) {
        if reason == "wrong_key" {
            continue;
        }
        mallory.publish(value).await;
        let what = format!("announce:{reason}");
        until(10, &what, || async { refused(&victim, &what).await == 1 }).await;
    }

    // A genuine announce published after them reaches the observer: had a
    // bad one been forwarded, it would have come first.
    mallory.announce_until_learnt(&observer).await;
    let o = observer.handle.discovery_stats().await.expect("stats");
    assert!(
        !o.refused.keys().any(|k| k.starts_with("announce:")),
        "the observer never saw a bad announce: {o:?}"
    );
    assert!(!knows(&victim, dave.entity_id()).await);
    assert!(!knows(&observer, dave.entity_id()).await);
    // It could only have come through the victim.
    let mallory_id = mallory.identity.entity_id();
    let peers = observer.handle.peers().await.expect("peers");
    assert!(
        !peers
            .iter()
            .any(|p| p.entity_id == mallory_id && p.connected),
        "the observer never connected to Mallory"
    );
}
