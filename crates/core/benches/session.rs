//! Criterion benchmarks for the secure-session layer: a whole six-step handshake
//! between two in-memory machines (envelope signing excluded: the node adds one
//! Ed25519 signature and verification per step), and AES-256-GCM sealing and
//! opening of session payloads next to the raw cipher.

use std::hint::black_box;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use peer_core::session::{self, Handshake, Message, Random, Session};
use peer_core::{Identity, MsgType};

const NOW: u64 = 1_800_000_000_000;

fn random(seed: u8) -> Random {
    let mut b = [0u8; Random::LEN];
    for (i, x) in b.iter_mut().enumerate() {
        *x = seed.wrapping_mul(151).wrapping_add(i as u8).wrapping_add(1);
    }
    Random::from_bytes(&b)
}

/// Runs a complete handshake; returns both sessions.
fn handshake(a: &Identity, b: &Identity, seed: u8) -> (Session, Session) {
    let config = session::Config::default();
    let mut i = Handshake::initiator(config, a.entity_id(), b.entity_id(), random(seed));
    let mut r = Handshake::responder(config, b.entity_id(), a.entity_id(), random(seed ^ 0x5a));
    let mut to_r: Message = i.start(NOW).expect("init");
    loop {
        let to_i = r
            .handle(NOW, b, &a.public_key(), &to_r)
            .expect("responder")
            .expect("responder answers every step");
        match i.handle(NOW, a, &b.public_key(), &to_i).expect("initiator") {
            Some(next) => to_r = next,
            None => break,
        }
    }
    (
        i.poll_session().expect("initiator ready"),
        r.poll_session().expect("responder ready"),
    )
}

fn handshakes(c: &mut Criterion) {
    let a = Identity::from_secret(&[1; 32]);
    let b = Identity::from_secret(&[2; 32]);
    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Elements(1));
    let mut seed = 0u8;
    g.bench_function("handshake_both_sides", |bench| {
        bench.iter(|| {
            seed = seed.wrapping_add(1);
            black_box(handshake(&a, &b, seed))
        })
    });
    g.finish();
}

fn sealing(c: &mut Criterion) {
    let a = Identity::from_secret(&[1; 32]);
    let b = Identity::from_secret(&[2; 32]);
    let (mut sa, sb) = handshake(&a, &b, 7);
    let mt: MsgType = "message".parse().expect("valid");
    let key = Aes256Gcm::new(&[7u8; 32].into());
    let mut g = c.benchmark_group("aead");
    for size in [256usize, 32 * 1024, 1024 * 1024] {
        let data = vec![0x61u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("session_seal", size), &data, |bench, d| {
            bench.iter(|| black_box(sa.seal(NOW, &mt, d).expect("seal")))
        });
        let (seq, sealed) = sa.seal(NOW, &mt, &data).expect("seal");
        g.bench_with_input(
            BenchmarkId::new("session_open", size),
            &sealed,
            |bench, ct| bench.iter(|| black_box(sb.open(NOW, &mt, seq, ct).expect("open"))),
        );
        g.bench_with_input(
            BenchmarkId::new("raw_aes256gcm_seal", size),
            &data,
            |bench, d| {
                let nonce = Nonce::from([0u8; 12]);
                bench.iter(|| {
                    black_box(
                        key.encrypt(
                            &nonce,
                            Payload {
                                msg: d,
                                aad: b"aad",
                            },
                        )
                        .expect("encrypt"),
                    )
                })
            },
        );
    }
    g.finish();
}

/// Raw SHA-256 and SHA-512 over 1 MiB: what hashing a transferred megabyte
/// costs on this machine (PROTOCOL.md section 9.9).
fn hashing(c: &mut Criterion) {
    use sha2::{Digest, Sha256, Sha512};
    let data = vec![0x61u8; 1024 * 1024];
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("sha256_1MiB", |b| {
        b.iter(|| black_box(Sha256::digest(black_box(&data))))
    });
    g.bench_function("sha512_1MiB", |b| {
        b.iter(|| black_box(Sha512::digest(black_box(&data))))
    });
    g.finish();
}

criterion_group!(benches, handshakes, sealing, hashing);
criterion_main!(benches);
