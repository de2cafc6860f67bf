//! Embedding the node as a library: two nodes in one process, on 127.0.0.1.
//! Bob's agent offers the skill `reverse` on his card and serves it from his
//! node's event stream; Alice's agent delegates a task to him and waits for
//! the result.
//!
//! ```sh
//! cargo run -p peer-node --example embedded
//! ```

use std::time::Duration;

use anyhow::{Context, Result, bail};
use peer_node::node::{Builder, Event, NewTask, NodeHandle, TaskChange};
use peer_node::services::card::Skill;
use peer_node::services::tasks::task::{Role, State};
use peer_node::store::Store;
use peer_node::{Config, data_dir};
use serde_json::json;

/// Starts a node with its data in `dir`, listening on a free port.
async fn start(dir: &std::path::Path, skills: Vec<Skill>) -> Result<NodeHandle> {
    let mut config = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    config.network.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    config.card.name = Some(format!("example {}", dir.display()));
    config.card.skills = skills;
    let secrets = data_dir::init(dir, peer_node::fresh_secrets)?;
    let store = Store::open(&dir.join(data_dir::DB_FILE))?;
    let node = Builder::new(config, secrets.identity, store).start()?;
    Ok(node)
}

/// Bob's agent: takes each task as it arrives, reports it working, and
/// completes it with the input's text reversed. Acknowledges what it read.
async fn serve(node: NodeHandle) -> Result<()> {
    let mut events = node.subscribe();
    loop {
        let event = events.recv().await?;
        let Event::TaskUpdate { event_id, task } = event else {
            continue;
        };
        if task.role == Role::Assignee && task.state == State::Submitted {
            let task_id = task.task_id.clone();
            node.change_task(TaskChange::Status {
                task_id: task_id.clone(),
                state: State::Working,
                message: None,
            })
            .await?;
            let text = task.input["text"].as_str().unwrap_or_default();
            let reversed: String = text.chars().rev().collect();
            node.change_task(TaskChange::Complete {
                task_id,
                output: json!({ "text": reversed }),
                artifacts: vec![],
            })
            .await?;
        }
        if let Some(id) = event_id {
            node.ack(id).await?;
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let reverse = Skill {
        id: "reverse".into(),
        name: "Reverse".into(),
        description: "reverses a text".into(),
        tags: vec!["text".into()],
        input_modes: vec!["application/json".into()],
        output_modes: vec!["application/json".into()],
        examples: vec![r#"{"text": "hello"}"#.into()],
    };
    let alice = start(&tmp.path().join("alice"), vec![]).await?;
    let bob = start(&tmp.path().join("bob"), vec![reverse]).await?;
    tokio::spawn(serve(bob.clone()));

    let bob_addr = loop {
        if let Some(addr) = bob.listen_addrs().await?.into_iter().next() {
            break addr;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    alice.connect(bob_addr).await.context("connect to Bob")?;

    let mut updates = alice.subscribe();
    let task = alice
        .delegate(NewTask {
            to: bob.entity_id(),
            skill: "reverse".into(),
            input: json!({ "text": "peer protocol" }),
            deadline_s: Some(30),
            priority: None,
        })
        .await?;
    println!("delegated task {} to {}", task.task_id, bob.entity_id());
    let done = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Event::TaskUpdate { task: t, .. } = updates.recv().await?
                && t.task_id == task.task_id
            {
                println!("  {}", t.state.as_str());
                if t.state.is_terminal() {
                    return Ok::<_, anyhow::Error>(t);
                }
            }
        }
    })
    .await
    .context("no result within 30 s")??;
    if done.state != State::Completed {
        bail!("the task ended {}: {:?}", done.state.as_str(), done.message);
    }
    println!("result: {}", done.output.unwrap_or_default());
    Ok(())
}
