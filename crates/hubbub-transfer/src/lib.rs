//! Chunked file transfer over the chat socket.
//!
//! This crate will hold the sans-IO upload assembler (it validates
//! `fileStart`, binary chunks and `fileEnd` and tells its driver where each
//! chunk goes), the chunker that senders use to frame a file into
//! `[4-byte big-endian index][bytes]` chunks, and the disk store that streams
//! chunks to a temporary file and moves a verified upload into place.
//!
//! The wire format of a chunk is defined by
//! `hubbub_protocol::chunk`; this crate builds on it.
