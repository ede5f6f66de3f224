//! Micro-benchmarks of the per-message and per-connection hot paths.
//!
//!     cargo bench -p pushgate --bench hot_paths

use std::collections::VecDeque;
use std::time::Duration;

use divan::{Bencher, black_box};
use pushgate::auth::{TokenSpec, Verifier, mint};
use pushgate::config::{JwtArgs, Secret};
use pushgate::hub::{Frame, Hub, SessionHandle};
use pushgate::metrics::Metrics;
use pushgate_protocol::server::{MessageRef, encode_message};
use pushgate_protocol::{ClientFrame, RawJson, Target};

fn main() {
    divan::main();
}

/// A 100-byte JSON payload, as in the fan-out benchmarks.
fn payload() -> Box<RawJson> {
    let text = format!(r#"{{"t":1763700000000000000,"pad":"{}"}}"#, "x".repeat(66));
    assert_eq!(text.len(), 100);
    RawJson::from_string(text).unwrap()
}

#[divan::bench]
fn encode_message_frame() -> String {
    let data = payload();
    encode_message(black_box(&MessageRef {
        id: "0190c2a4-6d2b-7c3e-9f00-123456789abc",
        ts: 1_763_700_000_000,
        from: Some("alice"),
        target: Target::Channel("room:1"),
        data: &data,
    }))
}

#[divan::bench]
fn decode_publish_request(bencher: Bencher) {
    let text = format!(
        r#"{{"type":"publish","id":42,"channel":"room:1","data":{}}}"#,
        payload().get()
    );
    bencher.bench(|| ClientFrame::decode(black_box(&text)).map(|f| f.id()));
}

#[divan::bench]
fn verify_token(bencher: Bencher) {
    let secret = Secret::new("bench-secret");
    let verifier = Verifier::from_args(&JwtArgs {
        jwt_secret: Some(secret.clone()),
        jwt_public_key: None,
        jwt_algorithm: None,
        jwt_issuer: None,
        jwt_audience: None,
        jwt_leeway: Duration::from_secs(5),
        jwt_jwks_url: None,
        jwt_jwks_refresh: Duration::from_secs(300),
        jwt_jwks_min_interval: Duration::from_secs(30),
        jwt_jwks_timeout: Duration::from_secs(5),
    })
    .unwrap();
    let token = mint(
        &secret,
        &TokenSpec {
            sub: "alice".into(),
            channels: vec!["room:*".into()],
            publish: vec!["room:*".into()],
            ttl: Duration::from_secs(3600),
            ..TokenSpec::default()
        },
    );
    bencher.bench(|| {
        verifier
            .verify_held(black_box(&token))
            .map(|g| g.expires_at)
    });
}

/// One message to every subscriber of a channel with 10,000 local subscribers, and each
/// subscriber's task taking it off its queue.
#[divan::bench(sample_count = 50)]
fn fan_out_to_10k_queues(bencher: Bencher) {
    let metrics = Metrics::new();
    let hub = Hub::new(metrics.deliveries.clone(), metrics.drops.clone());
    let sessions: Vec<_> = (0..10_000)
        .map(|i| {
            let s = SessionHandle::new(format!("user-{i}").into(), 1024);
            hub.insert(&s);
            hub.join("room:1", &s);
            s
        })
        .collect();
    let frame = Frame::from(encode_message_frame());
    bencher.bench_local(|| {
        let delivered = hub.to_channel("room:1", || frame.clone());
        // As each session's task does: take the queue as a batch.
        let mut batch = VecDeque::new();
        for s in &sessions {
            s.take_batch(&mut batch, 64);
            black_box(batch.pop_front());
            batch.clear();
        }
        delivered
    });
}
