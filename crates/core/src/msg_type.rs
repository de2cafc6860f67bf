//! Message types: short lowercase names such as `ping` or `task_delegate`.

use std::fmt;
use std::str::FromStr;

/// A message type name: 1 to 64 bytes of `a-z`, `0-9`, `_` and `.`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgType(Box<str>);

/// Longest message type name, in bytes.
pub const MAX_LEN: usize = 64;

/// Why a string is not a message type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a msg_type is 1 to 64 characters of a-z, 0-9, '_' and '.', got {0:?}")]
pub struct ParseMsgTypeError(pub String);

impl MsgType {
    /// Liveness probe; answered with [`MsgType::PONG`].
    pub const PING: &'static str = "ping";
    /// Answer to a ping.
    pub const PONG: &'static str = "pong";
    /// A rejection; its payload carries the error code.
    pub const ERROR: &'static str = "error";

    /// Asks a peer for its capability card.
    pub const CAPABILITY_QUERY: &'static str = "capability_query";
    /// A signed capability card: the reply to a query, or pushed when it changes.
    pub const CAPABILITY_RESPONSE: &'static str = "capability_response";

    /// The built-in message types delivered to the local agent (over
    /// `/v1/events`) as they are once verified, also as chunked transfers.
    /// Namespaced types ([`MsgType::namespace`]) are application types too.
    /// Every other type is handled by the node itself (`wake_up` and
    /// `status_report` by its heartbeat service, which delivers them too; the
    /// card messages by its card service; the `task_*` messages by its tasks
    /// service) or refused with
    /// `UNSUPPORTED_MSG_TYPE`.
    pub const APPLICATION: [&'static str; 1] = ["message"];

    /// Whether this type goes to the local agent: a built-in application type
    /// or a namespaced one.
    pub fn is_application(&self) -> bool {
        Self::APPLICATION.contains(&self.as_str()) || self.namespace().is_some()
    }

    /// The namespace of an application-defined type: the part before its
    /// first dot (`chat` for `chat.message`); `None` for a type without a dot.
    /// It may be empty (`.x`), which no card accepts.
    pub fn namespace(&self) -> Option<&str> {
        self.0.split_once('.').map(|(ns, _)| ns)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `s` is a valid message type name.
    pub fn is_valid(s: &str) -> bool {
        (1..=MAX_LEN).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
    }
}

impl FromStr for MsgType {
    type Err = ParseMsgTypeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if Self::is_valid(s) {
            Ok(Self(s.into()))
        } else {
            Err(ParseMsgTypeError(s.to_owned()))
        }
    }
}

impl PartialEq<str> for MsgType {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl fmt::Display for MsgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MsgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MsgType({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_protocol_names_and_rejects_others() {
        for ok in ["ping", "task_delegate", "app.chat", "a", &"x".repeat(64)] {
            assert!(ok.parse::<MsgType>().is_ok(), "{ok}");
        }
        for bad in ["", "Ping", "a b", "é", &"x".repeat(65)] {
            assert!(bad.parse::<MsgType>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_dotted_type_is_an_application_type_of_its_namespace() {
        let t = |s: &str| s.parse::<MsgType>().expect("valid");
        assert_eq!(t("chat.message").namespace(), Some("chat"));
        assert_eq!(t("a.b.c").namespace(), Some("a"));
        assert_eq!(t(".x").namespace(), Some(""));
        assert_eq!(t("message").namespace(), None);
        assert!(t("chat.message").is_application() && t("message").is_application());
        assert!(!t("ping").is_application() && !t(MsgType::CAPABILITY_QUERY).is_application());
    }
}
