//! Handshake payload decoding and the session handshake state machine.
//!
//! (a) Every handshake payload encoding is canonical: for each of the six
//!     msg_types, bytes that decode re-encode to exactly themselves.
//! (b) The input is also a script that drives an honest initiator and a
//!     responder: deliver the next honest message either way, deliver a
//!     message decoded from the input (any type, either way), deliver an
//!     honest message with bits flipped, move the clock, fire the timers. No
//!     input panics; the states stay consistent; and when both sides reach
//!     READY their sessions are the two ends of one channel.
#![no_main]

use std::collections::VecDeque;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use peer_core::session::{Config, Handshake, Message, Random, Session, State};
use peer_core::{Identity, MsgType};

const NOW_MS: u64 = 1_800_000_000_000;

/// The initiator's and the responder's identities (derived once, not per input).
static IDS: LazyLock<(Identity, Identity)> = LazyLock::new(|| {
    (
        Identity::from_secret(&[0x11; 32]),
        Identity::from_secret(&[0x22; 32]),
    )
});

fn random(seed: u8) -> Random {
    let mut b = [0u8; Random::LEN];
    for (i, x) in b.iter_mut().enumerate() {
        *x = seed.wrapping_add(i as u8).wrapping_mul(3).wrapping_add(1);
    }
    Random::from_bytes(&b)
}

/// Reads `n` bytes of the script, or what is left.
fn take<'a>(script: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(script.len());
    let (head, tail) = script.split_at(n);
    *script = tail;
    head
}

fn byte(script: &mut &[u8]) -> u8 {
    take(script, 1).first().copied().unwrap_or(0)
}

fn check_consistent(h: &Handshake) {
    let s = h.state();
    assert_eq!(h.error().is_some(), s == State::Error);
    if matches!(s, State::Initial | State::Error | State::Expired) {
        assert_eq!(h.poll_timeout(), None);
    } else {
        assert!(h.poll_timeout().is_some(), "{s} without a timer");
    }
}

fn check_paired(a: &mut Session, b: &mut Session, now_ms: u64) {
    assert_eq!(a.id(), b.id());
    let mt: MsgType = "message".parse().expect("valid");
    let t = now_ms.min(a.expires_ms().min(b.expires_ms()) - 1);
    let (seq, c) = a.seal(t, &mt, b"ping").expect("seals");
    assert_eq!(b.open(t, &mt, seq, &c).expect("opens"), b"ping");
    let (seq, c) = b.seal(t, &mt, b"pong").expect("seals");
    assert_eq!(a.open(t, &mt, seq, &c).expect("opens"), b"pong");
}

fuzz_target!(|data: &[u8]| {
    // (a) canonical decoding.
    for t in Message::MSG_TYPES {
        if let Ok(Some(m)) = Message::decode(t, data) {
            assert_eq!(m.msg_type(), t);
            assert_eq!(m.encode(), data, "{t} decodes but is not canonical");
        }
    }

    // (b) the state machines.
    let (a, b) = &*IDS;
    let config = Config::default();
    let mut ini = Handshake::initiator(config, a.entity_id(), b.entity_id(), random(1));
    let mut res = Handshake::responder(config, b.entity_id(), a.entity_id(), random(2));
    let mut now = NOW_MS;
    let mut to_res: VecDeque<Message> = VecDeque::new();
    let mut to_ini: VecDeque<Message> = VecDeque::new();
    to_res.push_back(ini.start(now).expect("a fresh initiator starts"));
    let (mut sa, mut sb) = (None, None);

    let mut script = data;
    let mut steps = 0;
    while !script.is_empty() && steps < 64 {
        steps += 1;
        let op = byte(&mut script);
        // Which way a message goes: to the responder (even) or the initiator.
        let to_responder = op & 1 == 0;
        let msg = match (op >> 1) % 5 {
            // The next honest message.
            0 => {
                let q = if to_responder {
                    &mut to_res
                } else {
                    &mut to_ini
                };
                q.pop_front()
            }
            // A message decoded from the script.
            1 => {
                let t = Message::MSG_TYPES[usize::from(byte(&mut script)) % 6];
                let len = usize::from(byte(&mut script));
                Message::decode(t, take(&mut script, len)).ok().flatten()
            }
            // An honest message with bits flipped.
            2 => {
                let q = if to_responder { &to_res } else { &to_ini };
                q.front().and_then(|m| {
                    let mut bytes = m.encode();
                    let at = usize::from(byte(&mut script)) % bytes.len();
                    bytes[at] ^= byte(&mut script) | 1;
                    Message::decode(m.msg_type(), &bytes).ok().flatten()
                })
            }
            // Time passes: 0 to 65,535 ms, or an hour when the high byte is 0xff.
            3 => {
                let hi = u64::from(byte(&mut script));
                let lo = u64::from(byte(&mut script));
                now += if hi == 0xff { 3_600_000 } else { hi << 8 | lo };
                None
            }
            // The timers fire.
            _ => {
                ini.handle_timeout(now);
                res.handle_timeout(now);
                None
            }
        };
        if let Some(m) = msg {
            if to_responder {
                if let Ok(Some(reply)) = res.handle(now, b, &a.public_key(), &m) {
                    to_ini.push_back(reply);
                }
            } else if let Ok(Some(reply)) = ini.handle(now, a, &b.public_key(), &m) {
                to_res.push_back(reply);
            }
        }
        // Sticky errors: ERROR answers every input with the stored error.
        if let Some(e) = res.error().cloned() {
            let any = Message::decode("ready", &[0; 16])
                .ok()
                .flatten()
                .expect("decodes");
            assert_eq!(res.handle(now, b, &a.public_key(), &any), Err(e));
        }
        check_consistent(&ini);
        check_consistent(&res);
        if let Some(s) = ini.poll_session() {
            assert!(sa.is_none(), "two sessions from one attempt");
            sa = Some(s);
        }
        if let Some(s) = res.poll_session() {
            assert!(sb.is_none(), "two sessions from one attempt");
            sb = Some(s);
        }
    }
    if let (Some(x), Some(y)) = (&mut sa, &mut sb) {
        check_paired(x, y, now);
    }
});
