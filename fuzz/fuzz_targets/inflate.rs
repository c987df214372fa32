//! Client bytes into the server's permessage-deflate inflater.
//!
//! Inflating never panics and never returns more than its limit, however
//! the bytes claim to expand (a decompression bomb is refused one byte past
//! the limit); and what the server compresses inflates back to itself.

#![no_main]

use hubbub_server::internals::{compress, inflate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose the limit, so small limits are hit too.
    let (limit, payload) = match data {
        [hi, lo, rest @ ..] => (usize::from(u16::from_be_bytes([*hi, *lo])), rest),
        _ => (0, data),
    };
    if let Some(out) = inflate(payload, limit) {
        assert!(out.len() <= limit);
    }
    if let Some(compressed) = compress(payload) {
        assert!(compressed.len() < payload.len());
        assert_eq!(inflate(&compressed, payload.len()).as_deref(), Some(payload));
    }
});
