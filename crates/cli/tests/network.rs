//! Discovery and the DHT registry with 20 real `peer run` processes on
//! 127.0.0.1: 19 members join through one bootstrap node and each comes to
//! offer at least 10 verified and reached peers within 30 s; a member finds
//! a peer it is not connected to by capability (exactly the three that offer
//! it) and by entity id through the DHT, and messages an entity it is not
//! connected to; the network keeps working once the bootstrap node is killed;
//! a node joining later is learnt by all the others without anyone asking for
//! it; a member restarted on its address is reconnected by the peers that
//! keep it (they sent it messages), and one restarted on a new port is found
//! again at its new address.
//!
//! All the nodes share one IP address here, so the per-IP connection limits,
//! meant for distinct hosts, are raised.
//!
//! Gossipsub keeps every connection between two nodes that run it open (its
//! streams count as activity), so once each member has dialled every peer it
//! verified, all the announcing members stay connected to each other, whatever
//! `network.max_idle_secs`. Two members run without announces (DHT only): the
//! finder F, which learns of the others only through the DHT, and X, which is
//! killed and restarted. Their connections close after 1 s idle, so pairs that
//! are not connected exist: F and the peers it looks for, X and the members
//! that message it (a message to a peer not connected waits while it is looked
//! up and dialled, and makes the sender keep that peer).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{Api, Node};

/// Members joining through the bootstrap node.
const MEMBERS: usize = 19;
/// Verified and reached peers every node must know after the join.
const KNOWN: u64 = 10;
/// Time allowed for the join, from the start of the members.
const JOIN: Duration = Duration::from_secs(30);
/// Time allowed for anything else awaited here.
const WAIT: Duration = Duration::from_secs(20);
/// Interval between two looks at something being polled.
const POLL: Duration = Duration::from_millis(200);

/// The settings of every node: discovery rounds every 10 s (each publishes
/// a changed card) and random walks every 30 s, the per-IP limits of one
/// host running them all, and idle connections closed after 1 s. With 20
/// nodes and k = 20 every lookup asks every node: shorter periods keep the
/// DHT-only members connected to nearly everyone (and load the 2 cores).
fn settings(cmd: &mut Command) {
    for (key, value) in [
        ("PEER_DISCOVERY__QUERY_SECS", "10"),
        ("PEER_DISCOVERY__RANDOM_WALK_SECS", "30"),
        ("PEER_NETWORK__MAX_IDLE_SECS", "1"),
        ("PEER_NETWORK__MAX_CONNECTIONS_PER_IP", "64"),
        ("PEER_NETWORK__MAX_PENDING_PER_IP", "64"),
        ("PEER_NETWORK__NEW_CONNECTIONS_PER_IP_PER_MIN", "100000"),
        ("PEER_NETWORK__NEW_CONNECTIONS_PER_IP_BURST", "10000"),
        // Above 64 connections times 2 MiB each.
        ("PEER_NETWORK__MAX_INBOUND_BUFFER_BYTES", "268435456"),
    ] {
        cmd.env(key, value);
    }
}

/// A member that takes and sends no announces: it learns of others through
/// the DHT only, and its idle connections close.
fn dht_only(cmd: &mut Command) {
    cmd.env("PEER_DISCOVERY__ANNOUNCE", "false");
}

/// A running node and what its peers know it by.
struct Peer {
    node: Node,
    id: String,
    peer_id: String,
    /// Its TCP listen address.
    addr: String,
}

impl Peer {
    /// The node, once its API is up and it listens, with its ids and address.
    fn ready(mut node: Node) -> Self {
        node.wait_ready();
        let api = Api::new(&node);
        let text = |v: &Value| v.as_str().expect("a string").to_owned();
        let (health, addr) = wait_for(&format!("{} listens", node.name), WAIT, || {
            let health = api.get("/v1/health");
            let addr = health["listen_addrs"]
                .as_array()?
                .iter()
                .map(text)
                .find(|a| a.contains("/tcp/"))?;
            Some((health, addr))
        });
        drop(api);
        Self {
            id: text(&health["entity_id"]),
            peer_id: text(&health["peer_id"]),
            addr,
            node,
        }
    }

    fn name(&self) -> &'static str {
        self.node.name
    }

    fn api(&self) -> Api<'_> {
        Api::new(&self.node)
    }

    /// Its address with its peer id, as `--bootstrap` takes it.
    fn p2p_addr(&self) -> String {
        format!("{}/p2p/{}", self.addr, self.peer_id)
    }

    /// Its TCP port.
    fn port(&self) -> &str {
        self.addr.rsplit('/').next().expect("a port")
    }

    /// `GET /v1/peers`.
    fn peers(&self) -> Vec<Value> {
        self.api()
            .get("/v1/peers")
            .as_array()
            .expect("a list")
            .clone()
    }

    /// Its entry for `other` in `GET /v1/peers`.
    fn view_of(&self, other: &Peer) -> Option<Value> {
        self.peers()
            .into_iter()
            .find(|p| p["entity_id"] == other.id)
    }

    /// Whether a connection to `other` is open now.
    fn connected_to(&self, other: &Peer) -> bool {
        self.view_of(other).is_some_and(|p| p["connected"] == true)
    }

    /// `GET /v1/discovery`.
    fn stats(&self) -> Value {
        self.api().get("/v1/discovery")
    }

    /// The entity ids `GET /v1/discover?capability=` answers, sorted.
    fn discover(&self, capability: &str) -> Vec<String> {
        let found = self
            .api()
            .get(&format!("/v1/discover?capability={capability}"));
        let mut ids: Vec<String> = found["peers"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|p| p["entity_id"].as_str().expect("entity_id").to_owned())
            .collect();
        ids.sort();
        ids
    }

    /// Sends `to` a `message` carrying `text`; it must be delivered.
    fn send(&self, to: &Peer, text: &str) {
        let body = json!({"to": to.id, "msg_type": "message", "payload": {"text": text}});
        let answer = self.api().post("/v1/messages", &body);
        assert!(
            answer["message_id"].is_string(),
            "{} -> {}: {answer}",
            self.name(),
            to.name()
        );
    }

    /// Whether a `message` carrying `text` is in its inbox.
    fn received(&self, text: &str) -> bool {
        let page = self.api().get("/v1/inbox?after=0&limit=1000");
        page["events"]
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["event"]["payload"]["text"] == text)
    }
}

/// Starts the nodes `names` side by side, each set up by `configure` with
/// its index.
fn start_all(
    root: &Path,
    names: &[&'static str],
    configure: impl Fn(usize, &mut Command),
) -> Vec<Peer> {
    let nodes: Vec<Node> = names
        .iter()
        .enumerate()
        .map(|(i, name)| Node::spawn(root, name, |cmd| configure(i, cmd)))
        .collect();
    nodes.into_iter().map(Peer::ready).collect()
}

/// Kills `peer` (SIGKILL) and starts it again on its data directory,
/// listening on `listen` and set up by `configure`; its former stderr is
/// kept beside as `<name>.<run>.stderr`.
fn restart(
    root: &Path,
    peer: &mut Peer,
    run: u32,
    listen: &str,
    configure: impl FnOnce(&mut Command),
) {
    peer.node.kill();
    let name = peer.name();
    let log = root.join(format!("{name}.stderr"));
    std::fs::rename(&log, root.join(format!("{name}.{run}.stderr"))).expect("keep the old log");
    *peer = Peer::ready(Node::spawn_on(root, name, listen, |cmd| {
        settings(cmd);
        configure(cmd);
    }));
}

/// Polls `look` until it gives something, for at most `within`.
fn wait_for<T>(what: &str, within: Duration, mut look: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = look() {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(POLL);
    }
}

/// When each of `nodes` first offered [`KNOWN`] peers, since `start`,
/// each polled by a thread of its own; the last count seen of one that did
/// not within [`JOIN`].
fn offered_within(nodes: &[&Peer], start: Instant) -> Vec<Result<Duration, u64>> {
    std::thread::scope(|scope| {
        let pollers: Vec<_> = nodes
            .iter()
            .map(|p| {
                scope.spawn(move || {
                    loop {
                        let offered = p.stats()["offered"].as_u64().expect("offered");
                        let at = start.elapsed();
                        if at > JOIN {
                            return Err(offered);
                        }
                        if offered >= KNOWN {
                            return Ok(at);
                        }
                        std::thread::sleep(POLL);
                    }
                })
            })
            .collect();
        pollers
            .into_iter()
            .map(|t| t.join().expect("a poller"))
            .collect()
    })
}

/// A peer of `among` that `from` is not connected to now.
fn unconnected<'a>(from: &Peer, among: &[&'a Peer]) -> Option<&'a Peer> {
    let peers = from.peers();
    among.iter().copied().find(|o| {
        !peers
            .iter()
            .any(|v| v["entity_id"] == o.id && v["connected"] == true)
    })
}

/// Once `from` is not connected to `to` (connections come and go), sends
/// `to` a message: it waits while `to` is looked up and dialled, and
/// arrives in `to`'s inbox.
fn message_unconnected(from: &Peer, to: &Peer, text: &str) {
    let what = format!("{} not connected to {}", from.name(), to.name());
    wait_for(&what, WAIT, || (!from.connected_to(to)).then_some(()));
    from.send(to, text);
    wait_for(&format!("{} receives {text:?}", to.name()), WAIT, || {
        to.received(text).then_some(())
    });
}

#[test]
fn twenty_nodes_join_find_each_other_and_survive_losing_the_bootstrap_node_and_restarts() {
    let began = Instant::now();
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();
    let mut boot = Peer::ready(Node::spawn(root, "boot", |cmd| {
        settings(cmd);
        cmd.arg("--bootstrap-node");
    }));
    // m01-m03 offer "code" later; m04 (F) and m05 (X) run without
    // announces; m06-m12 take part in steps 3 and 4, m13-m15 keep X.
    let (finder_at, x_at) = (3, 4);
    let pool = 5..12;
    let senders = [12, 13, 14];
    let names: Vec<&'static str> = (1..=MEMBERS).map(|i| &*format!("m{i:02}").leak()).collect();
    let joining = Instant::now();
    let boot_addr = boot.p2p_addr();
    let mut members = start_all(root, &names, |i, cmd| {
        settings(cmd);
        cmd.args(["--bootstrap", &boot_addr]);
        if i == finder_at || i == x_at {
            dht_only(cmd);
        }
    });
    eprintln!("{MEMBERS} members up in {:?}", joining.elapsed());

    // 1. Every node knows at least 10 peers verified (their signed record
    // checked) and reached (a connection to them opened): `offered` of
    // `/v1/discovery`. A peer counts there only once its record verified and
    // its addresses answered, so it is the stricter of the two measures: it
    // implies as many `verified` entries in `/v1/peers`.
    let all: Vec<&Peer> = std::iter::once(&boot).chain(&members).collect();
    let offered = offered_within(&all, joining);
    let behind: Vec<String> = all
        .iter()
        .zip(&offered)
        .filter(|(_, o)| o.is_err())
        .map(|(p, o)| format!("{} ({o:?})", p.name()))
        .collect();
    assert!(
        behind.is_empty(),
        "fewer than {KNOWN} peers offered after {JOIN:?}: {behind:?}"
    );
    let slowest = offered.iter().flatten().max().copied().unwrap_or_default();
    eprintln!("1. joined in {slowest:?}");

    // 2. Three members offer "code"; each publishes its new record at its
    // next discovery round.
    let coders: Vec<&Peer> = members[..3].iter().collect();
    for c in &coders {
        let card = json!({"name": c.name(), "skills": [{"id": "code", "name": "Code"}]});
        c.api().put("/v1/card", &card);
    }
    let mut want: Vec<String> = coders.iter().map(|c| c.id.clone()).collect();
    want.sort();
    for c in &coders {
        wait_for(&format!("{} publishes code", c.name()), WAIT, || {
            let own = c.api().get(&format!("/v1/peers/{}", c.id));
            own["capabilities"]
                .as_array()
                .is_some_and(|caps| caps.iter().any(|x| x == "code"))
                .then_some(())
        });
    }
    // F finds a coder it is not connected to by capability (exactly the
    // three come back) and by entity id, through the DHT: F takes no
    // announces, and its connections come and go with lookups.
    let finder = &members[finder_at];
    let coder = wait_for("a coder F is not connected to", WAIT, || {
        unconnected(finder, &coders)
    });
    let found = wait_for("exactly the coders offer code", WAIT, || {
        let got = finder.discover("code");
        assert!(
            got.iter().all(|id| want.contains(id)),
            "only coders offer code: {got:?}"
        );
        (got == want).then_some(got)
    });
    assert_eq!(found, want);
    let by_id = finder.api().get(&format!("/v1/peers/{}", coder.id));
    assert_eq!(by_id["entity_id"], coder.id, "{by_id}");
    assert_eq!(by_id["verified"], true, "{by_id}");
    let record = &by_id["record"]["record"];
    assert_eq!(record["addresses"][0], coder.addr, "{by_id}");
    assert_eq!(record["capabilities"], json!(["code"]), "{by_id}");
    let sources = by_id["sources"].as_array().expect("sources");
    assert!(!sources.iter().any(|s| s == "announce"), "{by_id}");
    // The CLI agrees.
    let by_cli = finder.node.cli(&["find", "--capability", "code"]);
    let mut cli_ids: Vec<&str> = by_cli["peers"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| p["entity_id"].as_str().expect("entity_id"))
        .collect();
    cli_ids.sort_unstable();
    assert_eq!(cli_ids, want, "{by_cli}");
    let by_cli = finder.node.cli(&["find", &coder.id]);
    assert_eq!(by_cli["entity_id"], coder.id, "{by_cli}");
    eprintln!("2. found at {:?}", began.elapsed());

    // 3. A message to an entity F is not connected to and its agent never
    // connected to.
    let pool: Vec<&Peer> = members[pool].iter().collect();
    let target = pool[0];
    message_unconnected(finder, target, "never connected");
    eprintln!("3. delivered at {:?}", began.elapsed());

    // 4. Without the bootstrap node: a message from a member not connected
    // to F, and a discovery.
    boot.node.kill();
    let sender = wait_for("a member not connected to F", WAIT, || {
        pool.iter()
            .copied()
            .find(|m| m.id != target.id && !m.connected_to(finder))
    });
    message_unconnected(sender, finder, "without the bootstrap node");
    let seeker = &members[MEMBERS - 1];
    let got = wait_for("the coders without the bootstrap node", WAIT, || {
        let got = seeker.discover("code");
        assert!(got.iter().all(|id| want.contains(id)), "{got:?}");
        (got == want).then_some(got)
    });
    assert_eq!(got, want);
    eprintln!(
        "4. bootstrap node gone, still working at {:?}",
        began.elapsed()
    );

    // 5. A node joins through a member; every member learns it without
    // anyone asking for it: the announcing ones from its announce, F and X
    // when its joining lookups reach them.
    let entry = members[MEMBERS - 1].p2p_addr();
    let late = Peer::ready(Node::spawn(root, "late", |cmd| {
        settings(cmd);
        cmd.args(["--bootstrap", &entry]);
    }));
    let arrived = Instant::now();
    for m in &members {
        wait_for(&format!("{} learns the late node", m.name()), WAIT, || {
            m.view_of(&late)
                .is_some_and(|v| v["verified"] == true)
                .then_some(())
        });
    }
    eprintln!("5. late node known to all in {:?}", arrived.elapsed());

    // 6. Three members message X while not connected to it, so they keep
    // it (and redial it whenever its idle connection closes). X is killed and
    // started again on its address with no bootstrap peer: it can dial no one
    // until a peer reaches it (a sender's redial, or another member's
    // Kademlia query; X then joins the DHT again). Each sender is connected
    // to it again, with no API call.
    let x_name = members[x_at].name();
    let x_port = members[x_at].port().to_owned();
    for i in senders {
        let text = format!("keep me {}", members[i].name());
        message_unconnected(&members[i], &members[x_at], &text);
    }
    let same = format!("/ip4/127.0.0.1/tcp/{x_port}");
    restart(root, &mut members[x_at], 1, &same, dht_only);
    assert_eq!(members[x_at].port(), x_port);
    let restarted = Instant::now();
    for i in senders {
        let (s, x) = (&members[i], &members[x_at]);
        wait_for(
            &format!("{} reconnects to {x_name}", s.name()),
            WAIT,
            || s.connected_to(x).then_some(()),
        );
    }
    eprintln!("6. {x_name} reconnected in {:?}", restarted.elapsed());

    // 7. X started again on a new port: its new record brings them back.
    let entry = members[0].p2p_addr();
    restart(root, &mut members[x_at], 2, "/ip4/127.0.0.1/tcp/0", |cmd| {
        dht_only(cmd);
        cmd.args(["--bootstrap", &entry]);
    });
    let x = &members[x_at];
    assert_ne!(x.port(), x_port);
    let moved = Instant::now();
    for i in senders {
        let s = &members[i];
        wait_for(&format!("{} finds {x_name} moved", s.name()), WAIT, || {
            let v = s.view_of(x)?;
            let at_new = v["addrs"].as_array()?.iter().any(|a| a == &x.addr);
            (v["connected"] == true && at_new).then_some(())
        });
        let text = format!("moved {}", s.name());
        s.send(x, &text);
        wait_for(&format!("{x_name} receives {text:?}"), WAIT, || {
            x.received(&text).then_some(())
        });
    }
    eprintln!("7. {x_name} found on its new port in {:?}", moved.elapsed());
    eprintln!("all in {:?}", began.elapsed());
}
