//! Discovery and the DHT registry with real nodes in one process, on
//! 127.0.0.1: joining through a bootstrap node, finding a peer by id and by
//! capability with no connection beforehand, a message to an entity never
//! connected, records kept across a restart, a capability added later
//! found through the DHT alone, past a stale copy of the record; a peer
//! the agent connected to and a static peer dialled again; dials leave from a
//! fresh port.

mod common;

use std::time::Duration;

use common::{TestNode, reopen, restart, start_node_with};
use peer_node::Config;
use peer_node::services::card::{CardContent, Skill};

const TCP: &str = "/ip4/127.0.0.1/tcp/0";

/// Short periods so that a test sees several rounds.
fn fast(c: &mut Config) {
    c.discovery.query_secs = 2;
    c.discovery.random_walk_secs = 2;
    c.discovery.query_timeout_secs = 5;
}

/// Discovery without announces: records are learnt through the DHT only.
fn dht_only(c: &mut Config) {
    fast(c);
    c.discovery.announce = false;
}

/// A DHT-only member joining through `boot`.
fn joining(boot: &TestNode) -> impl FnOnce(&mut Config) + use<> {
    let addr = boot.addr.clone();
    move |c| {
        dht_only(c);
        c.network.bootstrap = vec![addr];
    }
}

/// A bootstrap node and two DHT-only members, a and d, joined through it:
/// what one learns of the other's record it learns through the DHT.
async fn dht_only_pair() -> (TestNode, TestNode, TestNode) {
    let boot = start_node_with(TCP, |c| {
        dht_only(c);
        c.discovery.bootstrap_node = true;
    })
    .await;
    let a = start_node_with(TCP, joining(&boot)).await;
    let d = start_node_with(TCP, joining(&boot)).await;
    (boot, a, d)
}

fn skill(id: &str) -> Skill {
    Skill {
        id: id.into(),
        name: String::new(),
        description: String::new(),
        tags: Vec::new(),
        input_modes: Vec::new(),
        output_modes: Vec::new(),
        examples: Vec::new(),
    }
}

/// A node that joins through `bootstrap`, offering `skills`.
async fn member(bootstrap: &TestNode, skills: &[&str]) -> TestNode {
    let addr = bootstrap.addr.clone();
    let skills: Vec<Skill> = skills.iter().map(|s| skill(s)).collect();
    start_node_with(TCP, move |c| {
        fast(c);
        c.network.bootstrap = vec![addr];
        c.card.name = Some("member".into());
        c.card.skills = skills;
    })
    .await
}

/// Replaces `node`'s card by one that offers the skill "code".
async fn offer_code(node: &TestNode) {
    let content = CardContent {
        name: "a".into(),
        description: String::new(),
        version: String::new(),
        skills: vec![skill("code")],
        accepts: Vec::new(),
    };
    node.handle.set_card(content).await.expect("card");
}

/// Whether a capability lookup of "code" by `node` answers `offerer`.
async fn finds_code_at(node: &TestNode, offerer: peer_core::EntityId) -> bool {
    node.handle
        .discover("code".into())
        .await
        .is_ok_and(|found| found.iter().any(|p| p.entity_id == offerer))
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_joining_through_a_bootstrap_node_find_each_other_by_id_and_capability() {
    let boot = start_node_with(TCP, |c| {
        fast(c);
        c.discovery.bootstrap_node = true;
    })
    .await;
    let a = member(&boot, &["code"]).await;
    let b = member(&boot, &["code", "review"]).await;
    let c = member(&boot, &["review"]).await;
    let d = member(&boot, &[]).await;
    let members = [&a, &b, &c, &d];

    // Every member comes to know every other node (the bootstrap node too)
    // as verified and reached.
    for m in members {
        until(20, "every member offers the four other nodes", || async {
            let s = m.handle.discovery_stats().await.expect("stats");
            s.offered >= 4
        })
        .await;
    }

    // The bootstrap node runs no application service.
    let refused = boot
        .handle
        .send(
            a.handle.entity_id(),
            "message".parse().expect("type"),
            b"{}".to_vec(),
        )
        .await
        .expect_err("no messaging on a bootstrap node");
    assert!(refused.to_string().contains("bootstrap"), "{refused}");

    // By id: d's record, as d signed it.
    let found = a.handle.find(d.handle.entity_id()).await.expect("found");
    assert!(found.verified && found.reachable);
    assert_eq!(found.entity_id, d.handle.entity_id());

    // By capability: exactly those that offer it.
    let code = d.handle.discover("code".into()).await.expect("discover");
    let mut got: Vec<_> = code.iter().map(|p| p.entity_id).collect();
    got.sort();
    let mut want = vec![a.handle.entity_id(), b.handle.entity_id()];
    want.sort();
    assert_eq!(got, want);
    assert!(
        d.handle
            .discover("nothing".into())
            .await
            .expect("discover")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_an_entity_never_connected_is_looked_up_dialled_and_delivered() {
    let boot = start_node_with(TCP, |c| {
        fast(c);
        c.discovery.bootstrap_node = true;
        // Only the DHT: no announces, no walks before the send.
        c.discovery.announce = false;
    })
    .await;
    // Kademlia's own queries connect a and b; idle connections close after
    // a second, so the send finds none.
    let quiet = |c: &mut Config| {
        c.discovery.announce = false;
        c.discovery.random_walk_secs = 3_600;
        c.discovery.query_secs = 3_600;
        c.network.max_idle_secs = 1;
    };
    let addr = boot.addr.clone();
    let a = start_node_with(TCP, |c| {
        quiet(c);
        c.network.bootstrap = vec![addr.clone()];
    })
    .await;
    let addr = boot.addr.clone();
    let b = start_node_with(TCP, |c| {
        quiet(c);
        c.network.bootstrap = vec![addr];
    })
    .await;
    let (ida, idb) = (a.handle.entity_id(), b.handle.entity_id());
    // b's record reaches the DHT (the bootstrap node holds it).
    until(20, "the bootstrap node holds b's record", || async {
        boot.handle.find(idb).await.is_ok_and(|p| p.verified)
    })
    .await;
    until(20, "a has no connection to b", || async {
        let peers = a.handle.peers().await.expect("peers");
        !peers.iter().any(|p| p.entity_id == idb && p.connected)
    })
    .await;
    a.handle
        .send(
            idb,
            "message".parse().expect("type"),
            br#"{"hi":1}"#.to_vec(),
        )
        .await
        .expect("looked up, dialled, delivered");
    let mut events = b.handle.inbox(0, 10).await.expect("inbox");
    let first = events.remove(0);
    assert!(format!("{:?}", first.event).contains(&ida.to_string()));

    // An entity nobody published: not connected, and not found.
    let nobody = peer_core::Identity::from_secret(&[9; 32]).entity_id();
    let e = a
        .handle
        .send(nobody, "message".parse().expect("type"), b"{}".to_vec())
        .await
        .expect_err("nobody");
    assert!(matches!(e, peer_node::NodeError::NotConnected(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_held_for_the_dht_survive_a_restart() {
    let boot = start_node_with(TCP, |c| {
        fast(c);
        c.discovery.bootstrap_node = true;
    })
    .await;
    let a = member(&boot, &["code"]).await;
    let ida = a.handle.entity_id();
    until(20, "the bootstrap node holds a's record", || async {
        boot.handle
            .discovery_stats()
            .await
            .is_ok_and(|s| s.held_records >= 2)
    })
    .await;
    drop(a);
    let boot = restart(boot, TCP, |c| {
        fast(c);
        c.discovery.bootstrap_node = true;
    })
    .await;
    let s = boot.handle.discovery_stats().await.expect("stats");
    assert!(s.held_records >= 2, "{s:?}");
    // A newcomer joining through it finds a's record there, though a is gone.
    let c = member(&boot, &[]).await;
    until(20, "the newcomer finds a's record", || async {
        c.handle.find(ida).await.is_ok_and(|p| p.verified)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_the_agent_connected_to_is_dialled_again_when_it_comes_back() {
    let quick = |c: &mut Config| {
        c.discovery.reconnect_min_ms = 100;
        c.discovery.reconnect_max_ms = 400;
        // Five failed redials open b's circuit breaker, which then holds
        // further dials for this long (30 s by default).
        c.pool.breaker_open_ms = 1_000;
    };
    let a = start_node_with(TCP, quick).await;
    let b = start_node_with(TCP, quick).await;
    let idb = b.handle.entity_id();
    a.handle.connect(b.addr.clone()).await.expect("connect");
    // b goes away; a keeps dialling it (and fails) until it is back on its
    // address.
    let addr = b.addr.to_string();
    let dir = b.dir;
    drop(b.handle);
    until(10, "a sees b gone", || async {
        let peers = a.handle.peers().await.expect("peers");
        !peers.iter().any(|p| p.entity_id == idb && p.connected)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = common::start_node_in(dir, &addr, quick, |b| b).await;
    until(10, "a dialled b again", || async {
        let peers = a.handle.peers().await.expect("peers");
        peers.iter().any(|p| p.entity_id == idb && p.connected)
    })
    .await;
    let s = a.handle.discovery_stats().await.expect("stats");
    assert!(s.redials >= 1, "{s:?}");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_expire_after_t_expire_unless_republished_every_t_refresh() {
    // tExpire 3 s: a record not republished is gone after it; one
    // republished every second (tRefresh 1 s) stays.
    let short = |refresh: u64| {
        move |c: &mut Config| {
            fast(c);
            c.discovery.expire_secs = 3;
            c.discovery.refresh_secs = refresh;
        }
    };
    let boot = start_node_with(TCP, |c| {
        short(3_600)(c);
        c.discovery.bootstrap_node = true;
    })
    .await;
    let join = |refresh: u64| {
        let addr = boot.addr.clone();
        start_node_with(TCP, move |c| {
            short(refresh)(c);
            c.network.bootstrap = vec![addr];
        })
    };
    let stale = join(3_600).await;
    let fresh = join(1).await;
    let (ids, idf) = (stale.handle.entity_id(), fresh.handle.entity_id());
    until(10, "the bootstrap node holds both records", || async {
        let verified = |p: peer_node::services::discovery::PeerInfo| p.verified;
        boot.handle.find(ids).await.is_ok_and(verified)
            && boot.handle.find(idf).await.is_ok_and(verified)
    })
    .await;
    let first = boot.handle.find(idf).await.expect("fresh").record;
    // (Its node republishes once 10 s after joining, then not for an hour.)
    until(30, "the record not republished expires", || async {
        !boot.handle.find(ids).await.is_ok_and(|p| p.verified)
    })
    .await;
    let now = boot
        .handle
        .find(idf)
        .await
        .expect("republished, still there");
    assert_ne!(now.record, first, "re-signed with a new sequence");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_peer_is_dialled_at_start_and_kept_beside_the_dht() {
    let quick = |c: &mut Config| {
        c.discovery.reconnect_min_ms = 100;
        c.discovery.reconnect_max_ms = 400;
        // As in the test above: five failed redials open the breaker.
        c.pool.breaker_open_ms = 1_000;
    };
    let b = start_node_with(TCP, quick).await;
    let idb = b.handle.entity_id();
    let static_b = format!("{}/p2p/{}", b.addr, b.handle.peer_id());
    let a = start_node_with(TCP, |c| {
        quick(c);
        c.discovery.static_peers = vec![static_b.parse().expect("addr")];
    })
    .await;
    let connected = || async {
        let peers = a.handle.peers().await.expect("peers");
        peers.iter().any(|p| p.entity_id == idb && p.connected)
    };
    until(10, "a dialled its static peer at start", connected).await;
    let (addr, dir) = (b.addr.to_string(), b.dir);
    drop(b.handle);
    until(10, "a sees b gone", || async { !connected().await }).await;
    let b = common::start_node_in(dir, &addr, quick, |b| b).await;
    until(10, "a dialled its static peer again", connected).await;
    drop(b);
    // An address without the peer id is refused at start.
    let mut config = Config::default();
    config.discovery.static_peers = vec!["/ip4/127.0.0.1/tcp/1".parse().expect("addr")];
    let e = config.check().expect_err("no /p2p/");
    assert!(e.to_string().contains("/p2p/"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capability_added_after_the_record_was_learnt_is_found_through_the_dht_alone() {
    // No announces: d learns a's newer record only by looking it up.
    let (_boot, a, d) = dht_only_pair().await;
    let ida = a.handle.entity_id();
    until(20, "d holds a's record, which lists nothing", || async {
        d.handle
            .find(ida)
            .await
            .is_ok_and(|p| p.verified && p.capabilities.is_empty())
    })
    .await;
    offer_code(&a).await;
    until(20, "a publishes a record that lists code", || async {
        a.handle
            .find(ida)
            .await
            .is_ok_and(|p| p.capabilities == ["code"])
    })
    .await;
    // a provides code: d looks up the record of a provider whose record
    // held does not list it, and does not stop at a copy of that one.
    until(20, "d finds a offering code", || async {
        finds_code_at(&d, ida).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_goes_past_a_stale_copy_of_the_record_held() {
    let (boot, a, d) = dht_only_pair().await;
    let ida = a.handle.entity_id();
    // a publishes twice after joining; then not again for an hour.
    let seq = || async {
        let own = a.handle.find(ida).await.ok()?;
        own.record?["record"]["seq"].as_u64()
    };
    until(20, "a publishes", || async { seq().await.is_some() }).await;
    let first = seq().await;
    until(20, "a publishes again after joining", || async {
        seq().await != first
    })
    .await;
    until(
        20,
        "d holds the records of a and the bootstrap node",
        || async {
            d.handle
                .discovery_stats()
                .await
                .is_ok_and(|s| s.held_records >= 2)
        },
    )
    .await;
    // While d is down, a offers code: d's copy of a's record goes stale.
    let TestNode { handle, dir, .. } = d;
    drop(handle);
    offer_code(&a).await;
    until(20, "the bootstrap node holds a's new record", || async {
        finds_code_at(&boot, ida).await
    })
    .await;
    // Back, d holds the old copy for the DHT; a lookup finds it first (in
    // its own store) and goes on to the newer one.
    let d = reopen(dir, TCP, joining(&boot)).await;
    until(20, "d finds a offering code", || async {
        finds_code_at(&d, ida).await
    })
    .await;
}

/// The TCP port of a `/ip4/…/tcp/PORT` address.
fn tcp_port(addr: &libp2p::Multiaddr) -> u16 {
    addr.iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .expect("a TCP address")
}

/// The (local, remote) ports of this host's established IPv4 TCP
/// connections, from `/proc/net/tcp`.
fn established_tcp() -> Vec<(u16, u16)> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port = |field: &str| {
        let hex = field.rsplit(':').next().expect("addr:port");
        u16::from_str_radix(hex, 16).expect("hex port")
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(3) == Some(&"01")).then(|| (port(fields[1]), port(fields[2])))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dials_leave_from_a_fresh_port_not_the_listeners() {
    // Two nodes that dial each other at the same instant (both heard the other
    // on mDNS) from their listening ports would meet in one TCP simultaneous
    // open, where both act as Noise initiator and both dials fail. A dial from
    // a fresh port cannot meet another dial.
    let b = start_node_with(TCP, |_| {}).await;
    let (idb, b_port) = (b.handle.entity_id(), tcp_port(&b.addr));
    let static_b = format!("{}/p2p/{}", b.addr, b.handle.peer_id());
    // a dials b as its static peer (discovery's dial), c as the agent asks.
    let a = start_node_with(TCP, |c| {
        c.discovery.static_peers = vec![static_b.parse().expect("addr")];
    })
    .await;
    let c = start_node_with(TCP, |_| {}).await;
    c.handle.connect(b.addr.clone()).await.expect("connect");
    until(10, "a dialled its static peer", || async {
        let peers = a.handle.peers().await.expect("peers");
        peers.iter().any(|p| p.entity_id == idb && p.connected)
    })
    .await;
    let to_b: Vec<u16> = established_tcp()
        .into_iter()
        .filter(|&(_, remote)| remote == b_port)
        .map(|(local, _)| local)
        .collect();
    assert!(to_b.len() >= 2, "a's and c's connections to b: {to_b:?}");
    for dialler in [&a, &c] {
        let listener = tcp_port(&dialler.addr);
        assert!(
            !to_b.contains(&listener),
            "a dial to b left from its listener's port {listener}: {to_b:?}"
        );
    }
}
