//! The upload assembler fed an arbitrary sequence of events, checked against
//! a model that keeps every accepted chunk.
//!
//! Checked after every event: no panic; the assembler accepts exactly what
//! the model says a correct receiver accepts (right index, right length, an
//! identical resend is a duplicate, a different one refused, nothing after a
//! successful end); a refusal changes nothing; the counters and the received
//! ranges match the model; and a sender resuming from those ranges
//! (`Chunker::missing`) sends exactly the chunks the model lacks.

#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use hubbub_transfer::{Assembler, Chunker, Placement, TransferError, TransferLimits, UploadSpec};
use libfuzzer_sys::fuzz_target;

/// One upload's declaration and what the sender does.
#[derive(Debug, Arbitrary)]
struct Input {
    /// Declared file size, folded into a bound that keeps runs fast.
    size: u16,
    /// Declared chunk size; `None` takes the limits' default.
    chunk_size: Option<u16>,
    /// Smallest chunk size the limits allow.
    min_chunk: u16,
    /// How far above the minimum the maximum is.
    chunk_span: u16,
    events: Vec<Event>,
}

#[derive(Debug, Arbitrary)]
enum Event {
    /// A chunk of the right length (for its index) filled with `fill`.
    Chunk { index: u32, fill: u8 },
    /// A chunk whose length is off by `delta` (zero-length deltas included).
    WrongLength { index: u32, delta: i8, fill: u8 },
    /// A raw binary frame, header and all.
    Frame(Vec<u8>),
    /// `fileEnd`.
    End,
}

/// A correct receiver: the bytes of every accepted chunk.
struct Model {
    size: u64,
    chunk_size: u64,
    chunk_count: u32,
    chunks: BTreeMap<u32, Vec<u8>>,
    ended: bool,
}

impl Model {
    fn chunk_len(&self, index: u32) -> Option<u64> {
        (index < self.chunk_count).then(|| {
            let start = u64::from(index) * self.chunk_size;
            (start + self.chunk_size).min(self.size) - start
        })
    }

    /// What a correct receiver answers to chunk `index` with `data`.
    fn on_chunk(&mut self, index: u32, data: &[u8]) -> Result<Placement, TransferError> {
        if self.ended {
            return Err(TransferError::AfterEnd);
        }
        let Some(expected) = self.chunk_len(index) else {
            return Err(TransferError::IndexOutOfRange { index, chunk_count: self.chunk_count });
        };
        if data.len() as u64 != expected {
            return Err(TransferError::WrongChunkLength { index, expected, got: data.len() as u64 });
        }
        match self.chunks.get(&index) {
            Some(first) if first == data => Ok(Placement::Duplicate),
            Some(_) => Err(TransferError::DuplicateMismatch { index }),
            None => {
                self.chunks.insert(index, data.to_vec());
                Ok(Placement::Write { offset: u64::from(index) * self.chunk_size })
            }
        }
    }

    fn missing_count(&self) -> u32 {
        self.chunk_count - u32::try_from(self.chunks.len()).expect("at most chunk_count chunks")
    }

    fn missing(&self) -> Vec<u32> {
        (0..self.chunk_count).filter(|i| !self.chunks.contains_key(i)).collect()
    }
}

fuzz_target!(|input: Input| {
    let min_chunk_size = u32::from(input.min_chunk % 4096).max(1);
    let max_chunk_size = min_chunk_size + u32::from(input.chunk_span % 4096);
    let limits = TransferLimits {
        max_file_size: 48 * 1024,
        default_chunk_size: min_chunk_size,
        min_chunk_size,
        max_chunk_size,
    };
    assert_eq!(limits.validate(), Ok(()));
    // Sizes just past the limit are kept, to reach the refusal.
    let size = u64::from(input.size) % (limits.max_file_size + 16);
    let chunk_size = input.chunk_size.map(|c| u32::from(c) % (max_chunk_size + 8));
    let spec = UploadSpec { size, chunk_size, sha256: None };
    let mut upload = match Assembler::new(spec, &limits) {
        Ok(upload) => upload,
        Err(TransferError::TooLarge { .. }) => return assert!(size > limits.max_file_size),
        Err(TransferError::InvalidChunkSize { chunk_size, .. }) => {
            return assert!(!(min_chunk_size..=max_chunk_size).contains(&chunk_size));
        }
        Err(other) => panic!("unexpected refusal of {spec:?}: {other}"),
    };
    let effective = u64::from(chunk_size.unwrap_or(min_chunk_size));
    let chunk_count = u32::try_from(size.div_ceil(effective)).expect("small sizes only");
    assert_eq!(upload.chunk_count(), chunk_count);
    assert_eq!(upload.size(), size);
    let mut model = Model { size, chunk_size: effective, chunk_count, chunks: BTreeMap::new(), ended: false };

    for event in input.events.iter().take(512) {
        let before = (upload.received_chunks(), upload.received_bytes(), upload.is_ended());
        let (got, want) = match event {
            Event::Chunk { index, fill } => {
                // Mostly indices that exist, sometimes just past the end.
                let index = index % (chunk_count + 2);
                let len = model.chunk_len(index).unwrap_or(effective) as usize;
                let data = vec![*fill; len];
                (upload.on_chunk(index, &data), model.on_chunk(index, &data))
            }
            Event::WrongLength { index, delta, fill } => {
                let index = index % (chunk_count + 1);
                let len = model.chunk_len(index).unwrap_or(effective) as i64 + i64::from(*delta);
                let data = vec![*fill; usize::try_from(len.max(0)).unwrap_or(0)];
                (upload.on_chunk(index, &data), model.on_chunk(index, &data))
            }
            Event::Frame(frame) => {
                let got = upload.on_frame(frame).map(|(placement, data)| {
                    assert_eq!(data, &frame[4..], "on_frame must hand back the frame's data");
                    placement
                });
                let want = match hubbub_protocol::chunk::split(frame) {
                    Ok((index, data)) => model.on_chunk(index, data),
                    Err(short) => Err(short.into()),
                };
                (got, want)
            }
            Event::End => {
                let got = upload.on_end();
                let want = if model.ended {
                    Err(TransferError::AfterEnd)
                } else if model.missing_count() == 0 {
                    model.ended = true;
                    Ok(hubbub_transfer::Completed { size, sha256: None })
                } else {
                    Err(TransferError::Incomplete { missing_chunks: model.missing_count() })
                };
                assert_eq!(got, want, "on_end");
                check_counters(&upload, &model);
                continue;
            }
        };
        assert_eq!(got, want, "after {event:?}");
        if got.is_err() {
            let after = (upload.received_chunks(), upload.received_bytes(), upload.is_ended());
            assert_eq!(before, after, "a refusal changed the assembler");
        }
        check_counters(&upload, &model);
    }

    // The resume path: what the assembler reports received, the sender skips.
    let ranges = upload.received_ranges();
    let mut covered = Vec::new();
    let mut last_end = None;
    for range in &ranges {
        assert!(range.start < range.end, "empty range {range:?}");
        if let Some(end) = last_end {
            assert!(range.start > end, "ranges not sorted, disjoint and coalesced: {ranges:?}");
        }
        last_end = Some(range.end);
        covered.extend(range.clone());
    }
    let model_has: Vec<u32> = model.chunks.keys().copied().collect();
    assert_eq!(covered, model_has, "received_ranges");
    let resend: Vec<u32> = Chunker::missing(size, effective as u32, ranges)
        .expect("the layout was accepted")
        .map(|chunk| chunk.index)
        .collect();
    assert_eq!(resend, model.missing(), "the chunker resends exactly the missing chunks");
});

fn check_counters(upload: &Assembler, model: &Model) {
    let bytes: u64 = model.chunks.values().map(|c| c.len() as u64).sum();
    assert_eq!(upload.received_bytes(), bytes);
    assert!(upload.received_bytes() <= upload.size());
    assert_eq!(upload.received_chunks() as usize, model.chunks.len());
    assert_eq!(upload.missing_chunks(), model.missing_count());
    assert_eq!(upload.is_complete(), model.missing_count() == 0);
    assert_eq!(upload.is_ended(), model.ended);
}
