//! Messages between agents: the agent's sends (`NodeHandle::send`, of any
//! type; sealed if the type's route says so), and the application messages that
//! arrive, handed to the agent in their session's order. The service owns the
//! namespaced types (`chat.message`) too: the pipeline refuses one whose
//! namespace the node's card does not accept with `UNSUPPORTED_MSG_TYPE`.

use std::collections::HashMap;

use peer_core::rate::Class;
use peer_core::{EntityId, MsgType};

use crate::actor::Reply as Answerer;
use crate::node::{Delivered, Event, NodeError, ReplyView};
use crate::secure::parse_json;
use crate::service::{
    Answer, Context, Inbound, Namespaced, Outcome, Reply, RequestId, Route, Sealing, Service,
};
use crate::services::card::CardCell;

/// What the messaging service takes from handles.
#[derive(Debug)]
pub enum Command {
    /// Send `payload` as `msg_type` to `to`; answer once it is accepted or refused.
    Send {
        /// The recipient.
        to: EntityId,
        /// The message type.
        msg_type: MsgType,
        /// The payload.
        payload: Vec<u8>,
        /// Where the outcome goes.
        reply: Answerer<Delivered>,
    },
}

/// An agent's message on its way.
struct Sending {
    reply: Answerer<Delivered>,
    /// A sealed message's type and plaintext, kept so that it can be
    /// sent again, once, in a new session if the peer no longer has ours
    /// (it restarted, or expired the session first).
    resend: Option<(MsgType, Vec<u8>)>,
}

/// Sends the agent's messages and delivers application messages to it.
pub struct Messaging {
    sending: HashMap<RequestId, Sending>,
    /// The node's card, for the namespaces it accepts.
    card: CardCell,
    /// The rate class of namespaced types, by namespace (`task` if not named).
    classes: HashMap<String, Class>,
}

impl Messaging {
    /// The service, reading accepted namespaces from `card`, with `classes`
    /// for the namespaces not counted as `task`.
    pub fn new(card: CardCell, classes: HashMap<String, Class>) -> Self {
        Self {
            sending: HashMap::new(),
            card,
            classes,
        }
    }
}

impl std::fmt::Debug for Messaging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messaging")
            .field("sending", &self.sending.len())
            .finish()
    }
}

/// What the agent learns of an outcome.
fn delivered(outcome: Outcome) -> Result<Delivered, NodeError> {
    let message_id = outcome.message_id.to_string();
    match outcome.result? {
        Reply::Accepted => Ok(Delivered {
            message_id,
            reply: None,
        }),
        Reply::Envelope(env) => Ok(Delivered {
            message_id,
            reply: Some(ReplyView {
                msg_type: env.msg_type.to_string(),
                payload: serde_json::from_slice(&env.payload).unwrap_or(serde_json::Value::Null),
            }),
        }),
    }
}

impl Service for Messaging {
    type Command = Command;

    fn name(&self) -> &'static str {
        "messaging"
    }

    fn routes(&self) -> Vec<Route> {
        MsgType::APPLICATION
            .iter()
            .map(|t| Route::sealed(t, Class::Task))
            .collect()
    }

    fn namespaced(&self) -> Option<Namespaced> {
        Some(Namespaced {
            sealing: Sealing::Sealed,
            default_class: Class::Task,
            classes: self.classes.clone(),
            takes: {
                let card = self.card.clone();
                std::sync::Arc::new(move |ns: &str| card.accepts_namespace(ns))
            },
        })
    }

    fn on_envelope(&mut self, cx: &mut Context<'_>, msg: Inbound) -> Answer {
        match parse_json(msg.payload, cx.config().protocol.max_json_depth) {
            Ok(payload) => {
                let event = Event::message(msg.message_id, msg.from, &msg.msg_type, payload);
                match cx.deliver(event) {
                    Ok(()) => Answer::Accepted,
                    Err(full) => full.into(),
                }
            }
            Err(r) => r.into(),
        }
    }

    fn on_command(&mut self, cx: &mut Context<'_>, command: Command) {
        let Command::Send {
            to,
            msg_type,
            payload,
            reply,
        } = command;
        let resend = cx
            .is_sealed(&msg_type)
            .then(|| (msg_type.clone(), payload.clone()));
        let id = cx.send(to, msg_type, payload);
        self.sending.insert(id, Sending { reply, resend });
    }

    fn on_reply(&mut self, cx: &mut Context<'_>, id: RequestId, outcome: Outcome) {
        let Some(sending) = self.sending.remove(&id) else {
            return;
        };
        let to = outcome.to;
        if outcome.lost_session()
            && let Some((msg_type, payload)) = sending.resend
        {
            let id = cx.send(to, msg_type, payload);
            let again = Sending {
                reply: sending.reply,
                resend: None,
            };
            self.sending.insert(id, again);
            return;
        }
        let result = delivered(outcome);
        match &result {
            Ok(_) => cx.stats().sent(to),
            Err(NodeError::Rejected { code, .. }) => cx.stats().refused(to, code),
            Err(_) => {}
        }
        _ = sending.reply.send(result);
    }
}
