//! permessage-deflate (RFC 7692): the handshake's negotiation, and the
//! compression and inflation of one message at a time.
//!
//! The server always answers with `server_no_context_takeover` and
//! `client_no_context_takeover`: every message is compressed, and
//! inflated, on its own. So no deflate or inflate state belongs to a
//! connection: a compressed frame is valid for every recipient whatever
//! each was sent before, which lets a broadcast be compressed once for all
//! of them (`ws::Frame`), and an idle connection holds nothing for
//! compression but the byte that says it was negotiated. The compressor and
//! the inflater are per thread, reset before each message.
//!
//! A client may ask for a smaller window than deflate's 32 KiB
//! (`server_max_window_bits`). The offer is accepted with the same value,
//! and a message longer than that window is simply sent uncompressed (the
//! RFC lets any message go uncompressed): without context takeover, no
//! back-reference of a compressed message reaches before its own start, so
//! one that fits the window is valid for that client too. The same shared
//! compressed frame thus serves clients of every window size.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in `Sec-WebSocket-Extensions`.
const NAME: &str = "permessage-deflate";
/// What a sync flush ends with, removed from a compressed message on the
/// wire and put back before it is inflated (RFC 7692 section 7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// Deflate's largest window, in bits.
const MAX_WINDOW_BITS: u8 = 15;
/// First output room for an inflated message, grown by doubling up to the
/// limit.
const INFLATE_START: usize = 4096;

/// What a connection negotiated, in one byte: `0` for no compression,
/// otherwise the largest window, in bits (8 to 15), that the client can
/// inflate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Deflate(u8);

impl Deflate {
    /// Not negotiated: every frame goes as it is, and RSV1 is a protocol
    /// error.
    pub(crate) const OFF: Self = Self(0);
    /// Negotiated with deflate's full 32 KiB window.
    #[cfg(test)]
    pub(crate) const FULL: Self = Self(MAX_WINDOW_BITS);

    /// Whether compression was negotiated.
    pub(crate) fn is_on(self) -> bool {
        self.0 != 0
    }

    /// Whether a message payload of `len` bytes may go compressed to this
    /// client (see the [module docs](self) on small windows).
    pub(crate) fn fits(self, len: usize) -> bool {
        match self.0 {
            0 => false,
            MAX_WINDOW_BITS => true,
            bits => len <= 1 << bits,
        }
    }

    /// The byte kept on the connection's shared half (`link`).
    pub(crate) fn to_byte(self) -> u8 {
        self.0
    }

    /// The inverse of [`Deflate::to_byte`].
    pub(crate) fn from_byte(byte: u8) -> Self {
        Self(byte)
    }
}

/// Picks the first `permessage-deflate` offer of a request's
/// `Sec-WebSocket-Extensions` values that the server can accept, and
/// returns what was negotiated and the response header's value. Offers with
/// unknown, repeated or malformed parameters are declined (RFC 7692
/// section 5); `None` if none is left.
pub(crate) fn negotiate<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<(Deflate, String)> {
    values.into_iter().flat_map(|value| value.split(',')).find_map(accept_offer)
}

/// One offer, `permessage-deflate; param; param=value`, if acceptable.
fn accept_offer(offer: &str) -> Option<(Deflate, String)> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(NAME) {
        return None;
    }
    let mut seen = [false; 4];
    let mut window = MAX_WINDOW_BITS;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (param, None),
        };
        let index = match (name, value) {
            ("server_no_context_takeover", None) => 0,
            ("client_no_context_takeover", None) => 1,
            ("server_max_window_bits", Some(value)) => {
                window = window_bits(value)?;
                2
            }
            ("client_max_window_bits", None) => 3,
            ("client_max_window_bits", Some(value)) => {
                // A hint that the client will use no more; our inflater
                // takes any window.
                window_bits(value)?;
                3
            }
            _ => return None,
        };
        if std::mem::replace(&mut seen[index], true) {
            return None;
        }
    }
    let mut response = format!("{NAME}; server_no_context_takeover; client_no_context_takeover");
    if seen[2] {
        response.push_str(&format!("; server_max_window_bits={window}"));
    }
    Some((Deflate(window), response))
}

/// A window size parameter: a number from 8 to 15, without leading zeros.
fn window_bits(value: &str) -> Option<u8> {
    let bits: u8 = value.parse().ok()?;
    ((8..=MAX_WINDOW_BITS).contains(&bits) && !value.starts_with('0')).then_some(bits)
}

thread_local! {
    /// This thread's compressor, reset before each message.
    static COMPRESSOR: RefCell<Option<Compress>> = const { RefCell::new(None) };
    /// This thread's inflater, reset before each message.
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// Compresses one message on its own (no context before or after), as it
/// goes on the wire: without the trailing `00 00 ff ff`. `None` when that
/// would not be smaller than the message.
pub(crate) fn compress(payload: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with_borrow_mut(|slot| {
        let compressor = slot.get_or_insert_with(|| Compress::new(Compression::default(), false));
        compressor.reset();
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        loop {
            let consumed = usize::try_from(compressor.total_in()).unwrap_or(usize::MAX);
            let input = payload.get(consumed..).unwrap_or_default();
            if out.capacity() - out.len() < 64 {
                out.reserve(out.len().max(64));
            }
            compressor.compress_vec(input, &mut out, FlushCompress::Sync).ok()?;
            let done = usize::try_from(compressor.total_in()).unwrap_or(usize::MAX) >= payload.len();
            // Output room left over means the flush is complete.
            if done && out.len() < out.capacity() {
                break;
            }
            if out.len() >= payload.len() + 64 {
                return None;
            }
        }
        if !out.ends_with(&TAIL) {
            return None;
        }
        out.truncate(out.len() - TAIL.len());
        (out.len() < payload.len()).then_some(out)
    })
}

/// Why a compressed message could not be inflated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum InflateError {
    /// The inflated message is larger than the limit; inflating stopped
    /// one byte past it.
    #[error("inflated message too big")]
    TooBig,
    /// The bytes are not a valid deflate stream.
    #[error("invalid compressed data")]
    Invalid,
}

/// Inflates one compressed message (as on the wire, without the trailing
/// `00 00 ff ff`) into at most `limit` bytes. Output room grows with what
/// has been inflated (doubling), never past `limit + 1`, so a decompression
/// bomb costs at most the limit before it is refused.
pub(crate) fn inflate(payload: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with_borrow_mut(|slot| {
        let inflater = slot.get_or_insert_with(|| Decompress::new(false));
        inflater.reset(false);
        let mut out = Vec::new();
        for input in [payload, &TAIL] {
            let mut at = 0;
            loop {
                if out.len() == out.capacity() {
                    if out.len() > limit {
                        return Err(InflateError::TooBig);
                    }
                    let room = out.len().max(INFLATE_START).min(limit + 1 - out.len());
                    out.reserve_exact(room);
                }
                let (before_in, before_out) = (inflater.total_in(), out.len());
                let status = inflater
                    .decompress_vec(&input[at..], &mut out, FlushDecompress::None)
                    .map_err(|_| InflateError::Invalid)?;
                at += usize::try_from(inflater.total_in() - before_in).unwrap_or(usize::MAX);
                if out.len() > limit {
                    return Err(InflateError::TooBig);
                }
                if status == Status::StreamEnd {
                    // A final block: whatever follows (the tail) is ignored.
                    return Ok(out);
                }
                let progress = inflater.total_in() != before_in || out.len() != before_out;
                if at >= input.len() && out.len() < out.capacity() || !progress {
                    break;
                }
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_are_accepted_or_declined_as_rfc_7692_says() {
        let full = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        for offer in [
            "permessage-deflate",
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; client_max_window_bits=10; server_no_context_takeover",
            "x-webkit-deflate-frame, permessage-deflate; client_no_context_takeover",
            "permessage-deflate; server_max_window_bits=bad, permessage-deflate",
        ] {
            assert_eq!(negotiate([offer]), Some((Deflate::FULL, full.to_owned())), "{offer}");
        }
        assert_eq!(
            negotiate(["permessage-deflate; server_max_window_bits=\"9\""]),
            Some((Deflate(9), format!("{full}; server_max_window_bits=9")))
        );
        for offer in [
            "",
            "x-webkit-deflate-frame",
            "permessage-deflate; unknown",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=09",
            "permessage-deflate; client_max_window_bits=1x",
            "permessage-deflate; server_no_context_takeover=1",
        ] {
            assert_eq!(negotiate([offer]), None, "{offer}");
        }
    }

    #[test]
    fn small_windows_take_only_messages_that_fit() {
        assert!(!Deflate::OFF.fits(10));
        assert!(Deflate::FULL.fits(1 << 20));
        assert!(Deflate(9).fits(512));
        assert!(!Deflate(9).fits(513));
    }

    #[test]
    fn messages_round_trip_and_small_or_random_ones_stay_plain() {
        let chat = r#"{"type":"chatMessage","user":"ada","text":"hello there, how is everyone doing today?","timestamp":1764000000000}"#.repeat(4);
        let compressed = compress(chat.as_bytes()).unwrap();
        assert!(compressed.len() < chat.len() / 2, "{} of {}", compressed.len(), chat.len());
        assert_eq!(inflate(&compressed, 1 << 20).unwrap(), chat.as_bytes());
        // Twice on the same thread: nothing carries over between messages.
        assert_eq!(compress(chat.as_bytes()).unwrap(), compressed);
        assert_eq!(compress(b"x"), None);
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let noise: Vec<u8> = (0..5000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        assert_eq!(compress(&noise), None);
        let big = vec![b'a'; 300_000];
        assert_eq!(inflate(&compress(&big).unwrap(), big.len()).unwrap(), big);
    }

    #[test]
    fn a_bomb_stops_one_byte_past_the_limit() {
        let bomb = compress(&vec![0; 10 << 20]).unwrap();
        assert!(bomb.len() < 20 << 10);
        assert_eq!(inflate(&bomb, 65_536), Err(InflateError::TooBig));
        assert_eq!(inflate(&bomb, 10 << 20).map(|out| out.len()), Ok(10 << 20));
        assert_eq!(inflate(&[0xff, 0xff, 0xff], 1024), Err(InflateError::Invalid));
        // The RFC's own example: "Hello" compressed.
        assert_eq!(inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 5).unwrap(), b"Hello");
        assert_eq!(inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 4), Err(InflateError::TooBig));
    }
}
