//! The sending side: which chunks of a file to send, where they lie, and
//! their frames.

use std::iter::FusedIterator;
use std::ops::Range;

use crate::Result;
use crate::layout::Layout;

/// One chunk of a file: its index and the bytes of the file it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    /// The chunk's index, sent in the frame header.
    pub index: u32,
    /// The byte offset of the chunk's first byte in the file.
    pub offset: u64,
    /// The chunk's length in bytes: the chunk size, or the rest of the file
    /// for the last chunk.
    pub len: usize,
}

impl ChunkRef {
    /// The chunk's bytes out of the whole file, or `None` if `file` is too
    /// short to hold them.
    pub fn bytes<'f>(&self, file: &'f [u8]) -> Option<&'f [u8]> {
        let start = usize::try_from(self.offset).ok()?;
        file.get(start..start.checked_add(self.len)?)
    }

    /// The chunk's binary frame, `[4-byte big-endian index][bytes]`, cut out
    /// of the whole file; `None` if `file` is too short to hold the chunk.
    /// A sender that reads chunk by chunk frames its buffer with
    /// `hubbub_protocol::chunk::frame` instead.
    pub fn frame(&self, file: &[u8]) -> Option<Vec<u8>> {
        self.bytes(file).map(|data| hubbub_protocol::chunk::frame(self.index, data))
    }
}

/// The chunks of a file to send, in index order: all of them
/// ([`Chunker::new`]) or those a resume state lacks ([`Chunker::missing`]).
///
/// An iterator of [`ChunkRef`]s that also tracks progress: chunks already
/// handed out, and on resume those the receiver already had, count as done.
#[derive(Clone, Debug)]
pub struct Chunker {
    /// Where each chunk lies in the file.
    layout: Layout,
    /// The runs of chunk indices still to hand out after `current`, in order.
    pending: std::vec::IntoIter<Range<u32>>,
    /// The run being handed out.
    current: Range<u32>,
    /// How many chunks are still to be handed out.
    remaining_chunks: u32,
    /// Bytes handed out or already held by the receiver.
    bytes_done: u64,
}

impl Chunker {
    /// All the chunks of a `size`-byte file in `chunk_size`-byte chunks.
    ///
    /// Refused when `chunk_size` is zero or the file needs more chunks than a
    /// 32-bit index can number.
    pub fn new(size: u64, chunk_size: u32) -> Result<Self> {
        Self::missing(size, chunk_size, [])
    }

    /// The chunks not in `received`: the ranges of chunk indices a resume
    /// state (`fileResumeState`) says the receiver already has.
    ///
    /// The ranges come from the peer, so they may be in any order, overlap or
    /// reach past the end; parts outside the file are ignored.
    ///
    /// ```
    /// use hubbub_transfer::Chunker;
    ///
    /// let rest = Chunker::missing(10_000, 1000, [0..3, 5..6, 2..4])?;
    /// assert_eq!(rest.progress(), 0.5);
    /// let indices: Vec<u32> = rest.map(|chunk| chunk.index).collect();
    /// assert_eq!(indices, [4, 6, 7, 8, 9]);
    /// # Ok::<(), hubbub_transfer::TransferError>(())
    /// ```
    pub fn missing(
        size: u64,
        chunk_size: u32,
        received: impl IntoIterator<Item = Range<u32>>,
    ) -> Result<Self> {
        let layout = Layout::new(size, chunk_size)?;
        let count = layout.chunk_count();
        let mut received: Vec<Range<u32>> = received
            .into_iter()
            .map(|r| r.start.min(count)..r.end.min(count))
            .filter(|r| !r.is_empty())
            .collect();
        received.sort_unstable_by_key(|r| r.start);
        // Walk the received runs in order; the gaps between them are to send.
        let mut pending = Vec::with_capacity(received.len() + 1);
        let mut next = 0;
        for run in received {
            if run.start > next {
                pending.push(next..run.start);
            }
            next = next.max(run.end);
        }
        if next < count {
            pending.push(next..count);
        }
        let remaining_chunks = pending.iter().map(|r| r.end - r.start).sum();
        let pending_bytes: u64 = pending.iter().map(|r| layout.bytes_in(r)).sum();
        Ok(Self {
            layout,
            pending: pending.into_iter(),
            current: 0..0,
            remaining_chunks,
            bytes_done: size - pending_bytes,
        })
    }

    /// How many chunks the whole file has.
    pub fn chunk_count(&self) -> u32 {
        self.layout.chunk_count()
    }

    /// How many chunks are still to be handed out.
    pub fn remaining_chunks(&self) -> u32 {
        self.remaining_chunks
    }

    /// Bytes of the file handed out so far or already held by the receiver.
    pub fn bytes_done(&self) -> u64 {
        self.bytes_done
    }

    /// [`Chunker::bytes_done`] as a fraction of the file, from 0.0 to 1.0.
    /// An empty file is done from the start.
    pub fn progress(&self) -> f64 {
        match self.layout.size() {
            0 => 1.0,
            // Precision loss above 2^53 bytes does not matter for a fraction.
            size => self.bytes_done as f64 / size as f64,
        }
    }
}

impl Iterator for Chunker {
    type Item = ChunkRef;

    fn next(&mut self) -> Option<ChunkRef> {
        let index = loop {
            match self.current.next() {
                Some(index) => break index,
                None => self.current = self.pending.next()?,
            }
        };
        let range = self.layout.chunk(index)?;
        let len = range.end - range.start;
        self.remaining_chunks -= 1;
        self.bytes_done += len;
        // A chunk is at most `u32::MAX` bytes, which fits a usize on the 32-
        // and 64-bit targets this crate supports.
        Some(ChunkRef { index, offset: range.start, len: len as usize })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let remaining = usize::try_from(self.remaining_chunks).ok();
        (remaining.unwrap_or(usize::MAX), remaining)
    }
}

impl FusedIterator for Chunker {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TransferError;

    fn chunks(chunker: Chunker) -> Vec<(u32, u64, usize)> {
        chunker.map(|c| (c.index, c.offset, c.len)).collect()
    }

    #[test]
    fn chunks_cover_the_file_and_the_last_is_short() {
        let c = Chunker::new(10, 4).unwrap();
        assert_eq!((c.chunk_count(), c.remaining_chunks(), c.size_hint()), (3, 3, (3, Some(3))));
        assert_eq!(chunks(c), [(0, 0, 4), (1, 4, 4), (2, 8, 2)]);
        assert_eq!(chunks(Chunker::new(8, 4).unwrap()), [(0, 0, 4), (1, 4, 4)]);
    }

    #[test]
    fn empty_file_has_no_chunks_and_is_done() {
        let mut c = Chunker::new(0, 4).unwrap();
        assert_eq!(c.progress(), 1.0);
        assert_eq!(c.next(), None);
    }

    #[test]
    fn progress_counts_handed_out_bytes() {
        let mut c = Chunker::new(10, 4).unwrap();
        assert_eq!(c.progress(), 0.0);
        c.next();
        assert_eq!((c.bytes_done(), c.progress()), (4, 0.4));
        c.by_ref().for_each(drop);
        assert_eq!((c.bytes_done(), c.progress(), c.remaining_chunks()), (10, 1.0, 0));
        assert_eq!(c.next(), None);
    }

    #[test]
    fn missing_skips_what_was_received_and_tolerates_odd_ranges() {
        // Ranges from a peer may be empty, reversed, unsorted or overlapping.
        let (high, low) = (7, 3);
        let c = Chunker::missing(10, 4, [2..2, 1..2, 0..1, high..low]).unwrap();
        assert_eq!(c.bytes_done(), 8);
        assert_eq!(chunks(c), [(2, 8, 2)]);
        let c = Chunker::missing(10, 4, Some(1..u32::MAX)).unwrap();
        assert_eq!(chunks(c), [(0, 0, 4)]);
        let everything = Chunker::missing(10, 4, Some(0..3)).unwrap();
        assert_eq!((everything.remaining_chunks(), everything.progress()), (0, 1.0));
    }

    #[test]
    fn bad_chunk_sizes_are_refused() {
        assert!(matches!(Chunker::new(10, 0), Err(TransferError::InvalidChunkSize { .. })));
        assert!(matches!(Chunker::new(u64::MAX, 1), Err(TransferError::TooManyChunks { .. })));
    }

    #[test]
    fn frames_carry_the_index_and_the_chunk() {
        let file = b"abcdefghij";
        let last = Chunker::new(10, 4).unwrap().nth(2).unwrap();
        assert_eq!(last.bytes(file), Some(&b"ij"[..]));
        assert_eq!(last.frame(file).unwrap(), [0, 0, 0, 2, b'i', b'j']);
        assert_eq!(last.frame(&file[..9]), None);
    }
}
