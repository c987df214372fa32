//! The receiving side of one upload: checks each chunk and the end against
//! what `fileStart` declared and tells the driver where each chunk goes.

use std::num::NonZeroU64;
use std::ops::Range;

use crate::layout::Layout;
use crate::{Result, TransferError, TransferLimits};

/// What a `fileStart` declares about an upload, as the assembler needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadSpec {
    /// The file's size in bytes.
    pub size: u64,
    /// The chunk size the sender uses; `None` means the configured default.
    pub chunk_size: Option<u32>,
    /// The whole file's SHA-256, when the sender gave one (see
    /// [`crate::parse_sha256_hex`]). The assembler carries it to
    /// [`Completed`]; whoever holds the finished file checks it.
    pub sha256: Option<[u8; 32]>,
}

/// What the driver does with a chunk the assembler accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// A chunk seen for the first time: write its bytes at this offset.
    Write {
        /// The byte offset in the file where the chunk's first byte goes.
        offset: u64,
    },
    /// An identical copy of this chunk was already accepted; nothing to write.
    Duplicate,
}

/// An upload whose every chunk has arrived and which has ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completed {
    /// The file's size in bytes.
    pub size: u64,
    /// The SHA-256 the sender declared, if any, still to be checked against
    /// the file as written.
    pub sha256: Option<[u8; 32]>,
}

impl Completed {
    /// Checks the digest of the file as written against the declared one.
    /// With no declared digest there is nothing to check and this succeeds.
    pub fn verify(&self, actual: &[u8; 32]) -> Result<()> {
        match self.sha256 {
            Some(declared) if declared != *actual => Err(TransferError::Sha256Mismatch),
            _ => Ok(()),
        }
    }
}

/// The receiving state of one upload, from `fileStart` to `fileEnd`.
///
/// It validates every chunk (index in range, exact length, not after the end,
/// a repeated chunk identical to the first copy) and answers where it goes;
/// the driver writes the bytes, so the assembler never holds file data. Its
/// memory is one 8-byte slot per chunk.
///
/// Every refusal leaves the assembler as it was and still usable. In
/// particular an [`Assembler::on_end`] that fails with
/// [`TransferError::Incomplete`] keeps the upload open: the missing chunks
/// (see [`Assembler::received_ranges`]) may still come, followed by another
/// end. To resume an upload after a reconnect, keep the assembler. Only after
/// a successful end does it refuse everything with [`TransferError::AfterEnd`].
///
/// ```
/// use hubbub_transfer::{Assembler, Placement, TransferError, TransferLimits, UploadSpec};
///
/// let spec = UploadSpec { size: 10_000, chunk_size: Some(4096), sha256: None };
/// let mut upload = Assembler::new(spec, &TransferLimits::default())?;
/// assert_eq!(upload.on_chunk(2, &[7; 1808])?, Placement::Write { offset: 8192 });
/// assert_eq!(upload.on_chunk(2, &[7; 1808])?, Placement::Duplicate);
/// assert_eq!(upload.on_end(), Err(TransferError::Incomplete { missing_chunks: 2 }));
/// assert_eq!(upload.received_ranges(), vec![2..3]);
/// # Ok::<(), TransferError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Assembler {
    /// Where each chunk lies in the file.
    layout: Layout,
    /// The declared digest, handed on in [`Completed`].
    sha256: Option<[u8; 32]>,
    /// One slot per chunk: empty until the chunk is accepted, then the
    /// fingerprint of its bytes, to tell an identical resend from a different
    /// one. The fingerprint is a 64-bit XXH3 of the chunk: it catches
    /// accidental mismatches; the whole-file SHA-256 is the integrity check.
    /// `Option<NonZeroU64>` keeps a slot at 8 bytes.
    slots: Vec<Option<NonZeroU64>>,
    /// How many slots are filled, kept so counting needs no scan.
    received_chunks: u32,
    /// The sum of the lengths of the accepted chunks.
    received_bytes: u64,
    /// Set by a successful [`Assembler::on_end`]; nothing is accepted after.
    ended: bool,
}

impl Assembler {
    /// Starts assembling an upload as its `fileStart` declared it, checking
    /// the declaration against `limits`: the size at most `max_file_size`, the
    /// chunk size (or `default_chunk_size`) within the chunk size bounds.
    ///
    /// The limits should have passed [`TransferLimits::validate`]; that check
    /// is what bounds the memory an upload can make the assembler take.
    pub fn new(declared: UploadSpec, limits: &TransferLimits) -> Result<Self> {
        let UploadSpec { size, chunk_size, sha256 } = declared;
        if size > limits.max_file_size {
            return Err(TransferError::TooLarge { size, max: limits.max_file_size });
        }
        let chunk_size = chunk_size.unwrap_or(limits.default_chunk_size);
        let (min, max) = (limits.min_chunk_size, limits.max_chunk_size);
        if !(min..=max).contains(&chunk_size) {
            return Err(TransferError::InvalidChunkSize { chunk_size, min, max });
        }
        let layout = Layout::new(size, chunk_size)?;
        Ok(Self {
            layout,
            sha256,
            slots: vec![None; index_to_usize(layout.chunk_count())],
            received_chunks: 0,
            received_bytes: 0,
            ended: false,
        })
    }

    /// Accepts chunk `index` with its bytes `data`.
    ///
    /// Refused: anything after a successful end, an index at or past
    /// [`Assembler::chunk_count`], a length other than the chunk size (or, for
    /// the last chunk, the rest of the file), and a repeat of an accepted
    /// chunk with different bytes.
    pub fn on_chunk(&mut self, index: u32, data: &[u8]) -> Result<Placement> {
        if self.ended {
            return Err(TransferError::AfterEnd);
        }
        let chunk_count = self.chunk_count();
        let range = self.layout.chunk(index).ok_or(TransferError::IndexOutOfRange { index, chunk_count })?;
        let (expected, got) = (range.end - range.start, data.len() as u64);
        if got != expected {
            return Err(TransferError::WrongChunkLength { index, expected, got });
        }
        let fingerprint = fingerprint(data);
        let slot = self
            .slots
            .get_mut(index_to_usize(index))
            // There is one slot per chunk and the layout has just confirmed
            // that `index` is a chunk; still, refuse rather than panic.
            .ok_or(TransferError::IndexOutOfRange { index, chunk_count })?;
        match *slot {
            Some(first) if first == fingerprint => Ok(Placement::Duplicate),
            Some(_) => Err(TransferError::DuplicateMismatch { index }),
            None => {
                *slot = Some(fingerprint);
                self.received_chunks += 1;
                self.received_bytes += got;
                Ok(Placement::Write { offset: range.start })
            }
        }
    }

    /// Accepts a whole binary frame, `[4-byte big-endian index][bytes]`, as
    /// [`Assembler::on_chunk`] does, and returns the chunk's bytes with the
    /// placement so the driver can write them.
    pub fn on_frame<'f>(&mut self, frame: &'f [u8]) -> Result<(Placement, &'f [u8])> {
        let (index, data) = hubbub_protocol::chunk::split(frame)?;
        Ok((self.on_chunk(index, data)?, data))
    }

    /// Ends the upload (`fileEnd`). Refused with
    /// [`TransferError::Incomplete`] while chunks are missing, in which case
    /// the upload stays open; refused with [`TransferError::AfterEnd`] once it
    /// has ended.
    pub fn on_end(&mut self) -> Result<Completed> {
        if self.ended {
            return Err(TransferError::AfterEnd);
        }
        let missing_chunks = self.missing_chunks();
        if missing_chunks > 0 {
            return Err(TransferError::Incomplete { missing_chunks });
        }
        self.ended = true;
        Ok(Completed { size: self.size(), sha256: self.sha256 })
    }

    /// The indices of the accepted chunks as sorted, disjoint, non-adjacent
    /// ranges: what a `fileResumeState` tells the sender it need not resend.
    pub fn received_ranges(&self) -> Vec<Range<u32>> {
        let mut ranges: Vec<Range<u32>> = Vec::new();
        for index in (0..self.chunk_count()).filter(|&i| self.has(i)) {
            match ranges.last_mut() {
                Some(last) if last.end == index => last.end = index + 1,
                _ => ranges.push(index..index + 1),
            }
        }
        ranges
    }

    fn has(&self, index: u32) -> bool {
        self.slots.get(index_to_usize(index)).is_some_and(Option::is_some)
    }

    /// How many bytes the accepted chunks hold; at most [`Assembler::size`].
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }

    /// How many distinct chunks have been accepted.
    pub fn received_chunks(&self) -> u32 {
        self.received_chunks
    }

    /// How many chunks have not arrived yet.
    pub fn missing_chunks(&self) -> u32 {
        self.chunk_count() - self.received_chunks
    }

    /// The declared file size in bytes.
    pub fn size(&self) -> u64 {
        self.layout.size()
    }

    /// The upload's chunk size: the declared one or the configured default.
    pub fn chunk_size(&self) -> u32 {
        self.layout.chunk_size()
    }

    /// How many chunks the file has; zero for an empty file.
    pub fn chunk_count(&self) -> u32 {
        self.layout.chunk_count()
    }

    /// The declared SHA-256, if any.
    pub fn sha256(&self) -> Option<[u8; 32]> {
        self.sha256
    }

    /// True when every chunk has arrived (whether or not the upload ended).
    pub fn is_complete(&self) -> bool {
        self.missing_chunks() == 0
    }

    /// True after a successful [`Assembler::on_end`].
    pub fn is_ended(&self) -> bool {
        self.ended
    }
}

/// The 64-bit fingerprint of a chunk's bytes: XXH3, which reads several GiB
/// a second where std's SipHash read about one (SipHash was a tenth of the
/// server's CPU during an upload). Fingerprints are compared only within one
/// upload in one process, so neither keys nor a stable algorithm matter; an
/// adversary gains nothing from a clash, since the whole-file SHA-256 decides.
/// Zero is folded into one to fit the `NonZeroU64` niche; that only makes an
/// accidental clash a little likelier.
fn fingerprint(data: &[u8]) -> NonZeroU64 {
    NonZeroU64::new(xxhash_rust::xxh3::xxh3_64(data)).unwrap_or(NonZeroU64::MIN)
}

/// A chunk index as a slot position. Lossless: a `u32` fits a `usize` on the
/// 32- and 64-bit targets this crate supports.
fn index_to_usize(index: u32) -> usize {
    index as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> TransferLimits {
        TransferLimits { min_chunk_size: 4, max_chunk_size: 64, default_chunk_size: 8, max_file_size: 1000 }
    }

    fn upload(size: u64, chunk_size: u32) -> Assembler {
        Assembler::new(UploadSpec { size, chunk_size: Some(chunk_size), sha256: None }, &limits()).unwrap()
    }

    #[test]
    fn declaration_is_checked_against_limits() {
        let spec = |size, chunk_size| UploadSpec { size, chunk_size, sha256: None };
        assert_eq!(
            Assembler::new(spec(1001, None), &limits()).unwrap_err(),
            TransferError::TooLarge { size: 1001, max: 1000 }
        );
        assert_eq!(
            Assembler::new(spec(10, Some(3)), &limits()).unwrap_err(),
            TransferError::InvalidChunkSize { chunk_size: 3, min: 4, max: 64 }
        );
        assert_eq!(
            Assembler::new(spec(10, Some(65)), &limits()).unwrap_err(),
            TransferError::InvalidChunkSize { chunk_size: 65, min: 4, max: 64 }
        );
        let default = Assembler::new(spec(1000, None), &limits()).unwrap();
        assert_eq!((default.size(), default.chunk_size(), default.chunk_count()), (1000, 8, 125));
    }

    #[test]
    fn unvalidated_limits_cannot_cause_a_panic() {
        let zero = TransferLimits { min_chunk_size: 0, ..limits() };
        let spec = UploadSpec { size: 10, chunk_size: Some(0), sha256: None };
        assert!(matches!(Assembler::new(spec, &zero), Err(TransferError::InvalidChunkSize { .. })));
        let huge = TransferLimits { min_chunk_size: 1, max_file_size: u64::MAX, ..limits() };
        let spec = UploadSpec { size: u64::MAX, chunk_size: Some(1), sha256: None };
        assert!(matches!(Assembler::new(spec, &huge), Err(TransferError::TooManyChunks { .. })));
    }

    #[test]
    fn chunks_go_to_their_offsets_and_the_last_one_is_short() {
        let mut a = upload(10, 4);
        assert_eq!(a.chunk_count(), 3);
        assert_eq!(a.on_chunk(2, b"ij").unwrap(), Placement::Write { offset: 8 });
        assert_eq!(a.on_chunk(0, b"abcd").unwrap(), Placement::Write { offset: 0 });
        assert_eq!(a.on_chunk(1, b"efgh").unwrap(), Placement::Write { offset: 4 });
        assert!(a.is_complete());
        assert_eq!(a.received_bytes(), 10);
        assert_eq!(a.on_end().unwrap(), Completed { size: 10, sha256: None });
        assert!(a.is_ended());
    }

    #[test]
    fn index_past_the_end_is_refused() {
        let mut a = upload(10, 4);
        assert_eq!(
            a.on_chunk(3, b"xx").unwrap_err(),
            TransferError::IndexOutOfRange { index: 3, chunk_count: 3 }
        );
        assert_eq!(
            a.on_chunk(u32::MAX, b"").unwrap_err(),
            TransferError::IndexOutOfRange { index: u32::MAX, chunk_count: 3 }
        );
        assert_eq!(a.received_chunks(), 0);
    }

    #[test]
    fn lengths_must_be_exact() {
        let mut a = upload(10, 4);
        assert_eq!(
            a.on_chunk(0, b"abc").unwrap_err(),
            TransferError::WrongChunkLength { index: 0, expected: 4, got: 3 }
        );
        assert_eq!(
            a.on_chunk(0, b"abcde").unwrap_err(),
            TransferError::WrongChunkLength { index: 0, expected: 4, got: 5 }
        );
        // The last chunk may not run past the end of the file, nor fall short.
        assert_eq!(
            a.on_chunk(2, b"ijkl").unwrap_err(),
            TransferError::WrongChunkLength { index: 2, expected: 2, got: 4 }
        );
        assert_eq!(
            a.on_chunk(2, b"i").unwrap_err(),
            TransferError::WrongChunkLength { index: 2, expected: 2, got: 1 }
        );
        assert_eq!(a.received_bytes(), 0);
    }

    #[test]
    fn duplicates_must_match_the_first_copy() {
        let mut a = upload(10, 4);
        a.on_chunk(1, b"efgh").unwrap();
        assert_eq!(a.on_chunk(1, b"efgh").unwrap(), Placement::Duplicate);
        assert_eq!(a.on_chunk(1, b"efgX").unwrap_err(), TransferError::DuplicateMismatch { index: 1 });
        // The refused copy changed nothing: the first one still counts.
        assert_eq!(a.on_chunk(1, b"efgh").unwrap(), Placement::Duplicate);
        assert_eq!((a.received_chunks(), a.received_bytes()), (1, 4));
    }

    #[test]
    fn incomplete_end_keeps_the_upload_open() {
        let mut a = upload(10, 4);
        a.on_chunk(0, b"abcd").unwrap();
        assert_eq!(a.on_end().unwrap_err(), TransferError::Incomplete { missing_chunks: 2 });
        assert!(!a.is_ended());
        a.on_chunk(2, b"ij").unwrap();
        assert_eq!(a.on_end().unwrap_err(), TransferError::Incomplete { missing_chunks: 1 });
        a.on_chunk(1, b"efgh").unwrap();
        assert!(a.on_end().is_ok());
    }

    #[test]
    fn nothing_is_accepted_after_the_end() {
        let mut a = upload(4, 4);
        a.on_chunk(0, b"abcd").unwrap();
        a.on_end().unwrap();
        assert_eq!(a.on_chunk(0, b"abcd").unwrap_err(), TransferError::AfterEnd);
        assert_eq!(a.on_chunk(5, b"").unwrap_err(), TransferError::AfterEnd);
        assert_eq!(a.on_end().unwrap_err(), TransferError::AfterEnd);
    }

    #[test]
    fn empty_file_has_no_chunks_and_ends_at_once() {
        let mut a = upload(0, 4);
        assert_eq!((a.chunk_count(), a.missing_chunks()), (0, 0));
        assert!(a.is_complete());
        assert_eq!(
            a.on_chunk(0, b"").unwrap_err(),
            TransferError::IndexOutOfRange { index: 0, chunk_count: 0 }
        );
        assert!(a.received_ranges().is_empty());
        assert_eq!(a.on_end().unwrap().size, 0);
    }

    #[test]
    fn received_ranges_are_coalesced() {
        let mut a = upload(40, 4);
        for i in [0, 1, 2, 5, 7, 8, 9] {
            a.on_chunk(i, &[0; 4]).unwrap();
        }
        assert_eq!(a.received_ranges(), vec![0..3, 5..6, 7..10]);
        assert_eq!(a.missing_chunks(), 3);
    }

    #[test]
    fn frames_are_split_before_checking() {
        let mut a = upload(10, 4);
        let frame = hubbub_protocol::chunk::frame(1, b"efgh");
        assert_eq!(a.on_frame(&frame).unwrap(), (Placement::Write { offset: 4 }, &b"efgh"[..]));
        assert_eq!(a.on_frame(&[0, 0, 1]).unwrap_err(), TransferError::FrameTooShort { len: 3 });
    }

    #[test]
    fn completed_checks_the_declared_digest() {
        let declared = Completed { size: 1, sha256: Some([1; 32]) };
        assert_eq!(declared.verify(&[1; 32]), Ok(()));
        assert_eq!(declared.verify(&[2; 32]), Err(TransferError::Sha256Mismatch));
        assert_eq!(Completed { size: 1, sha256: None }.verify(&[2; 32]), Ok(()));
    }

    #[test]
    fn error_messages_are_sentences() {
        let e = TransferError::WrongChunkLength { index: 3, expected: 4096, got: 12 };
        assert_eq!(e.to_string(), "Chunk 3 has 12 bytes, but it must have exactly 4096 bytes.");
        assert_eq!(
            TransferError::TooLarge { size: 2000, max: 1000 }.to_string(),
            "The file is too large: it has 2000 bytes and the limit is 1000 bytes."
        );
    }
}
