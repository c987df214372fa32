//! Micro-benchmarks of upload assembly: an `Assembler` taking every chunk
//! frame of a file (its cost is the per-chunk fingerprint and bookkeeping,
//! the disk write being the driver's), and the resume state of a large,
//! half-received upload. Run with `cargo xtask bench` or
//! `cargo bench -p hubbub-transfer`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hubbub_transfer::{Assembler, Chunker, TransferLimits, UploadSpec};

fn assemble(c: &mut Criterion) {
    let limits = TransferLimits::default();
    let size = 4 << 20;
    let file: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut group = c.benchmark_group("assemble_4MiB");
    group.throughput(Throughput::Bytes(size as u64));
    for chunk_size in [4096_u32, 65_536] {
        let frames: Vec<Vec<u8>> =
            Chunker::new(size as u64, chunk_size).unwrap().map(|chunk| chunk.frame(&file).unwrap()).collect();
        group.bench_function(format!("chunks_of_{chunk_size}"), |b| {
            b.iter(|| {
                let spec = UploadSpec { size: size as u64, chunk_size: Some(chunk_size), sha256: None };
                let mut upload = Assembler::new(spec, &limits).unwrap();
                for frame in &frames {
                    black_box(upload.on_frame(frame).unwrap());
                }
                upload.on_end().unwrap()
            });
        });
    }
    group.finish();
}

fn resume_state(c: &mut Criterion) {
    let limits = TransferLimits::default();
    // The largest default upload in the smallest chunks: 25,600 chunks.
    let size = limits.max_file_size;
    let spec = UploadSpec { size, chunk_size: Some(limits.min_chunk_size), sha256: None };
    let mut upload = Assembler::new(spec, &limits).unwrap();
    let chunk = vec![7_u8; limits.min_chunk_size as usize];
    for index in (0..upload.chunk_count()).filter(|i| i % 3 != 0) {
        upload.on_chunk(index, &chunk).unwrap();
    }
    c.bench_function("received_ranges_25600_chunks", |b| b.iter(|| black_box(&upload).received_ranges()));
}

criterion_group!(benches, assemble, resume_state);
criterion_main!(benches);
