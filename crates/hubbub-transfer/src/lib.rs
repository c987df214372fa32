//! Chunked file transfer over the chat socket, sans-IO.
//!
//! A client uploads a file as a `fileStart {name, size, mimeType}` message
//! (optionally with `sha256`, `chunkSize` and `transferId`), then binary
//! frames of `[4-byte big-endian chunk index][chunk bytes]`, then `fileEnd {}`.
//! Every chunk but the last is exactly the chunk size; chunks may arrive in any
//! order, and a chunk sent twice is accepted only if both copies are the same.
//!
//! This crate holds the parts of that exchange that need no IO and no clock:
//!
//! - [`TransferLimits`]: the configurable bounds on uploads.
//! - [`Assembler`]: checks one upload's chunks and `fileEnd` against what its
//!   `fileStart` declared and tells the driver where each chunk goes. It keeps
//!   a few bytes per chunk, never the file's data, so a half-finished upload
//!   can be kept around and resumed.
//! - [`Chunker`]: for senders, cuts a file into chunks (all of them, or only
//!   those a resume state says are missing) and frames them.
//! - [`ProgressThrottle`]: decides when a `fileProgress` report is due.
//! - [`parse_sha256_hex`] and [`sha256_to_hex`] for the `sha256` field.
//!
//! Time comes in as `now: Instant` arguments.
//!
//! Behind the `store` feature, [`Store`] is the disk side used by the server:
//! it streams chunks to a temporary file at their offsets, verifies size and
//! SHA-256 at `fileEnd`, fsyncs and renames the file into the upload
//! directory, and keeps interrupted uploads for a while so they can resume.
//!
//! The wire format of a chunk frame is defined by `hubbub_protocol::chunk`;
//! this crate builds on it.
//!
//! ```
//! use hubbub_transfer::{Assembler, Chunker, Placement, TransferLimits, UploadSpec};
//!
//! let file = b"hello, chunked world! ".repeat(1000); // 22,000 bytes
//! let size = file.len() as u64;
//! let limits = TransferLimits::default();
//! let spec = UploadSpec { size, chunk_size: Some(4096), sha256: None };
//! let mut upload = Assembler::new(spec, &limits)?;
//! assert_eq!(upload.chunk_count(), 6);
//!
//! // The sender frames every chunk; the receiver writes each where it belongs.
//! let mut disk = vec![0; file.len()];
//! for chunk in Chunker::new(size, 4096)? {
//!     let frame = chunk.frame(&file).expect("the chunker stays inside the file");
//!     let (placement, data) = upload.on_frame(&frame)?;
//!     if let Placement::Write { offset } = placement {
//!         let offset = usize::try_from(offset)?;
//!         disk[offset..offset + data.len()].copy_from_slice(data);
//!     }
//! }
//! let completed = upload.on_end()?;
//! assert_eq!(completed.size, size);
//! assert_eq!(disk, file);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod assembler;
mod checksum;
mod chunker;
mod error;
mod layout;
mod limits;
#[cfg(feature = "store")]
mod store;
mod throttle;

pub use assembler::{Assembler, Completed, Placement, UploadSpec};
pub use checksum::{parse_sha256_hex, sha256_to_hex};
pub use chunker::{ChunkRef, Chunker};
pub use error::{Result, TransferError};
pub use limits::{LimitsError, TransferLimits};
#[cfg(feature = "store")]
pub use store::{
    NewUpload, Store, StoreConfig, StoreError, StoredFile, Upload, is_file_id, sanitize_file_name,
};
pub use throttle::{ProgressPolicy, ProgressThrottle};
