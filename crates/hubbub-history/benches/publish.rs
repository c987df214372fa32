//! Publish throughput of the disk engine with 1, 8 and 64 concurrent publishers, each waiting
//! for its previous publish to be durable before the next (as a chat sender waits for its ack).
//! Group commit shows as throughput growing with publishers: one fsync serves a whole batch.
//! Run with `cargo bench -p hubbub-history`; the file lives in the target directory, on the
//! disk the server would use, not in a tmpfs.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hubbub_history::{DiskConfig, DiskEngine, Options, Publish, publish_and_wait};

fn publish_throughput(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let engine = Arc::new(
        DiskEngine::open(DiskConfig::new(dir.path().join("bench.redb")), Options::default()).unwrap(),
    );
    // A chat message as the server stores it.
    let text = Bytes::from_static(br#"{"type":"chatMessage","user":"ada","text":"hello, how is everyone today?","timestamp":1700000000123,"offset":0}"#);
    let mut group = c.benchmark_group("disk_publish");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(4));
    for publishers in [1_u64, 8, 64] {
        group.bench_function(format!("{publishers}_publishers"), |b| {
            b.iter_custom(|iters| {
                let each = iters.div_ceil(publishers);
                let start = Instant::now();
                let threads: Vec<_> = (0..publishers)
                    .map(|p| {
                        let (engine, text) = (engine.clone(), text.clone());
                        std::thread::spawn(move || {
                            let room = format!("room{}", p % 16);
                            for _ in 0..each {
                                let text = text.clone();
                                let request = Publish::new(room.as_str(), "ada", move |_| text.clone());
                                publish_and_wait(&*engine, request).unwrap();
                            }
                        })
                    })
                    .collect();
                for thread in threads {
                    thread.join().unwrap();
                }
                // Rounded up to whole publishers; scale back to `iters`.
                start.elapsed().mul_f64(iters as f64 / (each * publishers) as f64)
            });
        });
    }
    group.finish();
    let stats = engine.stats();
    eprintln!(
        "commits {}, published {}, {:.1} publishes per fsync",
        stats.commits,
        stats.published,
        stats.published as f64 / stats.commits.max(1) as f64
    );
}

criterion_group!(benches, publish_throughput);
criterion_main!(benches);
