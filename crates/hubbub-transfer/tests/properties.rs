//! Property tests of the transfer core: reassembly from any chunk order,
//! robustness against arbitrary peer input, chunk tiling and resume, and the
//! progress throttle's cadence.

use std::collections::HashMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use hubbub_transfer::{
    Assembler, Chunker, Placement, ProgressPolicy, ProgressThrottle, TransferError, TransferLimits,
    UploadSpec, parse_sha256_hex, sha256_to_hex,
};
use proptest::prelude::*;
use proptest::sample::Index;

/// Limits that allow any chunk size, so small files get many chunks.
fn loose_limits() -> TransferLimits {
    TransferLimits { min_chunk_size: 1, ..TransferLimits::default() }
}

/// Deterministic pseudo-random file contents (splitmix64), far cheaper than
/// letting proptest generate and shrink every byte.
fn file_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    (0..size)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

/// A file size up to a few hundred KiB and a chunk size that keeps the chunk
/// count at most about 2,000, so a case stays fast.
fn size_and_chunk_size() -> impl Strategy<Value = (usize, u32)> {
    (0usize..=300 * 1024).prop_flat_map(|size| {
        let smallest = u32::try_from(size / 2000).unwrap_or(u32::MAX).max(1);
        (Just(size), prop_oneof![smallest..=smallest + 64, smallest..=65_536])
    })
}

/// Checks what must hold of an assembler whatever it was fed.
fn assert_consistent(a: &Assembler) {
    assert!(a.received_bytes() <= a.size());
    assert_eq!(a.received_chunks() + a.missing_chunks(), a.chunk_count());
    assert_eq!(a.is_complete(), a.missing_chunks() == 0);
    let ranges = a.received_ranges();
    for pair in ranges.windows(2) {
        // Sorted, disjoint and coalesced: a gap separates neighbours.
        assert!(pair[0].end < pair[1].start, "{ranges:?}");
    }
    assert!(ranges.iter().all(|r| r.start < r.end && r.end <= a.chunk_count()));
    let covered: u32 = ranges.iter().map(|r| r.end - r.start).sum();
    assert_eq!(covered, a.received_chunks());
}

proptest! {
    /// (a) Chunks written at the offsets the assembler returns, in any order
    /// and with identical duplicates interleaved, rebuild the file exactly.
    #[test]
    fn any_order_with_duplicates_reassembles_the_file(
        (size, chunk_size) in size_and_chunk_size(),
        seed in any::<u64>(),
        order_seed in any::<u64>(),
        duplicates in prop::collection::vec((any::<Index>(), any::<Index>()), 0..16),
        corrupt in any::<Option<Index>>(),
    ) {
        let file = file_bytes(size, seed);
        let spec = UploadSpec { size: size as u64, chunk_size: Some(chunk_size), sha256: None };
        let mut upload = Assembler::new(spec, &loose_limits()).unwrap();
        let chunks: Vec<_> = Chunker::new(size as u64, chunk_size).unwrap().collect();
        prop_assert_eq!(chunks.len(), upload.chunk_count() as usize);

        // A permutation (Fisher-Yates driven by the seed), then duplicates
        // inserted anywhere, before or after their first copy.
        let mut order: Vec<usize> = (0..chunks.len()).collect();
        let mut state = order_seed;
        for i in (1..order.len()).rev() {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            order.swap(i, (state >> 33) as usize % (i + 1));
        }
        if !order.is_empty() {
            for (which, at) in &duplicates {
                let chunk = order[which.index(order.len())];
                order.insert(at.index(order.len() + 1), chunk);
            }
        }

        let mut disk = vec![0xEE; size];
        let mut writes = 0;
        for (step, &i) in order.iter().enumerate() {
            let chunk = chunks[i];
            let frame = chunk.frame(&file).unwrap();
            match upload.on_frame(&frame).unwrap() {
                (Placement::Write { offset }, data) => {
                    prop_assert_eq!(offset, chunk.offset);
                    let offset = offset as usize;
                    disk[offset..offset + data.len()].copy_from_slice(data);
                    writes += 1;
                }
                (Placement::Duplicate, _) => {}
            }
            // Once, a corrupted resend of an accepted chunk: refused, harmless.
            if corrupt.is_some_and(|c| c.index(order.len()) == step) && chunk.len > 0 {
                let mut bad = chunk.bytes(&file).unwrap().to_vec();
                bad[0] ^= 1;
                prop_assert_eq!(
                    upload.on_chunk(chunk.index, &bad),
                    Err(TransferError::DuplicateMismatch { index: chunk.index })
                );
            }
            assert_consistent(&upload);
        }
        prop_assert_eq!(writes, chunks.len());
        prop_assert_eq!(upload.received_bytes(), size as u64);
        prop_assert!(upload.on_end().is_ok());
        prop_assert!(disk == file, "reassembled bytes differ");
    }
}

/// One thing a peer can do to an upload.
#[derive(Clone, Debug)]
enum Event {
    /// A chunk with this index; `exact_len` picks the length the index needs,
    /// otherwise `len`. Its bytes are all `fill`, so repeats are sometimes
    /// identical and sometimes not.
    Chunk { index: u32, exact_len: bool, len: usize, fill: u8 },
    /// A `fileEnd`.
    End,
}

fn event() -> impl Strategy<Value = Event> {
    let index = prop_oneof![8 => 0u32..24, 1 => any::<u32>()];
    prop_oneof![
        10 => (index, any::<bool>(), 0usize..80, 0u8..3)
            .prop_map(|(index, exact_len, len, fill)| Event::Chunk { index, exact_len, len, fill }),
        1 => Just(Event::End),
    ]
}

proptest! {
    /// (b) Arbitrary events never panic, every refusal is the typed error a
    /// simple model predicts, and the counts stay consistent.
    #[test]
    fn arbitrary_events_are_refused_cleanly(
        size in 0u64..1200,
        chunk_size in 1u32..70,
        events in prop::collection::vec(event(), 0..200),
    ) {
        let spec = UploadSpec { size, chunk_size: Some(chunk_size), sha256: None };
        let mut upload = Assembler::new(spec, &loose_limits()).unwrap();
        let chunk_count = upload.chunk_count();
        let mut model: HashMap<u32, Vec<u8>> = HashMap::new();
        let mut ended = false;
        for event in events {
            match event {
                Event::Chunk { index, exact_len, len, fill } => {
                    let start = u64::from(index) * u64::from(chunk_size);
                    let expected = size.saturating_sub(start).min(u64::from(chunk_size));
                    let data = vec![fill; if exact_len { expected as usize } else { len }];
                    let want = if ended {
                        Err(TransferError::AfterEnd)
                    } else if index >= chunk_count {
                        Err(TransferError::IndexOutOfRange { index, chunk_count })
                    } else if data.len() as u64 != expected {
                        Err(TransferError::WrongChunkLength { index, expected, got: data.len() as u64 })
                    } else {
                        match model.get(&index) {
                            Some(first) if *first == data => Ok(Placement::Duplicate),
                            Some(_) => Err(TransferError::DuplicateMismatch { index }),
                            None => {
                                model.insert(index, data.clone());
                                Ok(Placement::Write { offset: start })
                            }
                        }
                    };
                    prop_assert_eq!(upload.on_chunk(index, &data), want);
                }
                Event::End => {
                    let missing_chunks = chunk_count - model.len() as u32;
                    let got = upload.on_end();
                    if ended {
                        prop_assert_eq!(got, Err(TransferError::AfterEnd));
                    } else if missing_chunks > 0 {
                        prop_assert_eq!(got, Err(TransferError::Incomplete { missing_chunks }));
                    } else {
                        prop_assert!(got.is_ok());
                        ended = true;
                    }
                }
            }
            assert_consistent(&upload);
            let model_bytes: u64 = model.values().map(|d| d.len() as u64).sum();
            prop_assert_eq!(upload.received_bytes(), model_bytes);
            prop_assert_eq!(upload.is_ended(), ended);
        }
    }

    /// (b) Raw frames of any bytes never panic either.
    #[test]
    fn arbitrary_frames_never_panic(frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..50)) {
        let spec = UploadSpec { size: 100, chunk_size: Some(7), sha256: None };
        let mut upload = Assembler::new(spec, &loose_limits()).unwrap();
        for frame in &frames {
            if let Err(e) = upload.on_frame(frame) {
                prop_assert!(e.to_string().ends_with('.'), "{e}");
            }
            assert_consistent(&upload);
        }
    }

    /// (c) The chunks of a file tile `[0, size)` exactly, in order, each of
    /// the chunk size but the last, and progress ends at 1.
    #[test]
    fn chunks_tile_the_file(size in 0u64..50_000_000, chunk_size in 1u32..=1_000_000) {
        prop_assume!(size.div_ceil(u64::from(chunk_size)) <= 5000);
        let mut chunker = Chunker::new(size, chunk_size).unwrap();
        let count = chunker.chunk_count();
        let mut next_offset = 0;
        let mut seen = 0;
        for (i, chunk) in chunker.by_ref().enumerate() {
            prop_assert_eq!(chunk.index as usize, i);
            prop_assert_eq!(chunk.offset, next_offset);
            prop_assert!(chunk.len > 0);
            if chunk.index + 1 < count {
                prop_assert_eq!(chunk.len, chunk_size as usize);
            }
            next_offset += chunk.len as u64;
            seen += 1;
        }
        prop_assert_eq!(next_offset, size);
        prop_assert_eq!(seen, count);
        prop_assert_eq!(chunker.progress(), 1.0);
    }

    /// (c) On resume, the missing chunks are exactly those outside the
    /// received ranges, whatever shape the ranges have, and they are the same
    /// chunks a fresh chunker yields.
    #[test]
    fn missing_chunks_complement_the_received_ranges(
        size in 0u64..100_000,
        chunk_size in 50u32..5000,
        received in prop::collection::vec((0u32..2100, 0u32..2100), 0..8),
    ) {
        let received: Vec<Range<u32>> = received.into_iter().map(|(a, b)| a..b).collect();
        let all: Vec<_> = Chunker::new(size, chunk_size).unwrap().collect();
        let rest = Chunker::missing(size, chunk_size, received.iter().cloned()).unwrap();
        let held = |i: u32| received.iter().any(|r| r.contains(&i));
        let held_bytes: u64 = all.iter().filter(|c| held(c.index)).map(|c| c.len as u64).sum();
        prop_assert_eq!(rest.bytes_done(), held_bytes);
        let want: Vec<_> = all.into_iter().filter(|c| !held(c.index)).collect();
        prop_assert_eq!(rest.size_hint(), (want.len(), Some(want.len())));
        prop_assert_eq!(rest.collect::<Vec<_>>(), want);
    }

    /// An interrupted upload resumes from the assembler's received ranges and
    /// completes with the right bytes.
    #[test]
    fn interrupted_upload_resumes_from_received_ranges(
        (size, chunk_size) in size_and_chunk_size(),
        seed in any::<u64>(),
        sent_first in prop::collection::vec(any::<bool>(), 0..2001),
    ) {
        let file = file_bytes(size, seed);
        let spec = UploadSpec { size: size as u64, chunk_size: Some(chunk_size), sha256: None };
        let mut upload = Assembler::new(spec, &loose_limits()).unwrap();
        let mut disk = vec![0; size];
        let mut send = |upload: &mut Assembler, chunker: Chunker, keep: &dyn Fn(u32) -> bool| {
            for chunk in chunker.filter(|c| keep(c.index)) {
                let data = chunk.bytes(&file).unwrap();
                let Placement::Write { offset } = upload.on_chunk(chunk.index, data).unwrap() else {
                    panic!("chunk {} sent twice", chunk.index);
                };
                disk[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            }
        };
        let first = |i: u32| sent_first.get(i as usize).copied().unwrap_or(false);
        send(&mut upload, Chunker::new(size as u64, chunk_size).unwrap(), &first);
        let resume = upload.received_ranges();
        send(&mut upload, Chunker::missing(size as u64, chunk_size, resume).unwrap(), &|_| true);
        prop_assert!(upload.on_end().is_ok());
        prop_assert!(disk == file, "resumed bytes differ");
    }

    /// (d) A steady upload that lasts under a second is reported at most
    /// once per 10 % step, completion included.
    #[test]
    fn fast_upload_reports_at_most_eleven_times(
        size in 1u64..1_000_000_000,
        events in 1u64..3000,
        duration_ms in 0u64..1000,
    ) {
        let start = Instant::now();
        let mut throttle = ProgressThrottle::new(size, ProgressPolicy::default(), start);
        let mut reports = 0;
        for i in 1..=events {
            let now = start + Duration::from_millis(duration_ms * i / events);
            if throttle.should_report(now, size * i / events) {
                reports += 1;
            }
        }
        prop_assert!((1..=11).contains(&reports), "{reports} reports");
    }

    /// (d) However slow the upload, while it makes progress a report comes at
    /// least once per period (give or take the gap between two events), and
    /// reports stay bounded by steps plus elapsed periods.
    #[test]
    fn slow_upload_reports_at_least_once_per_second(
        size in 1000u64..1_000_000_000,
        gaps_ms in prop::collection::vec(1u64..300, 1..400),
    ) {
        let start = Instant::now();
        let policy = ProgressPolicy::default();
        let mut throttle = ProgressThrottle::new(size, policy, start);
        let max_gap = Duration::from_millis(*gaps_ms.iter().max().unwrap());
        let (mut now, mut last_report, mut reports) = (start, start, 0u64);
        // Progress creeps: well under 10 % of the file over the whole run.
        let per_event = (size / 20 / gaps_ms.len() as u64).max(1);
        for (i, gap) in gaps_ms.iter().enumerate() {
            now += Duration::from_millis(*gap);
            if throttle.should_report(now, per_event * (i as u64 + 1)) {
                prop_assert!(now - last_report <= policy.period + max_gap);
                last_report = now;
                reports += 1;
            }
        }
        prop_assert!(now - last_report < policy.period + max_gap);
        let periods = (now - start).as_millis() as u64 / policy.period.as_millis() as u64;
        prop_assert!(reports <= periods + 11, "{reports} reports in {periods} periods");
    }

    /// The hex form of a digest round-trips, and any string parses or is
    /// refused without panicking.
    #[test]
    fn sha256_hex_round_trips(digest in any::<[u8; 32]>(), junk in ".{0,70}") {
        prop_assert_eq!(parse_sha256_hex(&sha256_to_hex(&digest)), Ok(digest));
        prop_assert_eq!(parse_sha256_hex(&sha256_to_hex(&digest).to_uppercase()), Ok(digest));
        if let Ok(parsed) = parse_sha256_hex(&junk) {
            prop_assert_eq!(sha256_to_hex(&parsed), junk.to_lowercase());
        }
    }
}
