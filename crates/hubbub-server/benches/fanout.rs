//! Fan-out of one room message to N members, through the server's own code
//! (`hubbub_server::internals::BenchRoom`): a room of a real `Hub` whose
//! members joined with `Hub::join`, each a `Peer` with the server's default
//! queue limits. Each iteration encodes one `chatMessage` once into a
//! complete WebSocket frame, hands it to every member but the sender with
//! `Room::deliver`, as a kept room message goes out (which also counts it
//! in the metrics), then takes each
//! member's queue whole and counts it written, as each connection's task
//! does around its vectored write. No JSON per recipient, no syscalls: the
//! per-recipient cost the hub adds before the socket. Run with
//! `cargo xtask bench` or
//! `cargo bench -p hubbub-server --features internals --bench fanout`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hubbub_protocol::ServerMessage;
use hubbub_server::internals::BenchRoom;

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_encode_once");
    for recipients in [10_usize, 100, 1000, 10_000] {
        let room = BenchRoom::new(recipients);
        group.throughput(Throughput::Elements(recipients as u64));
        group.bench_function(format!("{recipients}_queues"), |b| {
            b.iter(|| {
                let msg = ServerMessage::ChatMessage {
                    user: "ada".to_owned(),
                    text: "Hello, everyone in the room!".to_owned(),
                    timestamp: 1_700_000_000_000,
                    client_msg_id: None,
                    offset: Some(1),
                };
                room.deliver(&msg);
                black_box(room.take_all());
            });
        });
        assert!(!room.any_closing(), "every member kept up");
        assert_eq!(room.recipients(), recipients);
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
