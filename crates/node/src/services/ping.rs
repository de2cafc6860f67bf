//! `ping`: answered with a `pong` carrying the ping's payload.

use peer_core::MsgType;
use peer_core::rate::Class;

use crate::service::{Answer, Context, Inbound, Route, Service};

/// Answers pings.
#[derive(Debug, Default)]
pub struct Ping;

impl Service for Ping {
    type Command = ();

    fn name(&self) -> &'static str {
        "ping"
    }

    fn routes(&self) -> Vec<Route> {
        vec![Route::plain(MsgType::PING, Class::Heartbeat)]
    }

    fn on_envelope(&mut self, _cx: &mut Context<'_>, msg: Inbound) -> Answer {
        Answer::Reply {
            msg_type: MsgType::PONG.parse().expect("valid"),
            payload: msg.payload,
        }
    }
}
