//! Micro-benchmarks of the protocol codec's hot paths: decoding what clients
//! send most (a room message, a join, a ping, and a frame that is not JSON)
//! and encoding what the server broadcasts (a room message, a join).
//! Run with `cargo xtask bench` or `cargo bench -p hubbub-protocol`.

#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hubbub_protocol::{Limits, ServerMessage, decode_client, decode_server};

fn decode(c: &mut Criterion) {
    let limits = Limits::default();
    let mut group = c.benchmark_group("decode_client");
    let frames = [
        ("chatMessage", r#"{"type":"chatMessage","text":"Hello, everyone in the room!"}"#),
        (
            "chatMessage_with_id",
            r#"{"type":"chatMessage","text":"Hello!","clientMsgId":"4f0c1e9a-6a53-4d0e-9a59-0c5f4d7c2b1e"}"#,
        ),
        ("joinRoom", r#"{"type":"joinRoom","room":"  general "}"#),
        ("ping", r#"{"type":"ping","timestamp":1700000000000}"#),
        ("not_json", "this is not json"),
    ];
    for (name, frame) in frames {
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(name, |b| b.iter(|| decode_client(black_box(frame), &limits)));
    }
    group.finish();

    let broadcast = r#"{"type":"chatMessage","user":"ada","text":"Hello, everyone in the room!","timestamp":1700000000000}"#;
    c.bench_function("decode_server/chatMessage", |b| b.iter(|| decode_server(black_box(broadcast))));
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode_server");
    let chat = ServerMessage::ChatMessage {
        user: "ada".to_owned(),
        text: "Hello, everyone in the room!".to_owned(),
        timestamp: 1_700_000_000_000,
        client_msg_id: None,
        offset: Some(42),
    };
    group.bench_function("chatMessage", |b| b.iter(|| black_box(&chat).to_json()));
    let joined =
        ServerMessage::UserJoined { user: "ada".to_owned(), room: "general".to_owned(), user_count: 1000 };
    group.bench_function("userJoined", |b| b.iter(|| black_box(&joined).to_json()));
    let long = ServerMessage::ChatMessage {
        user: "ada".to_owned(),
        text: "é and \"quotes\" and text ".repeat(160),
        timestamp: 1_700_000_000_000,
        client_msg_id: None,
        offset: Some(42),
    };
    group.bench_function("chatMessage_4k_escaped", |b| b.iter(|| black_box(&long).to_json()));
    group.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
