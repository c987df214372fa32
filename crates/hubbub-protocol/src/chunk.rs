//! The binary frame of a file upload: a 4-byte big-endian chunk index
//! followed by the chunk's bytes.

/// Length of the chunk index that starts every binary upload frame.
pub const HEADER_LEN: usize = 4;

/// A binary frame too short to hold a chunk index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Binary frame of {0} bytes is too short for a chunk index")]
pub struct TooShort(pub usize);

/// Splits a binary upload frame into its chunk index and data.
///
/// ```
/// let (index, data) = hubbub_protocol::chunk::split(&[0, 0, 1, 2, 0xAA]).unwrap();
/// assert_eq!((index, data), (258, &[0xAA][..]));
/// ```
pub fn split(frame: &[u8]) -> Result<(u32, &[u8]), TooShort> {
    match frame.split_first_chunk::<HEADER_LEN>() {
        Some((header, data)) => Ok((u32::from_be_bytes(*header), data)),
        None => Err(TooShort(frame.len())),
    }
}

/// Builds a binary upload frame from a chunk index and its data.
pub fn frame(index: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + data.len());
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_and_split_agree() {
        let f = frame(7, b"hello");
        assert_eq!(split(&f).unwrap(), (7, &b"hello"[..]));
        assert_eq!(split(&[1, 2, 3]).unwrap_err(), TooShort(3));
        assert_eq!(split(&frame(u32::MAX, &[])).unwrap(), (u32::MAX, &[][..]));
    }
}
