//! The capability card: its content, how it is signed, and the checks a
//! peer's card passes before it is believed. Pure: the time is passed in.
//!
//! On the wire a card is the JSON object `{"card": {...}, "signature": "<hex>"}`.
//! The signature is Ed25519, by the entity's key, over [`DOMAIN`] followed by
//! the exact bytes of the `card` object as they stand in that payload (from
//! its `{` to its `}`). A receiver verifies the bytes it received, so no
//! canonical form is needed; it keeps and shows them verbatim.

use std::collections::BTreeMap;

use peer_core::{EntityId, ErrorCode, Identity, MsgType, PublicKey, Rejection};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// What precedes the card's bytes in the signed message.
pub const DOMAIN: &[u8] = b"peer-protocol/1.2/capability-card\0";

/// The version-1.2 features a card can list; a node uses one with a peer only
/// if the peer's card (when known) lists it.
pub const FEATURES: [&str; 3] = ["sealed-sessions", "chunked-transfer", "app-types"];

/// The feature that namespaced (application-defined) message types need.
pub const APP_TYPES: &str = "app-types";

/// Longest namespace, in bytes.
const MAX_NAMESPACE: usize = 32;

/// One thing the agent can be asked to do (an A2A AgentSkill).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skill {
    /// Unique in the card.
    pub id: String,
    /// For people.
    #[serde(default)]
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// Keywords.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Media types it takes, if not the defaults.
    #[serde(default)]
    pub input_modes: Vec<String>,
    /// Media types it gives, if not the defaults.
    #[serde(default)]
    pub output_modes: Vec<String>,
    /// Example requests.
    #[serde(default)]
    pub examples: Vec<String>,
}

/// What the agent sets (`PUT /v1/card`, or the `[card]` configuration); the
/// node adds the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardContent {
    /// The agent's name.
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// Its own version.
    #[serde(default)]
    pub version: String,
    /// What it can be asked to do.
    #[serde(default)]
    pub skills: Vec<Skill>,
    /// Namespaces of the application-defined message types it takes.
    #[serde(default)]
    pub accepts: Vec<String>,
}

/// Whether `ns` can be a namespace: 1 to 32 bytes of `a-z`, `0-9`, `_`.
pub fn check_namespace(ns: &str) -> Result<(), String> {
    let ok = (1..=MAX_NAMESPACE).contains(&ns.len())
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a namespace is 1 to {MAX_NAMESPACE} characters of a-z, 0-9 and '_', got {ns:?}"
        ))
    }
}

impl CardContent {
    /// The content without a name, as a node starts with when none was set.
    pub fn unnamed() -> Self {
        Self {
            name: String::new(),
            description: String::new(),
            version: String::new(),
            skills: Vec::new(),
            accepts: Vec::new(),
        }
    }

    /// Checks the namespaces, and that skill ids are set and unique.
    pub fn validate(&self) -> Result<(), String> {
        for ns in &self.accepts {
            check_namespace(ns).map_err(|e| format!("accepts: {e}"))?;
        }
        let mut ids = std::collections::HashSet::new();
        for skill in &self.skills {
            if skill.id.is_empty() {
                return Err("skills: every skill needs an id".into());
            }
            if !ids.insert(&skill.id) {
                return Err(format!("skills: the id {:?} is used twice", skill.id));
            }
        }
        Ok(())
    }
}

/// One rate class's bucket, as a card shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaView {
    /// Messages a minute, sustained.
    pub per_minute: u32,
    /// Messages at once after a quiet while.
    pub burst: u32,
}

/// The limits a node applies to what peers send it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CardLimits {
    /// Largest envelope, in bytes.
    pub max_envelope_size: u64,
    /// Largest message, sent whole or as a chunked transfer, in bytes.
    pub max_message_size: u64,
    /// Largest message sent in one envelope; larger ones go as transfers.
    pub chunk_size: u64,
    /// Deepest nesting of arrays and objects in an application payload.
    pub max_json_depth: u64,
    /// Largest card payload it takes.
    pub max_card_bytes: u64,
    /// Its buckets per sender, by class; empty if it enforces none.
    pub rate_limits: BTreeMap<String, QuotaView>,
}

/// A capability card, as signed. A peer's card is read leniently: fields
/// this node does not know are ignored (and kept in the bytes it shows), and
/// only the identity, time and sequence are required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Card {
    /// The entity whose card it is.
    pub entity_id: EntityId,
    /// Its Ed25519 public key, hex; SHA-256 of it is `entity_id`.
    pub public_key: String,
    /// The agent's name.
    #[serde(default)]
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// The agent's own version.
    #[serde(default)]
    pub version: String,
    /// What it can be asked to do.
    #[serde(default)]
    pub skills: Vec<Skill>,
    /// Namespaces of the application-defined types it takes.
    #[serde(default)]
    pub accepts: Vec<String>,
    /// Peer Protocol versions it speaks.
    #[serde(default)]
    pub protocol_versions: Vec<String>,
    /// The message types it takes as requests.
    #[serde(default)]
    pub message_types: Vec<String>,
    /// Version-1.2 features it supports ([`FEATURES`]).
    #[serde(default)]
    pub features: Vec<String>,
    /// Cryptographic algorithms it uses.
    #[serde(default)]
    pub crypto: Vec<String>,
    /// Its limits.
    #[serde(default)]
    pub limits: CardLimits,
    /// When it was signed, ms since the Unix epoch.
    pub issued_at_ms: u64,
    /// Increases with every new card of the entity.
    pub sequence: u64,
}

impl Card {
    /// Whether the card takes namespaced types of namespace `ns`.
    pub fn accepts(&self, ns: &str) -> bool {
        self.accepts.iter().any(|a| a == ns)
    }

    /// Whether the card lists feature `f`.
    /// Whether a node may send `msg_type` to the card's entity: a type the
    /// card lists, or a namespaced type of a namespace it accepts (with the
    /// `app-types` feature); `UNSUPPORTED_MSG_TYPE` ("not sent: …")
    /// otherwise, so a type only v1.2 has is not tried on a peer without it.
    pub fn may_send(&self, msg_type: &MsgType) -> Result<(), Rejection> {
        if self.message_types.iter().any(|t| t == msg_type.as_str()) {
            return Ok(());
        }
        let what = match msg_type.namespace() {
            Some(ns) if self.has_feature(APP_TYPES) && self.accepts(ns) => return Ok(()),
            Some(ns) => format!("does not accept the namespace {ns:?}"),
            None => format!("does not list {msg_type}"),
        };
        Err(Rejection::new(
            ErrorCode::UnsupportedMsgType,
            format!(
                "not sent: the card of {} (sequence {}) {what}",
                self.entity_id, self.sequence
            ),
        ))
    }

    /// Whether the card lists feature `f`.
    pub fn has_feature(&self, f: &str) -> bool {
        self.features.iter().any(|x| x == f)
    }
}

/// What a node states about itself in its card, beside the agent's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// The message types it takes as requests.
    pub message_types: Vec<String>,
    /// Its limits.
    pub limits: CardLimits,
}

/// The card of `identity` with `content` and `facts`.
pub fn build(
    identity: &Identity,
    content: &CardContent,
    facts: &NodeFacts,
    issued_at_ms: u64,
    sequence: u64,
) -> Card {
    Card {
        entity_id: identity.entity_id(),
        public_key: hex::encode(identity.public_key().0),
        name: content.name.clone(),
        description: content.description.clone(),
        version: content.version.clone(),
        skills: content.skills.clone(),
        accepts: content.accepts.clone(),
        protocol_versions: vec![peer_core::PROTOCOL_VERSION.to_owned()],
        message_types: facts.message_types.clone(),
        features: FEATURES.iter().map(|f| (*f).to_owned()).collect(),
        crypto: ["ed25519", "sha256", "x25519", "hkdf-sha256", "aes-256-gcm"]
            .iter()
            .map(|c| (*c).to_owned())
            .collect(),
        limits: facts.limits.clone(),
        issued_at_ms,
        sequence,
    }
}

/// A card and its signature, with the exact bytes that were signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCard {
    card: Card,
    raw: String,
    signature: [u8; 64],
}

/// The bytes a card's signature covers: [`DOMAIN`] ‖ the card's JSON bytes.
pub fn signed_bytes(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DOMAIN.len() + raw.len());
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(raw);
    out
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    card: &'a RawValue,
    signature: String,
}

fn malformed(why: impl std::fmt::Display) -> Rejection {
    Rejection::new(
        ErrorCode::MalformedMessage,
        format!("capability card: {why}"),
    )
}

impl SignedCard {
    /// `card`, serialised and signed by `identity`.
    pub fn sign(card: Card, identity: &Identity) -> Self {
        let raw = serde_json::to_string(&card).expect("a card serialises");
        let signature = identity.sign(&signed_bytes(raw.as_bytes()));
        Self {
            card,
            raw,
            signature,
        }
    }

    /// Reads a `capability_response` payload of at most `max_bytes` bytes
    /// (`MESSAGE_TOO_LARGE` beyond), without checking it (see [`accept`]).
    pub fn parse(payload: &[u8], max_bytes: usize) -> Result<Self, Rejection> {
        if payload.len() > max_bytes {
            return Err(Rejection::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "capability card of {} bytes; this node takes at most {max_bytes} (card.max_bytes)",
                    payload.len()
                ),
            ));
        }
        let wire: Wire = serde_json::from_slice(payload).map_err(malformed)?;
        let card: Card = serde_json::from_str(wire.card.get()).map_err(malformed)?;
        let mut signature = [0u8; 64];
        hex::decode_to_slice(&wire.signature, &mut signature)
            .map_err(|_| malformed("the signature is not 128 hex digits"))?;
        Ok(Self {
            card,
            raw: wire.card.get().to_owned(),
            signature,
        })
    }

    /// The card.
    pub fn card(&self) -> &Card {
        &self.card
    }

    /// The card's JSON bytes, as signed.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// The signature, hex.
    pub fn signature_hex(&self) -> String {
        hex::encode(self.signature)
    }

    /// The wire form: `{"card":<the signed bytes>,"signature":"<hex>"}`.
    pub fn to_payload(&self) -> Vec<u8> {
        format!(
            r#"{{"card":{},"signature":"{}"}}"#,
            self.raw,
            self.signature_hex()
        )
        .into_bytes()
    }

    /// Checks that the card is `from`'s and signed by it, and not issued more
    /// than `tolerance_ms` after `now_ms` (Unix ms).
    pub fn verify(&self, from: &EntityId, now_ms: u64, tolerance_ms: u64) -> Result<(), Rejection> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(&self.card.public_key, &mut key)
            .map_err(|_| malformed("public_key is not 64 hex digits"))?;
        let key = PublicKey(key);
        if EntityId::of(&key) != self.card.entity_id {
            return Err(Rejection::new(
                ErrorCode::UnknownSender,
                "capability card: entity_id is not SHA-256 of its public_key",
            ));
        }
        if self.card.entity_id != *from {
            return Err(Rejection::new(
                ErrorCode::WrongSender,
                format!(
                    "capability card of {} sent by {from}; a node sends only its own card",
                    self.card.entity_id
                ),
            ));
        }
        if !peer_core::identity::verify(&key, &signed_bytes(self.raw.as_bytes()), &self.signature) {
            return Err(Rejection::new(
                ErrorCode::InvalidSignature,
                "capability card: the signature does not verify",
            ));
        }
        let latest = now_ms.saturating_add(tolerance_ms);
        if self.card.issued_at_ms > latest {
            return Err(Rejection::new(
                ErrorCode::ReplayDetected,
                format!(
                    "capability card issued at {} ms, {} ms in the future; the tolerance is {tolerance_ms} ms",
                    self.card.issued_at_ms,
                    self.card.issued_at_ms - now_ms
                ),
            ));
        }
        Ok(())
    }

    /// Whether this card replaces `held` (the one known of its entity):
    /// `Ok(true)` if it is newer or none is held, `Ok(false)` if it is the
    /// same card; refused if older (`REPLAY_DETECTED`), or of the same sequence
    /// with other bytes (`INVALID_STATE`).
    pub fn supersedes(&self, held: Option<&SignedCard>) -> Result<bool, Rejection> {
        let Some(held) = held else {
            return Ok(true);
        };
        let (new, old) = (self.card.sequence, held.card.sequence);
        if new > old {
            Ok(true)
        } else if new < old {
            Err(Rejection::new(
                ErrorCode::ReplayDetected,
                format!("capability card sequence {new} is older than the one held ({old})"),
            ))
        } else if self.raw == held.raw {
            Ok(false)
        } else {
            Err(Rejection::new(
                ErrorCode::InvalidState,
                format!(
                    "another capability card of sequence {new} is held; a new card needs a higher sequence"
                ),
            ))
        }
    }
}

/// The limits a received card is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Largest payload (`card.max_bytes`).
    pub max_bytes: usize,
    /// How far in the future `issued_at_ms` may be (the timestamp tolerance).
    pub tolerance_ms: u64,
}

/// Checks a `capability_response` payload from `from` against the card held
/// of it: `Some` card if it is new, `None` if it is the one held.
pub fn accept(
    payload: &[u8],
    from: &EntityId,
    held: Option<&SignedCard>,
    now_ms: u64,
    rules: Rules,
) -> Result<Option<SignedCard>, Rejection> {
    let card = SignedCard::parse(payload, rules.max_bytes)?;
    card.verify(from, now_ms, rules.tolerance_ms)?;
    Ok(card.supersedes(held)?.then_some(card))
}

/// The A2A document with this protocol's signed card beside.
#[derive(Serialize)]
struct AgentCard<'a> {
    #[serde(flatten)]
    a2a: serde_json::Value,
    /// The wire form, its card's bytes exactly as signed.
    #[serde(rename = "peerProtocol")]
    peer_protocol: &'a RawValue,
}

/// The card in the A2A Agent Card form (camelCase), JSON, with this
/// protocol's signed card beside as `peerProtocol`, its bytes exactly as
/// signed so that a reader can check the signature (A2A clients ignore
/// fields they do not know).
pub fn agent_card(signed: &SignedCard) -> Vec<u8> {
    let c = signed.card();
    let modes = vec!["application/json".to_owned()];
    let skills: Vec<serde_json::Value> = c
        .skills
        .iter()
        .map(|s| {
            let mut v = serde_json::json!({
                "id": s.id, "name": s.name, "description": s.description,
                "tags": s.tags, "examples": s.examples,
            });
            if !s.input_modes.is_empty() {
                v["inputModes"] = serde_json::json!(s.input_modes);
            }
            if !s.output_modes.is_empty() {
                v["outputModes"] = serde_json::json!(s.output_modes);
            }
            v
        })
        .collect();
    let a2a = serde_json::json!({
        "name": c.name,
        "description": c.description,
        "version": c.version,
        "supportedInterfaces": [{
            "url": format!("peer:{}", c.entity_id),
            "protocolBinding": "PEER",
            "protocolVersion": peer_core::PROTOCOL_VERSION,
        }],
        "capabilities": {"streaming": true, "pushNotifications": false},
        "defaultInputModes": modes,
        "defaultOutputModes": modes,
        "skills": skills,
    });
    let payload = String::from_utf8(signed.to_payload()).expect("a card is UTF-8");
    let peer_protocol = RawValue::from_string(payload).expect("the wire form is JSON");
    serde_json::to_vec(&AgentCard {
        a2a,
        peer_protocol: &peer_protocol,
    })
    .expect("an agent card serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;
    const RULES: Rules = Rules {
        max_bytes: 16 * 1024,
        tolerance_ms: 60_000,
    };

    fn facts() -> NodeFacts {
        NodeFacts {
            message_types: vec!["message".into(), "ping".into()],
            limits: CardLimits::default(),
        }
    }

    fn content(accepts: &[&str]) -> CardContent {
        CardContent {
            name: "summariser".into(),
            accepts: accepts.iter().map(|s| (*s).to_owned()).collect(),
            ..CardContent::unnamed()
        }
    }

    fn signed(id: &Identity, seq: u64, issued: u64) -> SignedCard {
        SignedCard::sign(build(id, &content(&["chat"]), &facts(), issued, seq), id)
    }

    #[test]
    fn a_peer_is_sent_only_the_types_its_card_lists_or_accepts() {
        let id = Identity::from_secret(&[1; 32]);
        let card = signed(&id, 1, NOW);
        let c = card.card();
        let t = |s: &str| -> MsgType { s.parse().expect("valid") };
        assert!(c.may_send(&t("message")).is_ok(), "listed");
        assert!(
            c.may_send(&t("chat.message")).is_ok(),
            "an accepted namespace"
        );
        for refused in ["task_delegate", "acme.quote"] {
            let e = c.may_send(&t(refused)).expect_err(refused);
            assert_eq!(e.code, ErrorCode::UnsupportedMsgType);
            assert!(e.reason.starts_with("not sent: "), "{}", e.reason);
        }
    }

    #[test]
    fn a_signed_card_verifies_over_its_exact_bytes() {
        let id = Identity::from_secret(&[1; 32]);
        let card = signed(&id, 1, NOW);
        let payload = card.to_payload();
        let got = accept(&payload, &id.entity_id(), None, NOW, RULES)
            .expect("valid")
            .expect("new");
        assert_eq!(got, card);
        assert!(got.card().accepts("chat") && !got.card().accepts("acme"));
        assert!(got.card().has_feature(APP_TYPES));
        // The signed bytes are the domain and the card object, as carried.
        let sig = hex::decode(got.signature_hex()).expect("hex");
        let sig: [u8; 64] = sig.try_into().expect("64");
        assert!(peer_core::identity::verify(
            &id.public_key(),
            &[DOMAIN, got.raw().as_bytes()].concat(),
            &sig
        ));
        // Whitespace is part of the bytes: the same card re-spaced fails.
        let text = String::from_utf8(payload).expect("utf8");
        let spaced = text.replacen(r#""name":"#, r#""name": "#, 1);
        let e = accept(spaced.as_bytes(), &id.entity_id(), None, NOW, RULES).expect_err("bytes");
        assert_eq!(e.code, ErrorCode::InvalidSignature);
    }

    #[test]
    fn a_card_signed_by_another_key_or_for_another_entity_is_refused() {
        let (a, b) = (
            Identity::from_secret(&[1; 32]),
            Identity::from_secret(&[2; 32]),
        );
        // A's card content, signed by B: the key is A's, the signature B's.
        let card = build(&a, &content(&[]), &facts(), NOW, 1);
        let raw = serde_json::to_string(&card).expect("json");
        let forged = format!(
            r#"{{"card":{raw},"signature":"{}"}}"#,
            hex::encode(b.sign(&signed_bytes(raw.as_bytes())))
        );
        let e = accept(forged.as_bytes(), &a.entity_id(), None, NOW, RULES).expect_err("forged");
        assert_eq!(e.code, ErrorCode::InvalidSignature);
        // B's key with A's entity id: the key does not hash to the id.
        let mut card = build(&b, &content(&[]), &facts(), NOW, 1);
        card.entity_id = a.entity_id();
        let e = accept(
            &SignedCard::sign(card, &b).to_payload(),
            &a.entity_id(),
            None,
            NOW,
            RULES,
        )
        .expect_err("unbound key");
        assert_eq!(e.code, ErrorCode::UnknownSender);
        // B's own card, sent as A's.
        let e = accept(
            &signed(&b, 1, NOW).to_payload(),
            &a.entity_id(),
            None,
            NOW,
            RULES,
        )
        .expect_err("not the sender's");
        assert_eq!(e.code, ErrorCode::WrongSender);
    }

    #[test]
    fn sequences_only_go_up() {
        let id = Identity::from_secret(&[1; 32]);
        let from = id.entity_id();
        let held = signed(&id, 5, NOW);
        let check = |c: &SignedCard| accept(&c.to_payload(), &from, Some(&held), NOW, RULES);
        assert!(check(&signed(&id, 6, NOW)).expect("newer").is_some());
        assert_eq!(check(&held).expect("same"), None);
        let older = check(&signed(&id, 4, NOW)).expect_err("older");
        assert_eq!(older.code, ErrorCode::ReplayDetected);
        let other = check(&signed(&id, 5, NOW + 1)).expect_err("same sequence, other bytes");
        assert_eq!(other.code, ErrorCode::InvalidState);
    }

    #[test]
    fn a_card_from_the_future_or_too_large_is_refused() {
        let id = Identity::from_secret(&[1; 32]);
        let from = id.entity_id();
        let edge = signed(&id, 1, NOW + RULES.tolerance_ms);
        assert!(accept(&edge.to_payload(), &from, None, NOW, RULES).is_ok());
        let late = signed(&id, 1, NOW + RULES.tolerance_ms + 1);
        let e = accept(&late.to_payload(), &from, None, NOW, RULES).expect_err("future");
        assert_eq!(e.code, ErrorCode::ReplayDetected);
        let payload = signed(&id, 1, NOW).to_payload();
        let tight = Rules {
            max_bytes: payload.len() - 1,
            ..RULES
        };
        let e = accept(&payload, &from, None, NOW, tight).expect_err("large");
        assert_eq!(e.code, ErrorCode::MessageTooLarge);
        let e = accept(b"{}", &from, None, NOW, RULES).expect_err("not a card");
        assert_eq!(e.code, ErrorCode::MalformedMessage);
    }

    #[test]
    fn content_checks_namespaces_and_skill_ids() {
        assert!(content(&["chat", "acme_2"]).validate().is_ok());
        for bad in ["", "Chat", "a.b", &"x".repeat(33)] {
            assert!(content(&[bad]).validate().is_err(), "{bad:?}");
        }
        let skill = |id: &str| Skill {
            id: id.into(),
            name: String::new(),
            description: String::new(),
            tags: vec![],
            input_modes: vec![],
            output_modes: vec![],
            examples: vec![],
        };
        let mut c = content(&[]);
        c.skills = vec![skill("a"), skill("a")];
        assert!(c.validate().is_err());
        c.skills = vec![skill("")];
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_agent_card_has_a2a_names_and_the_signed_card_beside() {
        let id = Identity::from_secret(&[1; 32]);
        let mut c = content(&[]);
        c.skills = vec![Skill {
            id: "sum".into(),
            name: "Summarise".into(),
            description: "d".into(),
            tags: vec!["text".into()],
            input_modes: vec!["text/plain".into()],
            output_modes: vec![],
            examples: vec![],
        }];
        let card = SignedCard::sign(build(&id, &c, &facts(), NOW, 3), &id);
        let bytes = agent_card(&card);
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
        assert_eq!(v["name"], "summariser");
        assert_eq!(v["skills"][0]["inputModes"][0], "text/plain");
        assert!(v["skills"][0].get("outputModes").is_none());
        assert_eq!(v["defaultInputModes"][0], "application/json");
        assert_eq!(v["peerProtocol"]["card"]["sequence"], 3);
        assert!(v.get("supportedInterfaces").is_some() && v.get("capabilities").is_some());
        // The signed card is there byte for byte, so its signature checks.
        let text = String::from_utf8(bytes).expect("utf8");
        assert!(text.contains(&format!(r#""peerProtocol":{{"card":{},"#, card.raw())));
    }
}
