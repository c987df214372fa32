//! Binary frames into the upload chunk splitter.
//!
//! `chunk::split` never panics, refuses exactly the frames shorter than the
//! index header, and what it splits frames back to the same bytes.

#![no_main]

use hubbub_protocol::chunk;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match chunk::split(data) {
        Ok((index, rest)) => {
            assert!(data.len() >= chunk::HEADER_LEN);
            assert_eq!(rest.len(), data.len() - chunk::HEADER_LEN);
            assert_eq!(chunk::frame(index, rest), data);
        }
        Err(chunk::TooShort(len)) => {
            assert_eq!(len, data.len());
            assert!(len < chunk::HEADER_LEN);
        }
    }
});
