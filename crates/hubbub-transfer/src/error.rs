//! The error type of file transfers; its messages are shown to uploaders.

use hubbub_protocol::chunk::TooShort;

/// A `Result` whose error defaults to [`TransferError`].
pub type Result<T, E = TransferError> = std::result::Result<T, E>;

/// Why a step of a file transfer was refused.
///
/// The display form is a complete sentence meant for the person uploading:
/// the server sends it as `fileError {message}`. A refusal never changes the
/// state that refused, so the driver chooses whether to carry on (for example
/// after [`TransferError::Incomplete`]) or to abandon the upload.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// The declared size is above the configured maximum file size.
    #[error("The file is too large: it has {size} bytes and the limit is {max} bytes.")]
    TooLarge {
        /// The size the upload declared.
        size: u64,
        /// The configured maximum.
        max: u64,
    },
    /// The declared chunk size is outside the allowed bounds.
    #[error("A chunk size of {chunk_size} bytes is not allowed; it must be between {min} and {max} bytes.")]
    InvalidChunkSize {
        /// The chunk size asked for.
        chunk_size: u32,
        /// The smallest chunk size allowed.
        min: u32,
        /// The largest chunk size allowed.
        max: u32,
    },
    /// The file would need more chunks than a 32-bit chunk index can number.
    #[error("A file of {size} bytes needs too many chunks of {chunk_size} bytes; use larger chunks.")]
    TooManyChunks {
        /// The file's size.
        size: u64,
        /// The chunk size asked for.
        chunk_size: u32,
    },
    /// A binary frame was too short to hold the 4-byte chunk index.
    #[error("A binary frame of {len} bytes is too short to hold a chunk index.")]
    FrameTooShort {
        /// The frame's length in bytes.
        len: usize,
    },
    /// A chunk index at or past the file's chunk count.
    #[error("Chunk {index} is past the end of the file, which has {chunk_count} chunks.")]
    IndexOutOfRange {
        /// The index received.
        index: u32,
        /// How many chunks the file has; valid indices are below this.
        chunk_count: u32,
    },
    /// A chunk whose length is not the one its index requires.
    #[error("Chunk {index} has {got} bytes, but it must have exactly {expected} bytes.")]
    WrongChunkLength {
        /// The chunk's index.
        index: u32,
        /// The length the chunk must have.
        expected: u64,
        /// The length received.
        got: u64,
    },
    /// A chunk received again with contents different from the first copy.
    #[error("Chunk {index} was sent again with different contents.")]
    DuplicateMismatch {
        /// The chunk's index.
        index: u32,
    },
    /// A chunk or an end after the upload had already ended.
    #[error("The upload has already ended; nothing more can be sent for it.")]
    AfterEnd,
    /// An end while chunks are still missing. The upload stays open: the
    /// missing chunks may still come, followed by another end.
    #[error("The upload is not complete yet; chunks missing: {missing_chunks}.")]
    Incomplete {
        /// How many chunks have not arrived.
        missing_chunks: u32,
    },
    /// A `sha256` field that is not 64 hexadecimal characters.
    #[error("The SHA-256 checksum must be 64 hexadecimal characters.")]
    InvalidSha256Hex,
    /// The received file's SHA-256 differs from the one declared at the start.
    #[error("The received file does not match the SHA-256 checksum declared for it.")]
    Sha256Mismatch,
}

impl From<TooShort> for TransferError {
    fn from(TooShort(len): TooShort) -> Self {
        Self::FrameTooShort { len }
    }
}
