//! The connection pool's circuit breaker between real nodes: B stops, A's
//! calls to it fail until its breaker opens after `pool.breaker_failures`;
//! while open, sends fail at once with `CIRCUIT_OPEN` and no dial to B starts
//! (counted); B back on its address, the breaker lets trial calls through
//! and closes.

mod common;

use std::time::{Duration, Instant};

use common::{TestNode, reopen, start_node_with, wait_connected};
use peer_core::EntityId;
use peer_node::NodeError;
use peer_node::node::NodeHandle;
use peer_node::pool::PoolView;

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

#[tokio::test]
async fn the_breaker_opens_after_five_failures_stops_dials_and_closes_through_half_open() {
    let a = start_node_with(LISTEN, tune).await;
    let b = start_node_with(LISTEN, tune).await;
    let b_id = b.handle.entity_id();
    let b_listen = b.addr.to_string();
    a.handle.connect(b.addr.clone()).await.expect("connect");
    send(&a, b_id).await.expect("B is up");
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
    drop(b);
}
