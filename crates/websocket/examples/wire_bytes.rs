//! Bytes on the wire per delivery, server to client, for a chat message of about 200 bytes and
//! a dashboard update of about 2 KB: plain; with permessage-deflate as pushgate sends it (each
//! message compressed once for all recipients, from 128 bytes); the same with every message
//! compressed; batches of 10 (deliveries queued together for one connection) made of the
//! shared compressed messages; and, for comparison, a batch of 10 compressed as one message,
//! which would cost a compression per connection.
//!
//!     cargo run --release -p pushgate-websocket --example wire_bytes

use bytes::Bytes;
use bytes::BytesMut;
use flate2::{Compress, FlushCompress};
use pushgate_websocket::{Compression, Encoding, SharedFrame, write_batch};

/// One message compressed on its own (raw deflate, sync flush, tail stripped) with its header.
fn deflated_len(text: &[u8]) -> usize {
    let mut c = Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(text.len() + 64);
    c.compress_vec(text, &mut out, FlushCompress::Sync).unwrap();
    let body = out.len() - 4;
    body + if body < 126 { 2 } else { 4 }
}

/// A delivery as a node encodes it, around `data`.
fn delivery(i: usize, data: &str) -> String {
    format!(
        r#"{{"type":"message","id":"019ae1c4-5a7b-7c3e-9d2f-{i:012x}","ts":{},"from":"alice","channel":"room:lobby","data":{data}}}"#,
        1_796_540_000_000u64 + i as u64 * 37
    )
}

fn chat(i: usize) -> String {
    let texts = [
        "are we still on for the design review at three? I moved it to the big room",
        "yes, and bring the latency numbers from yesterday's run, the p99 ones",
        "on my way, grabbing coffee first; anyone want one? two sugars for Bob?",
        "the staging deploy failed on the migration step, looking into it now",
        "found it: the index name clashed with an old one, renaming and retrying",
        "nice. can someone review my pull request before lunch? it's the small one",
        "done, left two comments about the retry loop, otherwise looks good to me",
        "reminder: the office is closed on Friday, the heating gets fixed then",
        "thanks! also, who took the projector remote from meeting room four?",
        "guilty, it's on my desk, I'll bring it back after the standup tomorrow",
    ];
    delivery(i, &format!(r#"{{"text":"{}"}}"#, texts[i % texts.len()]))
}

fn dashboard(i: usize) -> String {
    let rows: Vec<String> = (0..26)
        .map(|h| {
            format!(
                r#"{{"host":"web-{h:02}","cpu":{:.2},"mem":{:.2},"rps":{},"status":"ok"}}"#,
                0.2 + ((h * 7 + i) % 50) as f64 / 100.0,
                0.4 + ((h * 3 + i) % 40) as f64 / 100.0,
                1000 + (h * 97 + i * 13) % 900
            )
        })
        .collect();
    delivery(
        i,
        &format!(r#"{{"window":"1m","rows":[{}]}}"#, rows.join(",")),
    )
}

fn main() {
    const BATCH: usize = 10;
    println!(
        "| message | payload bytes | plain | deflate (from 128 B) | deflate (every message) | \
         deflate + batches of {BATCH} | batch of {BATCH} compressed as one |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (name, make) in [
        ("chat message", chat as fn(usize) -> String),
        ("dashboard update", dashboard),
    ] {
        let frames: Vec<SharedFrame> = (0..BATCH)
            .map(|i| SharedFrame::new(Bytes::from(make(i)), Compression::default()))
            .collect();
        let payload: usize = frames.iter().map(|f| f.payload().len()).sum::<usize>() / BATCH;
        let plain: usize = frames
            .iter()
            .map(|f| f.wire(Encoding::Plain).len())
            .sum::<usize>()
            / BATCH;
        let deflate: usize = frames
            .iter()
            .map(|f| f.wire(Encoding::DEFLATE).len())
            .sum::<usize>()
            / BATCH;
        let every = frames
            .iter()
            .map(|f| deflated_len(&f.payload()))
            .sum::<usize>()
            / BATCH;
        let mut batch = BytesMut::new();
        write_batch(&frames, Encoding::DEFLATE, &mut batch);
        let batched = batch.len() / BATCH;
        let joined: Vec<u8> = (frames.iter().map(|f| f.payload().to_vec()))
            .collect::<Vec<_>>()
            .join(&b'\n');
        let whole = deflated_len(&joined) / BATCH;
        let pct = |n: usize| 100.0 * n as f64 / plain as f64;
        println!(
            "| {name} | {payload} | {plain} | {deflate} ({:.0} %) | {every} ({:.0} %) | \
             {batched} ({:.0} %) | {whole} ({:.0} %) |",
            pct(deflate),
            pct(every),
            pct(batched),
            pct(whole)
        );
    }
}
