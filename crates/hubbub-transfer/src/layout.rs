//! How a file of a given size is cut into chunks: the arithmetic that the
//! assembler and the chunker share.

use std::ops::Range;

use crate::{Result, TransferError};

/// The chunk geometry of one file: every chunk but the last is `chunk_size`
/// bytes, the last holds the rest, and an empty file has no chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    /// The file's size in bytes.
    size: u64,
    /// The length of every chunk but the last; never zero.
    chunk_size: u32,
    /// `size / chunk_size` rounded up; it fits a chunk index by construction.
    chunk_count: u32,
}

impl Layout {
    /// The layout of a `size`-byte file in `chunk_size`-byte chunks.
    pub(crate) fn new(size: u64, chunk_size: u32) -> Result<Self> {
        if chunk_size == 0 {
            return Err(TransferError::InvalidChunkSize { chunk_size, min: 1, max: u32::MAX });
        }
        let chunk_count = u32::try_from(size.div_ceil(u64::from(chunk_size)))
            .map_err(|_| TransferError::TooManyChunks { size, chunk_size })?;
        Ok(Self { size, chunk_size, chunk_count })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    pub(crate) fn chunk_count(&self) -> u32 {
        self.chunk_count
    }

    /// The byte offset where chunk `boundary` starts, or the file's size for
    /// `boundary == chunk_count`. Taken as `u64` so that `index + 1` is valid.
    fn boundary(&self, boundary: u64) -> u64 {
        boundary.saturating_mul(u64::from(self.chunk_size)).min(self.size)
    }

    /// The byte range of chunk `index`, or `None` past the last chunk.
    pub(crate) fn chunk(&self, index: u32) -> Option<Range<u64>> {
        (index < self.chunk_count).then(|| {
            let index = u64::from(index);
            self.boundary(index)..self.boundary(index + 1)
        })
    }

    /// How many bytes the chunks in `chunks` hold together.
    pub(crate) fn bytes_in(&self, chunks: &Range<u32>) -> u64 {
        let end = self.boundary(u64::from(chunks.end));
        end.saturating_sub(self.boundary(u64::from(chunks.start)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_chunk_holds_the_rest() {
        let l = Layout::new(10, 4).unwrap();
        assert_eq!(l.chunk_count(), 3);
        assert_eq!(l.chunk(0), Some(0..4));
        assert_eq!(l.chunk(2), Some(8..10));
        assert_eq!(l.chunk(3), None);
        assert_eq!(l.bytes_in(&(1..3)), 6);
        assert_eq!(l.bytes_in(&(0..u32::MAX)), 10);
    }

    #[test]
    fn exact_multiple_and_empty_file() {
        let l = Layout::new(8, 4).unwrap();
        assert_eq!(l.chunk_count(), 2);
        assert_eq!(l.chunk(1), Some(4..8));
        let empty = Layout::new(0, 4).unwrap();
        assert_eq!(empty.chunk_count(), 0);
        assert_eq!(empty.chunk(0), None);
    }

    #[test]
    fn zero_chunk_size_and_index_overflow_are_refused() {
        assert!(matches!(Layout::new(1, 0), Err(TransferError::InvalidChunkSize { .. })));
        assert_eq!(
            Layout::new(u64::MAX, 1),
            Err(TransferError::TooManyChunks { size: u64::MAX, chunk_size: 1 })
        );
        let max = Layout::new(u64::from(u32::MAX), 1).unwrap();
        assert_eq!(max.chunk_count(), u32::MAX);
        assert_eq!(max.chunk(u32::MAX - 1), Some(u64::from(u32::MAX) - 1..u64::from(u32::MAX)));
    }
}
