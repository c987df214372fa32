//! The hexadecimal form of the SHA-256 digest carried in `fileStart`.

use crate::{Result, TransferError};

/// Parses a SHA-256 digest written as 64 hexadecimal characters, in either
/// case, with nothing around them.
///
/// ```
/// use hubbub_transfer::{parse_sha256_hex, sha256_to_hex, TransferError};
///
/// // The SHA-256 of the empty string.
/// let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// let digest = parse_sha256_hex(hex)?;
/// assert_eq!(digest[0], 0xe3);
/// assert_eq!(sha256_to_hex(&digest), hex);
/// assert_eq!(parse_sha256_hex("e3b0"), Err(TransferError::InvalidSha256Hex));
/// # Ok::<(), TransferError>(())
/// ```
pub fn parse_sha256_hex(hex: &str) -> Result<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return Err(TransferError::InvalidSha256Hex);
    }
    let mut digest = [0; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.chunks_exact(2)) {
        let &[high, low] = pair else {
            return Err(TransferError::InvalidSha256Hex);
        };
        *byte = nibble(high)? << 4 | nibble(low)?;
    }
    Ok(digest)
}

/// Writes a SHA-256 digest as 64 lowercase hexadecimal characters, the form
/// [`parse_sha256_hex`] reads.
pub fn sha256_to_hex(digest: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    hex
}

fn nibble(digit: u8) -> Result<u8> {
    match digit {
        b'0'..=b'9' => Ok(digit - b'0'),
        b'a'..=b'f' => Ok(digit - b'a' + 10),
        b'A'..=b'F' => Ok(digit - b'A' + 10),
        _ => Err(TransferError::InvalidSha256Hex),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_cases_parse_to_the_same_digest() {
        let lower = "00ff10a0".repeat(8);
        let upper = lower.to_uppercase();
        let digest = parse_sha256_hex(&lower).unwrap();
        assert_eq!(parse_sha256_hex(&upper).unwrap(), digest);
        assert_eq!(&digest[..4], &[0x00, 0xff, 0x10, 0xa0]);
        assert_eq!(sha256_to_hex(&digest), lower);
    }

    #[test]
    fn malformed_hex_is_refused() {
        let good = "ab".repeat(32);
        for bad in [
            String::new(),
            "ab".repeat(31),
            "ab".repeat(33),
            format!("{good}a"),
            format!(" {}", &good[1..]),
            format!("{}g", &good[1..]),
            format!("{}é", &good[2..]),
        ] {
            assert_eq!(parse_sha256_hex(&bad), Err(TransferError::InvalidSha256Hex), "{bad:?}");
        }
    }
}
