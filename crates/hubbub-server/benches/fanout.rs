//! A standalone model of the hub's delivery path as `hub::Peer` runs it: one
//! broadcast encoded once into a complete WebSocket frame (`Bytes`, header
//! included), the same reference-counted frame pushed to N bounded queues (a
//! `Mutex<VecDeque<Bytes>>` each, whose `AtomicWaker` is woken when the
//! queue was empty), and each queue taken whole by swapping deques, as each
//! connection's task does before its vectored write. What it measures is the
//! per-recipient cost the hub adds before the socket write: no JSON per
//! recipient, no syscalls. Run with `cargo xtask bench` or
//! `cargo bench -p hubbub-server`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Mutex;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::task::AtomicWaker;
use hubbub_protocol::ServerMessage;

/// The server's default outbound queue depth.
const QUEUE: usize = 512;

/// One connection's queue, as in `hub::Link`.
#[derive(Default)]
struct Queue {
    frames: Mutex<VecDeque<Bytes>>,
    waker: AtomicWaker,
}

impl Queue {
    fn push(&self, frame: &Bytes) {
        let mut frames = self.frames.lock().unwrap();
        assert!(frames.len() < QUEUE, "the queue has room");
        let was_empty = frames.is_empty();
        frames.push_back(frame.clone());
        drop(frames);
        if was_empty {
            self.waker.wake();
        }
    }

    fn take(&self, out: &mut VecDeque<Bytes>) {
        std::mem::swap(&mut *self.frames.lock().unwrap(), out);
    }
}

/// A text frame of a payload under 126 bytes, as `ws::encode` builds it.
fn text_frame(payload: &str) -> Bytes {
    assert!(payload.len() < 126);
    let mut out = Vec::with_capacity(2 + payload.len());
    out.extend_from_slice(&[0x81, payload.len() as u8]);
    out.extend_from_slice(payload.as_bytes());
    Bytes::from(out)
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_encode_once");
    for recipients in [10_usize, 100, 1000, 10_000] {
        let queues: Vec<Queue> = (0..recipients).map(|_| Queue::default()).collect();
        group.throughput(Throughput::Elements(recipients as u64));
        group.bench_function(format!("{recipients}_queues"), |b| {
            b.iter(|| {
                let msg = ServerMessage::ChatMessage {
                    user: "ada".to_owned(),
                    text: "Hello, everyone in the room!".to_owned(),
                    timestamp: 1_700_000_000_000,
                    client_msg_id: None,
                };
                let frame = text_frame(&msg.to_json());
                for queue in &queues {
                    queue.push(&frame);
                }
                for queue in &queues {
                    // The task's deque starts empty and is released once written.
                    let mut taken = VecDeque::new();
                    queue.take(&mut taken);
                    black_box(taken);
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
