//! A capability plugs into the node as a service: this file defines one of its
//! own (no other module knows of it), registers it with the node builder, and
//! real nodes route its message type to it, its replies back to it, and its
//! commands from a handle.

use std::time::Duration;

use peer_core::rate::Class;
use peer_core::{EntityId, MsgType};
use peer_node::NodeError;
use peer_node::service::{Answer, Context, Inbound, Outcome, Reply, RequestId, Route, Service};
use tokio::sync::oneshot;

mod common;
use common::{start_node_built, wait_connected};

const TCP: &str = "/ip4/127.0.0.1/tcp/0";

/// Where the outcome of an `Ask` goes: the reply's type and payload.
type Answered = oneshot::Sender<Result<(String, String), NodeError>>;

/// Echoes `test.echo` requests back as `test.echoed`, counts them, and can send
/// one itself and report what came back.
#[derive(Default)]
struct Echo {
    seen: u32,
    asked: Option<(RequestId, Answered)>,
}

enum EchoCommand {
    /// How many `test.echo` requests arrived.
    Seen(oneshot::Sender<u32>),
    /// Send a `test.echo` to a peer; answer with the reply's type and payload.
    Ask(EntityId, Vec<u8>, Answered),
}

impl Service for Echo {
    type Command = EchoCommand;

    fn name(&self) -> &'static str {
        "echo"
    }

    fn routes(&self) -> Vec<Route> {
        vec![Route::plain("test.echo", Class::Task)]
    }

    fn on_envelope(&mut self, _cx: &mut Context<'_>, msg: Inbound) -> Answer {
        self.seen += 1;
        Answer::Reply {
            msg_type: "test.echoed".parse().expect("valid"),
            payload: msg.payload,
        }
    }

    fn on_command(&mut self, cx: &mut Context<'_>, command: EchoCommand) {
        match command {
            EchoCommand::Seen(reply) => _ = reply.send(self.seen),
            EchoCommand::Ask(to, payload, reply) => {
                let id = cx.send(to, "test.echo".parse().expect("valid"), payload);
                self.asked = Some((id, reply));
            }
        }
    }

    fn on_reply(&mut self, _cx: &mut Context<'_>, id: RequestId, outcome: Outcome) {
        let Some((asked, reply)) = self.asked.take() else {
            return;
        };
        assert_eq!(asked, id, "the outcome of this service's own request");
        let answer = outcome.result.map(|r| match r {
            Reply::Envelope(env) => (
                env.msg_type.to_string(),
                String::from_utf8_lossy(&env.payload).into_owned(),
            ),
            Reply::Accepted => ("accepted".to_owned(), String::new()),
        });
        _ = reply.send(answer);
    }
}

#[tokio::test]
async fn a_service_of_its_own_gets_its_type_its_replies_and_its_commands() {
    let a = start_node_built(TCP, |_| {}, |b| b.service(Echo::default())).await;
    let b = start_node_built(TCP, |_| {}, |b| b.service(Echo::default())).await;
    a.handle.connect(b.addr.clone()).await.expect("connect");
    wait_connected(&b.handle, a.handle.entity_id()).await;

    // The agent's send of the new type reaches B's echo service.
    let echo: MsgType = "test.echo".parse().expect("valid");
    let delivered = a
        .handle
        .send(b.handle.entity_id(), echo, br#"{"hi":1}"#.to_vec())
        .await
        .expect("echoed");
    let reply = delivered.reply.expect("a reply");
    assert_eq!(reply.msg_type, "test.echoed");
    assert_eq!(reply.payload, serde_json::json!({"hi": 1}));

    // A's service sends one itself; the reply comes back to it, not to any
    // other service.
    let mine = a.handle.service::<Echo>().expect("registered");
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        mine.ask(|tx| EchoCommand::Ask(b.handle.entity_id(), b"ping?".to_vec(), tx)),
    )
    .await
    .expect("in time")
    .expect("node running")
    .expect("answered");
    assert_eq!(answer, ("test.echoed".to_owned(), "ping?".to_owned()));

    let theirs = b.handle.service::<Echo>().expect("registered");
    assert_eq!(theirs.ask(EchoCommand::Seen).await.expect("running"), 2);
    assert_eq!(mine.ask(EchoCommand::Seen).await.expect("running"), 0);
}

#[tokio::test]
async fn a_node_without_the_service_refuses_its_type() {
    let a = start_node_built(TCP, |_| {}, |b| b.service(Echo::default())).await;
    let b = start_node_built(TCP, |_| {}, |b| b).await;
    a.handle.connect(b.addr.clone()).await.expect("connect");
    let mine = a.handle.service::<Echo>().expect("registered");
    let answer = mine
        .ask(|tx| EchoCommand::Ask(b.handle.entity_id(), b"x".to_vec(), tx))
        .await
        .expect("node running");
    match answer {
        Err(NodeError::Rejected { code, .. }) => assert_eq!(code, "UNSUPPORTED_MSG_TYPE"),
        other => panic!("{other:?}"),
    }
    assert!(b.handle.service::<Echo>().is_none());
}

/// Claims a type the messaging service owns.
struct Thief;

impl Service for Thief {
    type Command = ();

    fn name(&self) -> &'static str {
        "thief"
    }

    fn routes(&self) -> Vec<Route> {
        vec![Route::sealed("message", Class::Task)]
    }
}

#[tokio::test]
async fn two_services_owning_one_type_is_a_start_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = peer_node::data_dir::init(dir.path(), peer_node::fresh_secrets).expect("init");
    let store = peer_node::store::Store::open(&dir.path().join(peer_node::data_dir::DB_FILE))
        .expect("store");
    let mut config = peer_node::Config {
        data_dir: dir.path().to_path_buf(),
        ..peer_node::Config::default()
    };
    config.network.listen = vec![TCP.parse().expect("addr")];
    let err = peer_node::node::Builder::new(config, secrets.identity, store)
        .service(Thief)
        .start()
        .expect_err("message is owned twice");
    let text = err.to_string();
    assert!(
        text.contains("message") && text.contains("messaging") && text.contains("thief"),
        "{text}"
    );
}
