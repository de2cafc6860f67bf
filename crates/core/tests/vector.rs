//! The envelope test vector published in `docs/PROTOCOL.md`: if this test fails,
//! the wire format changed and the document must change with it.

use peer_core::{Draft, EntityId, Identity, MessageId, SessionId};

const SECRET: [u8; 32] = [0x11; 32];
const PUBLIC_KEY: &str = "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737";
const ENTITY_ID: &str = "10ba682c8ad13513971e8b56881aab8bd702bb807796eca81932c735a94d6e6d";
const ENCODED: &str = concat!(
    "03312e3207",
    "6d657373616765",
    "22222222222222222222222222222222",
    "10ba682c8ad13513971e8b56881aab8bd702bb807796eca81932c735a94d6e6d",
    "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737",
    "01",
    "3333333333333333333333333333333333333333333333333333333333333333",
    "01",
    "44444444444444444444444444444444",
    "0000000000000007",
    "000001a2155d7b4b",
    "55555555555555555555555555555555",
    "0000000d",
    "7b2274657874223a226869227d",
    "012679a84bc823362d66222f3fa3106f24f74cfe6c61ebd6d4ab49c2713139417757b6ec8a356b6c3d5d9d6d5ee1a6ecc0f95d8bd3d49d463d3683d17ddca50d"
);

fn vector() -> peer_core::Envelope {
    Draft {
        msg_type: "message".parse().expect("valid"),
        message_id: MessageId([0x22; 16]),
        recipient_id: Some(EntityId([0x33; 32])),
        session_id: Some(SessionId([0x44; 16])),
        sequence_num: 7,
        timestamp_ms: 1_795_654_777_675,
        nonce: [0x55; 16],
        payload: br#"{"text":"hi"}"#.to_vec(),
    }
    .sign(&Identity::from_secret(&SECRET))
}

#[test]
fn envelope_test_vector() {
    let env = vector();
    println!("public key {}", hex::encode(env.sender_key.0));
    println!("entity id  {}", env.sender_id);
    println!("encoded    {}", hex::encode(env.encode()));
    assert_eq!(hex::encode(env.sender_key.0), PUBLIC_KEY);
    assert_eq!(env.sender_id.to_string(), ENTITY_ID);
    assert_eq!(hex::encode(env.encode()), ENCODED);
    let decoded =
        peer_core::Envelope::decode(&hex::decode(ENCODED).expect("hex")).expect("decodes");
    assert!(decoded.verify());
}
