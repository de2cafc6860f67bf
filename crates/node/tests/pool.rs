//! The connection pool between real nodes: 1,000 messages on one connection;
//! an idle connection closed after `network.max_idle_secs`; a connection that
//! died silently caught by the keep-alive validation and replaced; and the
//! circuit breaker: B stops, A's calls to it fail until its breaker opens
//! after `pool.breaker_failures`; while open, sends fail at once with
//! `CIRCUIT_OPEN` and no dial to B starts (counted); B back on its address,
//! the breaker lets trial calls through and closes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{TestNode, reopen, start_node_with, wait_connected};
use peer_core::EntityId;
use peer_node::NodeError;
use peer_node::node::NodeHandle;
use peer_node::pool::PoolView;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

const LISTEN: &str = "/ip4/127.0.0.1/tcp/0";
const OPEN_MS: u64 = 2_000;

fn tune(c: &mut peer_node::Config) {
    c.pool.breaker_open_ms = OPEN_MS;
    // Discovery redials the peer the agent connected to; a short backoff
    // makes it one of the callers here.
    c.discovery.reconnect_min_ms = 100;
    c.discovery.reconnect_max_ms = 400;
}

async fn pool(node: &NodeHandle) -> PoolView {
    node.stats().await.expect("stats").pool
}

async fn send(from: &TestNode, to: EntityId) -> Result<(), NodeError> {
    from.handle
        .send(to, "message".parse().expect("type"), b"{}".to_vec())
        .await
        .map(|_| ())
}

/// A and B started with `tune`, A connected to B and one message delivered:
/// A, B, B's entity id and listen address.
async fn a_reaches_b(
    tune: impl Fn(&mut peer_node::Config) + Copy,
) -> (TestNode, TestNode, EntityId, String) {
    let a = start_node_with(LISTEN, tune).await;
    let b = start_node_with(LISTEN, tune).await;
    let b_id = b.handle.entity_id();
    let b_listen = b.addr.to_string();
    a.handle.connect(b.addr.clone()).await.expect("connect");
    send(&a, b_id).await.expect("B is up");
    (a, b, b_id, b_listen)
}

#[tokio::test]
async fn the_breaker_opens_after_five_failures_stops_dials_and_closes_through_half_open() {
    let (a, b, b_id, b_listen) = a_reaches_b(tune).await;
    let before = pool(&a.handle).await;
    assert_eq!(
        (before.totals.dials, before.totals.dial_failures),
        (1, 0),
        "{before:?}"
    );

    // B goes away: A's sends and redials fail until the breaker opens.
    let TestNode { handle, dir, .. } = b;
    drop(handle);
    let started = Instant::now();
    let opened = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never opened: {:?}",
            pool(&a.handle).await
        );
        match send(&a, b_id).await {
            Err(NodeError::CircuitOpen(open)) => break open,
            Err(_) => {}
            Ok(()) => panic!("B is gone"),
        }
    };
    assert_eq!(opened.entity_id, b_id);
    let open = pool(&a.handle).await;
    assert_eq!(open.totals.trips, 1, "{open:?}");
    assert_eq!(open.open_breakers, 1, "{open:?}");
    assert_eq!(common::metric(&a.handle, "peer_pool_breakers_tripped"), 1.0);
    assert_eq!(open.breakers[0].state, "open");
    assert!(
        open.totals.dial_failures + open.totals.send_failures >= 5,
        "five failed calls open it: {open:?}"
    );

    // While open: fast errors, and no dial starts (discovery keeps trying to
    // redial B; each attempt is refused before any address is tried).
    for _ in 0..10 {
        let t = Instant::now();
        let e = send(&a, b_id).await.expect_err("open");
        assert!(matches!(e, NodeError::CircuitOpen(_)), "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_millis(OPEN_MS / 2)).await;
    let still = pool(&a.handle).await;
    assert_eq!(
        still.totals.dials, open.totals.dials,
        "no dial while open: {still:?}"
    );
    assert!(still.totals.sends_refused >= 11, "{still:?}");
    assert!(
        still.totals.dials_refused > open.totals.dials_refused,
        "{still:?}"
    );

    // B back on the same address: after the open time, trial calls go
    // through and three successes close the breaker.
    let b = reopen(dir, &b_listen, tune).await;
    let started = Instant::now();
    let mut delivered = 0;
    while delivered < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never closed: {:?}",
            pool(&a.handle).await
        );
        match send(&a, b_id).await {
            Ok(()) => delivered += 1,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    wait_connected(&a.handle, b_id).await;
    let closed = pool(&a.handle).await;
    assert_eq!(closed.open_breakers, 0, "{closed:?}");
    assert!(
        closed.breakers.is_empty(),
        "closed and forgotten: {closed:?}"
    );
    assert_eq!(closed.totals.trips, 1, "{closed:?}");
    assert_eq!(common::metric(&a.handle, "peer_pool_breakers_tripped"), 0.0);
    drop(b);
}

#[tokio::test]
async fn a_peer_that_connects_back_closes_its_open_breaker_at_once() {
    let long = |c: &mut peer_node::Config| {
        tune(c);
        c.pool.breaker_open_ms = 60_000;
    };
    let (a, b, b_id, b_listen) = a_reaches_b(long).await;
    let TestNode { handle, dir, .. } = b;
    drop(handle);
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(30), "never opened");
        if let Err(NodeError::CircuitOpen(_)) = send(&a, b_id).await {
            break;
        }
    }
    // B comes back and dials A: A's breaker for B closes without waiting
    // out its minute.
    let b = reopen(dir, &b_listen, long).await;
    b.handle.connect(a.addr.clone()).await.expect("B dials A");
    let t = Instant::now();
    send(&a, b_id).await.expect("delivered at once");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let p = pool(&a.handle).await;
    assert_eq!((p.open_breakers, p.totals.trips), (0, 1), "{p:?}");
}

#[tokio::test]
async fn a_thousand_messages_reuse_one_connection() {
    let quiet = |c: &mut peer_node::Config| {
        c.discovery.enabled = false;
        c.rate_limits.enabled = false;
    };
    let a = start_node_with(LISTEN, quiet).await;
    let b = start_node_with(LISTEN, quiet).await;
    let b_id = b.handle.entity_id();
    a.handle.connect(b.addr.clone()).await.expect("connect");
    let sends = (0..1000).map(|_| send(&a, b_id));
    for result in futures::future::join_all(sends).await {
        result.expect("delivered");
    }
    let p = pool(&a.handle).await.totals;
    assert!(p.dials <= 3, "{p:?}");
    // Handshake steps need a connection too: at least the 1,000 messages.
    assert!(p.acquisitions >= 1000, "{p:?}");
    let ratio = p.reuses as f64 / p.acquisitions as f64;
    assert!(ratio >= 0.99, "reuse ratio {ratio}: {p:?}");
    let answered = common::metric(&a.handle, "peer_pool_request_seconds_count");
    assert!(answered >= 1000.0, "latency histogram: {answered}");
    // B lists the long-lived streams, so the messages share one (or a few),
    // not a stream each.
    assert!((1..=3).contains(&p.streams_opened), "{p:?}");
    let streams = common::metric(&a.handle, "peer_pool_streams_opened_total");
    assert_eq!(streams, p.streams_opened as f64);
    // The same per peer.
    let stats = a.handle.stats().await.expect("stats");
    let row = &stats.peers[&b_id.to_string()];
    assert!(
        row.requests >= 1000 && row.answered == row.requests,
        "{row:?}"
    );
    assert_eq!((row.failures, row.retries), (0, 0));
    assert!(row.latency_us_total > 0);
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_time() {
    let idle = |c: &mut peer_node::Config| {
        c.discovery.enabled = false;
        c.heartbeat.interval_ms = 3_600_000;
        c.network.max_idle_secs = 1;
    };
    let a = start_node_with(LISTEN, idle).await;
    let b = start_node_with(LISTEN, idle).await;
    let b_id = b.handle.entity_id();
    a.handle.connect(b.addr.clone()).await.expect("connect");
    send(&a, b_id).await.expect("delivered");
    let t = Instant::now();
    common::wait_disconnected(&a.handle, b_id).await;
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // A new connection carries the next message (with discovery off, the
    // agent dials; with it on, discovery would redial B, a peer it keeps).
    a.handle.connect(b.addr.clone()).await.expect("connect");
    send(&a, b_id).await.expect("delivered on a new connection");
    assert_eq!(pool(&a.handle).await.totals.dials, 2);
}

/// A TCP relay from a local port to `to` that can stop carrying bytes while
/// keeping both sockets open: a connection that dies silently.
async fn black_hole_relay(to: std::net::SocketAddr) -> (u16, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let cut = Arc::new(AtomicBool::new(false));
    let cut2 = cut.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = TcpStream::connect(to).await.expect("connect");
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::spawn(pump(ri, wo, cut2.clone()));
            tokio::spawn(pump(ro, wi, cut2.clone()));
        }
    });
    (port, cut)
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, cut: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            return;
        }
        if cut.load(Ordering::Relaxed) {
            continue; // swallowed: the socket stays open, nothing arrives
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A connected to B through a relay that can be made to stop carrying bytes.
async fn through_relay(
    tune: impl Fn(&mut peer_node::Config) + Copy,
) -> (TestNode, TestNode, Arc<AtomicBool>) {
    let a = start_node_with(LISTEN, tune).await;
    let b = start_node_with(LISTEN, tune).await;
    let b_tcp = b
        .addr
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .expect("tcp port");
    let (port, cut) = black_hole_relay(([127, 0, 0, 1], b_tcp).into()).await;
    let via: libp2p::Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("addr");
    a.handle
        .connect(via)
        .await
        .expect("connect through the relay");
    (a, b, cut)
}

#[tokio::test]
async fn sends_without_an_answer_are_retried_within_the_budget_then_fail() {
    let tune = |c: &mut peer_node::Config| {
        c.network.connection_timeout_secs = 1;
        c.heartbeat.interval_ms = 3_600_000;
        c.discovery.enabled = false;
        // Keep-alive and the breaker out of the way: only retries are watched.
        c.pool.keep_alive_secs = 3_600;
        c.pool.breaker_failures = 1_000;
        // A budget of one token, and 0.2 per send.
        c.pool.retry_per_sec = 0.1;
        c.pool.retry_base_ms = 50;
    };
    let (a, b, cut) = through_relay(tune).await;
    let b_id = b.handle.entity_id();
    send(&a, b_id).await.expect("delivered");
    let before = pool(&a.handle).await.totals;
    assert_eq!(before.retries, 0);
    cut.store(true, Ordering::Relaxed);
    // 20 sends into the dead connection: each times out after 1 s; the
    // budget lets about 1 + 20 × 0.2 of them go again, not 20 × 2.
    let t = Instant::now();
    let sends = (0..20).map(|_| send(&a, b_id));
    for result in futures::future::join_all(sends).await {
        let e = result.expect_err("no answer through a dead relay");
        assert!(matches!(e, NodeError::Transport(_)), "{e}");
    }
    let p = pool(&a.handle).await.totals;
    let retries = p.retries - before.retries;
    assert!((1..=6).contains(&retries), "retries {retries}: {p:?}");
    assert!(
        p.send_failures - before.send_failures >= 20 + retries,
        "{p:?}"
    );
    // Each retry waited for its own timeout: the last failures came later.
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    let retried = common::metric(&a.handle, "peer_pool_retries_total");
    assert_eq!(retried, p.retries as f64);
    let stats = a.handle.stats().await.expect("stats");
    let row = &stats.peers[&b_id.to_string()];
    assert_eq!(row.retries, retries, "{row:?}");
    assert_eq!(row.failures, 20 + retries, "{row:?}");
}

#[tokio::test]
async fn a_connection_that_died_silently_is_evicted_by_validation_and_replaced() {
    let tune = |c: &mut peer_node::Config| {
        c.pool.keep_alive_secs = 1;
        c.network.connection_timeout_secs = 1;
        c.heartbeat.interval_ms = 3_600_000;
        // Discovery would open a second, direct connection (its reachability
        // check), which the relay's death would not touch.
        c.discovery.enabled = false;
    };
    let (a, b, cut) = through_relay(tune).await;
    let b_id = b.handle.entity_id();
    send(&a, b_id).await.expect("delivered");

    cut.store(true, Ordering::Relaxed);
    // libp2p's ping forgives the first failure; the second ping opens a new
    // stream, whose negotiation times out after 10 s: about 2 × 1 s + 1 s + 10 s.
    let t = Instant::now();
    while a
        .handle
        .peers()
        .await
        .expect("peers")
        .iter()
        .any(|p| p.entity_id == b_id && p.connected)
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never evicted: {:?}",
            pool(&a.handle).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = pool(&a.handle).await.totals;
    assert!(p.validation_failures >= 1 && p.evictions >= 1, "{p:?}");

    // A new connection, at the address B announced, carries the next message.
    a.handle.connect(b.addr.clone()).await.expect("connect");
    send(&a, b_id).await.expect("delivered on a new connection");
    let p = pool(&a.handle).await.totals;
    assert!(p.validations >= 1, "{p:?}");
}
