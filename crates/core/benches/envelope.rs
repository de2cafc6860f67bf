//! Criterion benchmarks: raw Ed25519, envelope sign/encode/decode/verify and the
//! full inbound pipeline ([`peer_core::inbound::Acceptor::accept`]).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use peer_core::identity::verify;
use peer_core::inbound::{self, Acceptor};
use peer_core::{Draft, EntityId, Identity, MessageId};

/// A fixed clock, ms since the Unix epoch; envelope timestamps are built from it.
const NOW: u64 = 1_800_000_000_000;
const PAYLOAD_LEN: usize = 256;

fn sender() -> Identity {
    Identity::from_secret(&[2; 32])
}

fn receiver() -> Identity {
    Identity::from_secret(&[1; 32])
}

/// A draft with a 256-byte payload whose nonce and message id are derived from `n`,
/// stamped `NOW + n` ms.
fn draft(to: EntityId, n: u64) -> Draft {
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&n.to_be_bytes());
    Draft {
        msg_type: "message".parse().expect("valid msg_type"),
        message_id: MessageId::from_random(nonce),
        recipient_id: Some(to),
        session_id: None,
        sequence_num: 0,
        timestamp_ms: NOW + n,
        nonce,
        payload: vec![b'x'; PAYLOAD_LEN],
    }
}

fn ed25519(c: &mut Criterion) {
    let id = sender();
    let key = id.public_key();
    let msg = [0xA5u8; 64];
    let sig = id.sign(&msg);
    assert!(verify(&key, &msg, &sig), "setup: signature must verify");

    let mut g = c.benchmark_group("ed25519");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign_64B", |b| b.iter(|| id.sign(black_box(&msg))));
    g.bench_function("verify_64B", |b| {
        b.iter(|| verify(black_box(&key), black_box(&msg), black_box(&sig)))
    });
    g.finish();
}

fn envelope(c: &mut Criterion) {
    let id = sender();
    let to = receiver().entity_id();
    let d = draft(to, 0);
    let env = d.clone().sign(&id);
    let bytes = env.encode();
    assert!(env.verify(), "setup: envelope must verify");
    assert_eq!(
        peer_core::Envelope::decode(&bytes).expect("setup: decodes"),
        env,
        "setup: decode(encode(env)) == env"
    );

    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign_256B_payload", |b| {
        b.iter_batched(|| d.clone(), |d| d.sign(&id), BatchSize::SmallInput)
    });
    g.bench_function("encode", |b| b.iter(|| black_box(&env).encode()));
    g.bench_function("decode", |b| {
        b.iter(|| peer_core::Envelope::decode(black_box(&bytes)).expect("decodes"))
    });
    g.bench_function("verify", |b| b.iter(|| black_box(&env).verify()));
    g.finish();

    // Batches of one peer's envelopes (as a node verifies them), per envelope.
    let v = Acceptor::new(to, inbound::Config::default()).verifier();
    let from = id.entity_id();
    let mut g = c.benchmark_group("envelope/verify_batch");
    for n in [1u64, 8, 32, 64] {
        let frames: Vec<Vec<u8>> = (0..n).map(|i| draft(to, i).sign(&id).encode()).collect();
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        let ok = v.verify_many_from(NOW, &from, &refs, rand::rng());
        assert!(ok.iter().all(Result::is_ok), "setup: the batch verifies");
        g.throughput(Throughput::Elements(n));
        g.bench_function(n.to_string(), |b| {
            b.iter(|| v.verify_many_from(NOW, black_box(&from), black_box(&refs), rand::rng()))
        });
    }
    g.finish();
}

fn acceptor(c: &mut Criterion) {
    let id = sender();
    let local = receiver().entity_id();

    // Sanity check: the first envelope of a batch is accepted on a fresh acceptor,
    // so the benchmark measures the success path, not a rejection.
    let mut acc = Acceptor::new(local, inbound::Config::default());
    let first = draft(local, 0).sign(&id);
    if let Err(e) = acc.accept(NOW, &first.encode()) {
        panic!("setup: first envelope rejected: {e:?}");
    }

    let mut g = c.benchmark_group("acceptor");
    g.throughput(Throughput::Elements(1));
    g.bench_function("accept_256B", |b| {
        // Each sample gets a fresh acceptor and `iters` pre-signed envelopes with
        // distinct nonces; `now_ms` equals each envelope's timestamp. Only the
        // `accept` calls are timed; every one must succeed.
        b.iter_custom(|iters| {
            let batch: Vec<(u64, Vec<u8>)> = (0..iters)
                .map(|n| (NOW + n, draft(local, n).sign(&id).encode()))
                .collect();
            let mut acc = Acceptor::new(local, inbound::Config::default());
            let mut out = Vec::with_capacity(batch.len());
            let start = Instant::now();
            for (now_ms, bytes) in &batch {
                out.push(
                    acc.accept(black_box(*now_ms), black_box(bytes))
                        .expect("benchmark envelope must be accepted"),
                );
            }
            let elapsed: Duration = start.elapsed();
            drop(black_box(out));
            elapsed
        })
    });
    g.finish();
}

criterion_group!(benches, ed25519, envelope, acceptor);
criterion_main!(benches);
