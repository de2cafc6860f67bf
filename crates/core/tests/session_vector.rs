//! The secure-session test vectors published in `docs/PROTOCOL.md`: a complete
//! handshake with fixed secrets. If this test fails, the handshake, the key
//! schedule or the sealing changed, and the document must change with it.
//!
//! The values were checked against an independent implementation (Python
//! `cryptography` 48: X25519, Ed25519, HKDF-SHA256, HMAC-SHA256, AES-256-GCM).

use peer_core::session::keys::{self, Keys, Transcript};
use peer_core::session::{Config, Handshake, HandshakeId, Header, Message, Random, State};
use peer_core::{Identity, MsgType};

const NOW: u64 = 1_800_000_000_000;

const INITIATOR_ID: &str = "10ba682c8ad13513971e8b56881aab8bd702bb807796eca81932c735a94d6e6d";
const RESPONDER_ID: &str = "1325b850c2871916eae203f0efc3c8987f64e5e3cdb27679e6d1fa97808357e6";
const INITIATOR_EPHEMERAL: &str =
    "7b0d47d93427f8311160781c7c733fd89f88970aef490d8aa0ee19a4cb8a1b14";
const RESPONDER_EPHEMERAL: &str =
    "ff2ee45601ec1b67310c7790404585ae697331eee1c1f8cf2419731c1fff3e6b";
const TRANSCRIPT_HASH: &str = "d51231b585963a87976ae55694e506a899db7df46b4adc6c64ef4fe2c957e253";
const SHARED_SECRET: &str = "3c528e9fd39731b15d10de8feb5f71d3f65b73c993581dedb03315a9ed177730";
const KEY_I2R: &str = "1d4fe2d5c5befe0c23252d1a4c287975554fadd996c3a3d0c7e3af146accec47";
const KEY_R2I: &str = "f3939155287045b219d460db2453ed9961a56cc827681e8250d99d626b5d7186";
const CONFIRM_I: &str = "edb8a7bfd85b034039d7bbde0516904b8f00d4bdd948651e6833320f7e0d6045";
const CONFIRM_R: &str = "7d7546f8e35624ac00e77d619ddf74f2eb6d09b585825cee36018932df80553e";
const SESSION_ID: &str = "77777777-7777-4777-b777-777777777777";
const PAYLOADS: [&str; 6] = [
    concat!(
        "55555555555555555555555555555555",
        "7b0d47d93427f8311160781c7c733fd89f88970aef490d8aa0ee19a4cb8a1b14"
    ),
    concat!(
        "55555555555555555555555555555555",
        "ff2ee45601ec1b67310c7790404585ae697331eee1c1f8cf2419731c1fff3e6b",
        "6666666666666666666666666666666666666666666666666666666666666666"
    ),
    concat!(
        "55555555555555555555555555555555",
        "30a958cf33df6c95f58352e2bc388ae62141eb0f3b7e3d8418fd94a2b876cdc0",
        "3dd51dba11fefcbbe3a84547902a6dc9e83bddce9d2ada3c319f26dfdd694a02"
    ),
    concat!(
        "55555555555555555555555555555555",
        "7777777777774777b777777777777777",
        "2ce9fcfe0dc0d2596704bb06111a70d13553a0412b12df5edd96357e33ba7f46"
    ),
    concat!(
        "7777777777774777b777777777777777",
        "acd4e69cc17cd9e75b3f67358e3519c58ac548c765d8588ab03aa5cc9ca61891"
    ),
    "7777777777774777b777777777777777",
];
const AAD: &str = concat!(
    "706565722d70726f746f636f6c2f312e322f7365616c00",
    "7777777777774777b777777777777777",
    "0000000000000001",
    "10ba682c8ad13513971e8b56881aab8bd702bb807796eca81932c735a94d6e6d",
    "1325b850c2871916eae203f0efc3c8987f64e5e3cdb27679e6d1fa97808357e6",
    "07",
    "6d657373616765"
);
const NONCE: &str = "000000000000000000000001";
const SEALED: &str = "5e95660ed8fb97b929293cb2e027850b046069574feba7df395c36f3dc";

fn random(handshake_id: u8, ephemeral: u8, challenge: u8, session_id: u8) -> Random {
    let mut b = [0u8; Random::LEN];
    b[..16].fill(handshake_id);
    b[16..48].fill(ephemeral);
    b[48..80].fill(challenge);
    b[80..].fill(session_id);
    Random::from_bytes(&b)
}

fn check(name: &str, got: &str, pinned: &str) {
    println!("{name:<22} {got}");
    assert_eq!(got, pinned, "{name}");
}

#[test]
fn session_test_vector() {
    let a = Identity::from_secret(&[0x11; 32]);
    let b = Identity::from_secret(&[0x22; 32]);
    let config = Config::default();
    // The initiator uses handshake_id and ephemeral; the responder ephemeral,
    // challenge and session_id. The unused fields are zero.
    let mut ia = Handshake::initiator(
        config,
        a.entity_id(),
        b.entity_id(),
        random(0x55, 0x33, 0, 0),
    );
    let mut rb = Handshake::responder(
        config,
        b.entity_id(),
        a.entity_id(),
        random(0, 0x44, 0x66, 0x77),
    );

    let init = ia.start(NOW).expect("starts");
    let ack = rb
        .handle(NOW, &b, &a.public_key(), &init)
        .expect("ok")
        .expect("ack");
    let resp = ia
        .handle(NOW, &a, &b.public_key(), &ack)
        .expect("ok")
        .expect("response");
    let est = rb
        .handle(NOW, &b, &a.public_key(), &resp)
        .expect("ok")
        .expect("established");
    let conf = ia
        .handle(NOW, &a, &b.public_key(), &est)
        .expect("ok")
        .expect("confirm");
    let ready = rb
        .handle(NOW, &b, &a.public_key(), &conf)
        .expect("ok")
        .expect("ready");
    assert_eq!(ia.handle(NOW, &a, &b.public_key(), &ready), Ok(None));
    assert_eq!((ia.state(), rb.state()), (State::Ready, State::Ready));
    let mut sa = ia.poll_session().expect("initiator session");
    let sb = rb.poll_session().expect("responder session");

    // The same values from the building blocks.
    let ea = keys::ephemeral_public(&[0x33; 32]);
    let eb = keys::ephemeral_public(&[0x44; 32]);
    let th = Transcript {
        initiator: a.entity_id(),
        responder: b.entity_id(),
        initiator_ephemeral: ea,
        responder_ephemeral: eb,
        handshake_id: HandshakeId([0x55; 16]),
        challenge: [0x66; 32],
    }
    .hash();
    let shared = keys::shared_secret(&[0x33; 32], &eb).expect("contributory");
    assert_eq!(
        *shared,
        *keys::shared_secret(&[0x44; 32], &ea).expect("contributory")
    );
    let k = Keys::derive(&shared, &th).expect("keys");

    check(
        "initiator entity id",
        &a.entity_id().to_string(),
        INITIATOR_ID,
    );
    check(
        "responder entity id",
        &b.entity_id().to_string(),
        RESPONDER_ID,
    );
    check("initiator ephemeral", &hex::encode(ea), INITIATOR_EPHEMERAL);
    check("responder ephemeral", &hex::encode(eb), RESPONDER_EPHEMERAL);
    check("transcript hash", &hex::encode(th), TRANSCRIPT_HASH);
    check("shared secret", &hex::encode(*shared), SHARED_SECRET);
    check(
        "key i->r",
        &hex::encode(k.initiator_to_responder()),
        KEY_I2R,
    );
    check(
        "key r->i",
        &hex::encode(k.responder_to_initiator()),
        KEY_R2I,
    );
    check(
        "confirm key i",
        &hex::encode(k.initiator_confirm()),
        CONFIRM_I,
    );
    check(
        "confirm key r",
        &hex::encode(k.responder_confirm()),
        CONFIRM_R,
    );
    check("session id", &sa.id().to_string(), SESSION_ID);
    assert_eq!(sa.id(), sb.id());

    let msgs = [init, ack, resp, est, conf, ready];
    for (m, pinned) in msgs.iter().zip(PAYLOADS) {
        check(m.msg_type(), &hex::encode(m.encode()), pinned);
        let bytes = hex::decode(pinned).expect("hex");
        assert_eq!(Message::decode(m.msg_type(), &bytes), Ok(Some(*m)));
    }
    if let Message::Established(m) = &msgs[3] {
        assert_eq!(
            m.confirm,
            k.confirm_tag(peer_core::session::Role::Responder, &th, &m.session_id)
        );
    }

    // One sealed payload, initiator → responder, sequence number 1.
    let mt: MsgType = "message".parse().expect("valid");
    let header = Header {
        session_id: sa.id(),
        sender: a.entity_id(),
        recipient: b.entity_id(),
        msg_type: &mt,
    };
    let (seq, sealed) = sa.seal(NOW, &mt, br#"{"text":"hi"}"#).expect("seals");
    assert_eq!(seq, 1);
    check("aad (seq 1)", &hex::encode(header.associated_data(1)), AAD);
    check("nonce (seq 1)", &hex::encode(keys::nonce(1)), NONCE);
    check("sealed (seq 1)", &hex::encode(&sealed), SEALED);
    assert_eq!(
        sb.open(NOW, &mt, 1, &sealed).expect("opens"),
        br#"{"text":"hi"}"#
    );
}
