//! A standalone model of the hub's delivery path: one broadcast encoded
//! once, then the same reference-counted frame queued to N bounded tokio
//! mpsc queues with `try_send` (as `Room::broadcast` does), and each queue
//! drained with `try_recv` (as each connection's writer does). What it
//! measures is the per-recipient cost the hub adds before the socket write:
//! no JSON, no syscalls. Run with `cargo xtask bench` or
//! `cargo bench -p hubbub-server`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hubbub_protocol::ServerMessage;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Utf8Bytes;

/// The server's default outbound queue depth.
const QUEUE: usize = 512;

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_encode_once");
    for recipients in [10_usize, 100, 1000, 10_000] {
        let (senders, mut receivers): (Vec<_>, Vec<_>) =
            (0..recipients).map(|_| mpsc::channel::<Message>(QUEUE)).unzip();
        group.throughput(Throughput::Elements(recipients as u64));
        group.bench_function(format!("{recipients}_queues"), |b| {
            b.iter(|| {
                let msg = ServerMessage::ChatMessage {
                    user: "ada".to_owned(),
                    text: "Hello, everyone in the room!".to_owned(),
                    timestamp: 1_700_000_000_000,
                    client_msg_id: None,
                };
                let frame = Utf8Bytes::from(msg.to_json());
                for tx in &senders {
                    tx.try_send(Message::Text(frame.clone())).expect("the queue has room");
                }
                for rx in &mut receivers {
                    black_box(rx.try_recv().expect("one frame per queue"));
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
