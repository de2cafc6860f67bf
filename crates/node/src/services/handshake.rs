//! The session handshake (PROTOCOL.md section 7): owns the six handshake
//! message types and drives the sessions of [`crate::secure`] with them. A
//! handshake starts when a sealed send finds no session: the outbound path
//! sends the first step on this service's behalf, and the replies come here.

use peer_core::rate::Class;
use peer_core::session::Message;
use peer_core::{EntityId, ErrorCode, MsgType, Rejection};

use crate::node::NodeError;
use crate::service::{Answer, Context, Inbound, Outcome, Reply, RequestId, Route, Service};

/// Runs handshakes, as initiator (our sends) and responder (the peer's).
#[derive(Debug, Default)]
pub struct Handshake;

fn decode(msg_type: &MsgType, payload: &[u8]) -> Result<Message, Rejection> {
    match Message::decode(msg_type.as_str(), payload) {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(Rejection::new(
            ErrorCode::UnsupportedMsgType,
            format!("{msg_type} is not a handshake message"),
        )),
        Err(e) => Err(Rejection::new(
            ErrorCode::MalformedMessage,
            format!("{msg_type} payload: {e}"),
        )),
    }
}

impl Handshake {
    /// Our handshake with `to` failed: the messages waiting for it fail too.
    fn failed(cx: &mut Context<'_>, to: EntityId, r: &Rejection) {
        let now = cx.now_ms();
        let failed = cx.sessions().fail_waiting(now, to, r);
        cx.fail(failed);
    }
}

impl Service for Handshake {
    type Command = ();

    fn name(&self) -> &'static str {
        "handshake"
    }

    fn routes(&self) -> Vec<Route> {
        Message::MSG_TYPES
            .iter()
            .map(|t| Route::plain(t, Class::Handshake))
            .collect()
    }

    /// A step of the peer's handshake (or of one that crossed ours): the next
    /// step goes back as the reply.
    fn on_envelope(&mut self, cx: &mut Context<'_>, msg: Inbound) -> Answer {
        let step = match decode(&msg.msg_type, &msg.payload) {
            Ok(step) => step,
            Err(r) => return r.into(),
        };
        let (now, identity) = (cx.now_ms(), cx.identity());
        match cx
            .sessions()
            .handshake(now, &identity, msg.from, &msg.sender_key, &step)
        {
            Ok((next, released)) => {
                cx.release(msg.from, released);
                match next {
                    Some(next) => Answer::Reply {
                        msg_type: next.msg_type().parse().expect("handshake types are valid"),
                        payload: next.encode(),
                    },
                    None => Answer::Accepted,
                }
            }
            Err(r) => r.into(),
        }
    }

    /// The peer's answer to one of our steps: its next step, or a refusal.
    fn on_reply(&mut self, cx: &mut Context<'_>, _id: RequestId, outcome: Outcome) {
        let to = outcome.to;
        let env = match outcome.result {
            Ok(Reply::Envelope(env)) => env,
            Ok(Reply::Accepted) => {
                let r = Rejection::new(
                    ErrorCode::InvalidState,
                    "handshake step answered without a reply",
                );
                return Self::failed(cx, to, &r);
            }
            Err(NodeError::Rejected { code, reason, .. }) => {
                let code = ErrorCode::from_wire(&code).unwrap_or(ErrorCode::InvalidState);
                let now = cx.now_ms();
                let failed =
                    cx.sessions()
                        .handshake_refused(now, to, &Rejection::new(code, reason));
                return cx.fail(failed);
            }
            Err(e) => {
                let r = Rejection::new(ErrorCode::InvalidState, e.to_string());
                return Self::failed(cx, to, &r);
            }
        };
        let step = match decode(&env.msg_type, &env.payload) {
            Ok(step) => step,
            Err(r) => return Self::failed(cx, to, &r),
        };
        let (now, identity) = (cx.now_ms(), cx.identity());
        match cx
            .sessions()
            .handshake(now, &identity, to, &env.sender_key, &step)
        {
            Ok((next, released)) => {
                if let Some(next) = next {
                    cx.send_handshake(to, &next);
                }
                cx.release(to, released);
            }
            Err(r) => Self::failed(cx, to, &r),
        }
    }
}
