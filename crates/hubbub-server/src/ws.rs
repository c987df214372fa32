//! The server side of RFC 6455 framing, without IO.
//!
//! [`Decoder`] turns the bytes a client sends into messages: it checks every
//! frame header (masking, reserved bits and opcodes, control-frame rules,
//! size limits), unmasks in place, joins fragments, validates UTF-8 (for
//! fragmented text as each fragment arrives, so a bad message fails early)
//! and parses close frames. It holds no buffer while a connection is idle:
//! the connection reads into a buffer on its stack and hands the bytes over;
//! only bytes past the end of a complete message, or a frame that has not
//! fully arrived, are kept, in a buffer that is released as soon as it is
//! consumed. A frame larger than a read is collected in a buffer that the
//! connection reads into directly; the buffer grows with the bytes that
//! have arrived (at most doubling them), never to the length a header
//! announces, so headers alone cannot make the server reserve memory.
//!
//! With permessage-deflate negotiated (`deflate`), a client's message whose
//! first frame has RSV1 set is inflated once complete, with the message
//! size limit applied to the inflated size; without it, RSV1 stays a
//! protocol error.
//!
//! [`encode`] builds a server frame (never masked), which a broadcast
//! shares among all its recipients: the plain frame, and for a data frame
//! its compressed form, made the first time a recipient that negotiated
//! compression needs it ([`Frame::wire`]), and then shared likewise.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::deflate::{self, Deflate, InflateError};

/// The opcode of a frame the server sends (RFC 6455 section 5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum OpCode {
    /// Text data frame.
    Text = 0x1,
    /// Binary data frame.
    Binary = 0x2,
    /// Connection close.
    Close = 0x8,
    /// Ping.
    Ping = 0x9,
    /// Pong.
    Pong = 0xA,
}

// The opcodes as the decoder reads them off the wire, where reserved values
// must be recognised and refused too.
const TEXT: u8 = OpCode::Text as u8;
const BINARY: u8 = OpCode::Binary as u8;
const PING: u8 = OpCode::Ping as u8;
const PONG: u8 = OpCode::Pong as u8;
const CLOSE: u8 = OpCode::Close as u8;
const CONTINUATION: u8 = 0x0;

/// A close code (RFC 6455 section 7.4 and the IANA registry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct CloseCode(u16);

impl CloseCode {
    /// 1000: the purpose of the connection is fulfilled.
    pub(crate) const NORMAL: Self = Self(1000);
    /// 1001: the server is going away (shutting down).
    pub(crate) const AWAY: Self = Self(1001);
    /// 1002: the peer broke the protocol.
    pub(crate) const PROTOCOL: Self = Self(1002);
    /// 1005: a close frame without a code (reported, never sent).
    pub(crate) const NO_STATUS: Self = Self(1005);
    /// 1006: the connection ended without a close frame (reported, never
    /// sent).
    pub(crate) const ABNORMAL: Self = Self(1006);
    /// 1007: a text message or close reason that is not UTF-8.
    pub(crate) const INVALID_DATA: Self = Self(1007);
    /// 1008: a policy was violated (slow consumer, rate limit).
    pub(crate) const POLICY: Self = Self(1008);
    /// 1009: a message too big to process.
    pub(crate) const TOO_BIG: Self = Self(1009);

    /// The code as a number.
    pub(crate) fn get(self) -> u16 {
        self.0
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        Self(code)
    }
}

/// A text message's payload: bytes checked to be UTF-8, shared without a
/// copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Text(Bytes);

impl Text {
    /// The text.
    pub(crate) fn as_str(&self) -> &str {
        // Every `Text` was checked when it was made (`TryFrom<Bytes>`).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The text's bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Its length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

impl TryFrom<Bytes> for Text {
    type Error = std::str::Utf8Error;

    fn try_from(bytes: Bytes) -> Result<Self, Self::Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Self(bytes))
    }
}

impl From<&str> for Text {
    fn from(text: &str) -> Self {
        Self(Bytes::copy_from_slice(text.as_bytes()))
    }
}

/// Largest frame header a server writes: 2 bytes plus an 8-byte length.
pub(crate) const MAX_HEADER: usize = 10;
/// Largest payload of a control frame.
const MAX_CONTROL_PAYLOAD: usize = 125;

/// A complete server frame, header included, ready for the socket and
/// shared by reference count among its recipients. It dereferences to the
/// plain (uncompressed) frame, whose length is what queue limits count.
#[derive(Clone, Debug)]
pub(crate) struct Frame(Arc<Encoded>);

/// The two forms of a frame.
#[derive(Debug)]
struct Encoded {
    /// The frame as RFC 6455 alone has it.
    plain: Vec<u8>,
    /// The frame compressed (RSV1 set), made once, by the first recipient
    /// that needs it; `None` inside when compressing does not make it
    /// smaller.
    deflated: OnceLock<Option<Box<[u8]>>>,
}

impl PartialEq for Frame {
    fn eq(&self, other: &Self) -> bool {
        self.0.plain == other.0.plain
    }
}

impl Eq for Frame {}

impl std::ops::Deref for Frame {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0.plain
    }
}

impl Frame {
    /// The bytes to send to a client that negotiated `deflate`: the
    /// compressed frame if the client can read it, the frame is a text or
    /// binary message of at least `min_bytes`, and compression makes it
    /// smaller; the plain frame otherwise. Control frames always go plain.
    /// The answer for a given client never changes, so a write that is cut
    /// short resumes in the same bytes.
    pub(crate) fn wire(&self, deflate: Deflate, min_bytes: usize) -> &[u8] {
        let plain = &self.0.plain;
        let (opcode, header_len) = split_header(plain);
        let payload_len = plain.len() - header_len;
        if !deflate.fits(payload_len) || payload_len < min_bytes || !matches!(opcode, TEXT | BINARY) {
            return plain;
        }
        let deflated = self.0.deflated.get_or_init(|| {
            let compressed = deflate::compress(&plain[header_len..])?;
            let mut frame = header(0xC0 | opcode, compressed.len());
            frame.extend_from_slice(&compressed);
            Some(frame.into_boxed_slice())
        });
        deflated.as_deref().unwrap_or(plain)
    }
}

/// The opcode of a server frame and the length of its header.
fn split_header(frame: &[u8]) -> (u8, usize) {
    let header_len = match frame.get(1).map(|len| len & 0x7F) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    (frame.first().map_or(0, |first| first & 0x0F), header_len)
}

/// Encodes a complete, unmasked server frame.
pub(crate) fn encode(opcode: OpCode, payload: &[u8]) -> Frame {
    let mut out = header(0x80 | opcode as u8, payload.len());
    out.extend_from_slice(payload);
    Frame(Arc::new(Encoded { plain: out, deflated: OnceLock::new() }))
}

/// A frame header with first byte `b0` (FIN, RSV and opcode) for a payload
/// of `len` bytes, in a buffer with room for the payload.
fn header(b0: u8, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_HEADER + len);
    out.push(b0);
    match len {
        len @ 0..=125 => out.push(len as u8),
        len @ 126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out
}

/// Encodes a close frame with a code and a reason (cut to fit a control
/// frame at a character boundary).
pub(crate) fn encode_close(code: CloseCode, reason: &str) -> Frame {
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.get().to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode(OpCode::Close, &payload)
}

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A text message (valid UTF-8).
    Text(Text),
    /// A binary message.
    Binary(Bytes),
    /// A ping; the payload goes back in the pong.
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// A close frame: its code and reason, if it had any.
    Close(Option<(CloseCode, String)>),
}

impl Incoming {
    /// Payload bytes of a text or binary message (0 for control frames).
    pub(crate) fn data_len(&self) -> usize {
        match self {
            Self::Text(text) => text.len(),
            Self::Binary(data) => data.len(),
            Self::Ping(_) | Self::Pong(_) | Self::Close(_) => 0,
        }
    }
}

/// Why the client's bytes cannot be read: the connection must close with
/// [`ReadError::close_code`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReadError {
    /// A frame breaks RFC 6455.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A frame or message is larger than the configured limit.
    #[error("message too big")]
    TooBig,
    /// A text message or close reason is not valid UTF-8.
    #[error("invalid UTF-8 in a text message or close reason")]
    Utf8,
    /// A compressed message is not a valid deflate stream.
    #[error("invalid compressed data")]
    Inflate,
}

impl From<InflateError> for ReadError {
    fn from(err: InflateError) -> Self {
        match err {
            InflateError::TooBig => Self::TooBig,
            InflateError::Invalid => Self::Inflate,
        }
    }
}

impl ReadError {
    /// The close code that answers this error.
    pub(crate) fn close_code(self) -> CloseCode {
        match self {
            Self::Protocol(_) => CloseCode::PROTOCOL,
            Self::TooBig => CloseCode::TOO_BIG,
            Self::Utf8 | Self::Inflate => CloseCode::INVALID_DATA,
        }
    }

    /// The close frame's reason text.
    pub(crate) fn close_reason(self) -> &'static str {
        match self {
            Self::Protocol(_) => "Protocol error",
            Self::TooBig => "Message too big",
            Self::Utf8 => "Text frame is not valid UTF-8",
            Self::Inflate => "Invalid compressed data",
        }
    }
}

/// Size limits for what a client may send.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FrameLimits {
    /// Largest frame payload.
    pub(crate) max_frame: usize,
    /// Largest message, all its fragments together (inflated, when
    /// compressed).
    pub(crate) max_message: usize,
}

/// A fragmented message whose last fragment has not arrived.
#[derive(Debug)]
struct Fragments {
    text: bool,
    /// Compressed (RSV1 on its first frame): inflated once complete, and
    /// its UTF-8 checked then.
    compressed: bool,
    data: Vec<u8>,
    /// How much of `data` is known to be valid UTF-8 (text only).
    valid_up_to: usize,
}

/// What one frame amounted to.
enum Parsed {
    /// The frame has not fully arrived.
    Incomplete,
    /// A frame was consumed; it may have completed something.
    Frame { consumed: usize, output: Option<Output> },
}

/// A complete message or control frame, its payload not yet copied out.
enum Output {
    /// The payload is `range` of the bytes just parsed (already unmasked).
    InPlace { opcode: u8, range: Range<usize>, compressed: bool },
    /// A fragmented message, joined.
    Joined { text: bool, compressed: bool, data: Vec<u8> },
}

/// Parser state that outlives a frame: limits, whether compression was
/// negotiated, and a message in fragments.
#[derive(Debug)]
struct FrameState {
    /// Largest frame payload; `u32` so that the flag below fits where the
    /// limits were, and an idle connection stays the same size.
    max_frame: u32,
    /// Largest message.
    max_message: u32,
    /// Whether the client may send compressed messages (RSV1).
    deflate: bool,
    /// Boxed: rare, and an idle connection should stay small.
    fragments: Option<Box<Fragments>>,
}

impl FrameState {
    fn max_frame(&self) -> usize {
        self.max_frame as usize
    }

    fn max_message(&self) -> usize {
        self.max_message as usize
    }

    /// Largest payload of a frame, compressed or not.
    fn frame_limit(&self, compressed: bool) -> usize {
        if compressed { deflate_slack(self.max_frame()) } else { self.max_frame() }
    }

    /// Largest message on the wire, compressed or not (a compressed one is
    /// held to `max_message` again once inflated).
    fn message_limit(&self, compressed: bool) -> usize {
        if compressed { deflate_slack(self.max_message()) } else { self.max_message() }
    }
}

/// A limit on compressed bytes: deflate expands data it cannot compress a
/// little (5 bytes for each stored block), so a message at the limit, sent
/// compressed as browsers send every message, must still fit. The inflated
/// message is held to the limit itself.
fn deflate_slack(limit: usize) -> usize {
    limit.saturating_add(limit / 256 + 64)
}

/// The decoder of one connection. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Decoder {
    state: FrameState,
    /// Bytes received and not yet consumed. Empty (and unallocated) unless
    /// a frame is in flight or a read held more than one message.
    buf: Vec<u8>,
    /// How much of `buf` is consumed.
    pos: usize,
}

impl Decoder {
    /// A decoder that enforces `limits` (capped at 4 GiB), and inflates
    /// compressed messages if `deflate` was negotiated.
    pub(crate) fn new(limits: FrameLimits, deflate: Deflate) -> Self {
        let cap = |limit: usize| u32::try_from(limit).unwrap_or(u32::MAX);
        let state = FrameState {
            max_frame: cap(limits.max_frame),
            max_message: cap(limits.max_message),
            deflate: deflate.is_on(),
            fragments: None,
        };
        Self { state, buf: Vec::new(), pos: 0 }
    }

    /// Takes bytes that arrived before the decoder existed, to be decoded
    /// before anything read later (by [`Decoder::next_buffered`]).
    pub(crate) fn preload(&mut self, early: &[u8]) {
        self.keep(early);
    }

    /// Whether bytes are waiting: [`Decoder::next_buffered`] may yield a
    /// message without another read.
    pub(crate) fn has_buffered(&self) -> bool {
        self.pos < self.buf.len()
    }

    /// Once at least `large` bytes of a frame of at least `large` bytes have
    /// arrived, how many more of its bytes to read now. The connection reads
    /// up to that many into [`Decoder::buffer`] (the room is there already,
    /// so the read does not reallocate), then calls
    /// [`Decoder::next_buffered`], and repeats until this says `None`. A
    /// large frame is thus neither copied out of a read nor read together
    /// with the start of the next one, so it is handed over whole.
    ///
    /// Room is added only as bytes arrive: each step at most doubles what
    /// has arrived, and never goes past the frame's end, so a header that
    /// announces a large frame costs nothing until its bytes come. Before
    /// `large` bytes have arrived this says `None`, and the connection reads
    /// into its stack buffer and [`Decoder::feed`]s what came.
    pub(crate) fn large_frame_remaining(&mut self, large: usize) -> Option<usize> {
        let total = frame_len(&self.buf[self.pos..], self.state.frame_limit(self.state.deflate))?;
        let arrived = self.buf.len() - self.pos;
        if total < large || arrived < large || arrived >= total {
            return None;
        }
        if self.pos > 0 {
            // The frame starts the buffer, so it can be handed over whole.
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let remaining = total - arrived;
        if self.buf.capacity() == self.buf.len() {
            self.buf.reserve_exact(remaining.min(arrived));
        }
        Some(remaining.min(self.buf.capacity() - self.buf.len()))
    }

    /// The buffer a large frame is read into; see
    /// [`Decoder::large_frame_remaining`].
    pub(crate) fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Takes fresh bytes (unmasked in place) and returns the first message
    /// they complete, if any; the rest is kept for
    /// [`Decoder::next_buffered`].
    pub(crate) fn feed(&mut self, data: &mut [u8]) -> Result<Option<Incoming>, ReadError> {
        if self.has_buffered() {
            self.buf.extend_from_slice(data);
            return self.next_buffered();
        }
        let mut at = 0;
        while at < data.len() {
            match self.state.parse(&mut data[at..])? {
                Parsed::Incomplete => break,
                Parsed::Frame { consumed, output } => {
                    let start = at;
                    at += consumed;
                    if let Some(output) = output {
                        let frame = &data[start..at];
                        let message = finish(output, self.state.max_message(), |range| {
                            Bytes::copy_from_slice(&frame[range])
                        })?;
                        self.keep(&data[at..]);
                        return Ok(Some(message));
                    }
                }
            }
        }
        self.keep(&data[at..]);
        Ok(None)
    }

    /// The next message in the bytes already received, if they complete one.
    pub(crate) fn next_buffered(&mut self) -> Result<Option<Incoming>, ReadError> {
        while self.has_buffered() {
            let parsed = self.state.parse(&mut self.buf[self.pos..])?;
            let Parsed::Frame { consumed, output } = parsed else {
                break;
            };
            let start = self.pos;
            self.pos += consumed;
            if let Some(output) = output {
                let message = if start == 0 && self.pos == self.buf.len() {
                    // The buffer holds exactly this frame: hand it over
                    // without copying (a large upload chunk, typically).
                    let whole = Bytes::from(std::mem::take(&mut self.buf));
                    self.pos = 0;
                    finish(output, self.state.max_message(), |range| whole.slice(range))?
                } else {
                    let frame = &self.buf[start..self.pos];
                    let message = finish(output, self.state.max_message(), |range| {
                        Bytes::copy_from_slice(&frame[range])
                    })?;
                    self.compact();
                    message
                };
                return Ok(Some(message));
            }
        }
        self.compact();
        Ok(None)
    }

    /// Drops consumed bytes, and the allocation once nothing is left.
    fn compact(&mut self) {
        if self.pos == self.buf.len() {
            self.buf = Vec::new();
            self.pos = 0;
        } else if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// Keeps unconsumed bytes of a read: only those, not the room the frame
    /// they begin will need (see [`Decoder::large_frame_remaining`]).
    fn keep(&mut self, rest: &[u8]) {
        self.buf.extend_from_slice(rest);
    }
}

/// The length of the frame at the start of `data` (header and payload), if
/// its header is complete and its payload within `max_frame` (a larger one
/// is refused by the parser before any of it is read).
fn frame_len(data: &[u8], max_frame: usize) -> Option<usize> {
    let header = Header::parse(data).ok()??;
    (header.len <= max_frame).then_some(header.header_len + header.len)
}

/// A frame header.
struct Header {
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    mask: [u8; 4],
    len: usize,
    header_len: usize,
}

impl Header {
    /// Reads a header; `None` until it has fully arrived.
    fn parse(data: &[u8]) -> Result<Option<Self>, ReadError> {
        let [b0, b1, ..] = *data else {
            return Ok(None);
        };
        let masked = b1 & 0x80 != 0;
        let (len, mut at) = match b1 & 0x7F {
            126 => {
                let Some(bytes) = data.get(2..4) else { return Ok(None) };
                (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4)
            }
            127 => {
                let Some(bytes) = data.get(2..10) else { return Ok(None) };
                let mut raw = [0; 8];
                raw.copy_from_slice(bytes);
                let len = u64::from_be_bytes(raw);
                if len >> 63 != 0 {
                    return Err(ReadError::Protocol("payload length with the top bit set"));
                }
                (len, 10)
            }
            len => (u64::from(len), 2),
        };
        let mut mask = [0; 4];
        if masked {
            let Some(bytes) = data.get(at..at + 4) else { return Ok(None) };
            mask.copy_from_slice(bytes);
            at += 4;
        }
        Ok(Some(Self {
            fin: b0 & 0x80 != 0,
            rsv: b0 & 0x70,
            opcode: b0 & 0x0F,
            masked,
            mask,
            len: usize::try_from(len).unwrap_or(usize::MAX),
            header_len: at,
        }))
    }
}

impl FrameState {
    /// Parses one frame at the start of `data`, unmasking its payload in
    /// place.
    fn parse(&mut self, data: &mut [u8]) -> Result<Parsed, ReadError> {
        let Some(header) = Header::parse(data)? else {
            return Ok(Parsed::Incomplete);
        };
        // Everything about the header is checked before its payload arrives,
        // so an oversized or bogus frame is refused without buffering it.
        // RSV1 marks a compressed message, on its first frame only.
        let compressed = header.rsv == 0x40 && self.deflate && matches!(header.opcode, TEXT | BINARY);
        if header.rsv != 0 && !compressed {
            return Err(ReadError::Protocol("reserved bits set without an extension"));
        }
        if !header.masked {
            return Err(ReadError::Protocol("client frame not masked"));
        }
        let control = header.opcode & 0x8 != 0;
        match header.opcode {
            CONTINUATION if self.fragments.is_none() => {
                return Err(ReadError::Protocol("continuation frame with nothing to continue"));
            }
            TEXT | BINARY if self.fragments.is_some() => {
                return Err(ReadError::Protocol("new message before the last one finished"));
            }
            CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG => {}
            _ => return Err(ReadError::Protocol("reserved opcode")),
        }
        if control && (!header.fin || header.len > MAX_CONTROL_PAYLOAD) {
            return Err(ReadError::Protocol("control frame fragmented or over 125 bytes"));
        }
        let continues_compressed =
            header.opcode == CONTINUATION && self.fragments.as_ref().is_some_and(|f| f.compressed);
        if header.len > self.frame_limit(compressed || continues_compressed) {
            return Err(ReadError::TooBig);
        }
        if let Some(fragments) = &self.fragments
            && !control
            && fragments.data.len().saturating_add(header.len) > self.message_limit(fragments.compressed)
        {
            return Err(ReadError::TooBig);
        }
        let end = header.header_len + header.len;
        if data.len() < end {
            return Ok(Parsed::Incomplete);
        }
        let range = header.header_len..end;
        unmask(&mut data[range.clone()], header.mask);

        let output = match header.opcode {
            CONTINUATION => {
                let Some(fragments) = self.fragments.as_mut() else {
                    return Err(ReadError::Protocol("continuation frame with nothing to continue"));
                };
                fragments.data.extend_from_slice(&data[range]);
                if fragments.text && !fragments.compressed {
                    check_utf8_prefix(fragments, header.fin)?;
                }
                if header.fin {
                    self.fragments.take().map(|f| Output::Joined {
                        text: f.text,
                        compressed: f.compressed,
                        data: f.data,
                    })
                } else {
                    None
                }
            }
            TEXT | BINARY if !header.fin => {
                let mut fragments = Box::new(Fragments {
                    text: header.opcode == TEXT,
                    compressed,
                    data: data[range].to_vec(),
                    valid_up_to: 0,
                });
                if fragments.text && !compressed {
                    check_utf8_prefix(&mut fragments, false)?;
                }
                self.fragments = Some(fragments);
                None
            }
            opcode => Some(Output::InPlace { opcode, range, compressed }),
        };
        Ok(Parsed::Frame { consumed: end, output })
    }
}

/// Checks the UTF-8 of a fragmented text message as far as it has arrived;
/// a character may be cut at the end unless this is the last fragment.
fn check_utf8_prefix(fragments: &mut Fragments, last: bool) -> Result<(), ReadError> {
    match std::str::from_utf8(&fragments.data[fragments.valid_up_to..]) {
        Ok(_) => {
            fragments.valid_up_to = fragments.data.len();
            Ok(())
        }
        Err(err) if err.error_len().is_none() && !last => {
            fragments.valid_up_to += err.valid_up_to();
            Ok(())
        }
        Err(_) => Err(ReadError::Utf8),
    }
}

/// Turns a parsed frame into a message. `payload` gives the bytes of a
/// range of the frame (header included): a copy, or a slice of a buffer
/// handed over whole. A compressed message is inflated into at most
/// `max_message` bytes. Text is validated once, here.
fn finish(
    output: Output,
    max_message: usize,
    payload: impl FnOnce(Range<usize>) -> Bytes,
) -> Result<Incoming, ReadError> {
    match output {
        Output::InPlace { opcode, range, compressed: true } => {
            joined(opcode == TEXT, deflate::inflate(&payload(range), max_message)?)
        }
        Output::InPlace { opcode: TEXT, range, compressed: false } => {
            Text::try_from(payload(range)).map(Incoming::Text).map_err(|_| ReadError::Utf8)
        }
        Output::InPlace { opcode, range, compressed: false } => finish_control(opcode, payload(range)),
        Output::Joined { text, compressed: true, data } => {
            joined(text, deflate::inflate(&data, max_message)?)
        }
        Output::Joined { text, compressed: false, data } => joined(text, data),
    }
}

fn joined(text: bool, data: Vec<u8>) -> Result<Incoming, ReadError> {
    let bytes = Bytes::from(data);
    if text {
        // Validated fragment by fragment if it came in fragments and
        // uncompressed; checked whole here otherwise.
        Text::try_from(bytes).map(Incoming::Text).map_err(|_| ReadError::Utf8)
    } else {
        Ok(Incoming::Binary(bytes))
    }
}

/// A single-frame binary message or a control frame.
fn finish_control(opcode: u8, payload: Bytes) -> Result<Incoming, ReadError> {
    Ok(match opcode {
        BINARY => Incoming::Binary(payload),
        PING => Incoming::Ping(payload),
        PONG => Incoming::Pong(payload),
        _ => Incoming::Close(parse_close(&payload)?),
    })
}

/// A close frame's code and reason.
fn parse_close(payload: &[u8]) -> Result<Option<(CloseCode, String)>, ReadError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ReadError::Protocol("close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_allowed(code) {
                return Err(ReadError::Protocol("invalid close code"));
            }
            let code = CloseCode::from(code);
            let reason = std::str::from_utf8(reason).map_err(|_| ReadError::Utf8)?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

/// Whether a peer may send this close code (RFC 6455 section 7.4 and the
/// IANA registry it set up): the registered codes, except 1004 (reserved),
/// 1005, 1006 and 1015 (for reporting only, never sent), and the ranges for
/// libraries and applications. 1014 (Bad Gateway) was registered after RFC
/// 6455 and is allowed.
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs `data` with the mask, which starts at `data[0]`.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: FrameLimits = FrameLimits { max_frame: 1024, max_message: 4096 };
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A client frame: masked, with the given first byte.
    fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        // Any opcode will do for the header's shape; the first byte is
        // replaced below.
        let mut out = encode(OpCode::Binary, payload).to_vec();
        out[0] = b0;
        out[1] |= 0x80;
        let header = out.len() - payload.len();
        let mut body = out.split_off(header);
        out.extend_from_slice(&MASK);
        unmask(&mut body, MASK);
        out.extend_from_slice(&body);
        out
    }

    fn text(s: &str) -> Incoming {
        Incoming::Text(Text::from(s))
    }

    /// Feeds `bytes` in chunks of `chunk`, collecting every message.
    fn decode_chunked(bytes: &[u8], chunk: usize) -> Result<Vec<Incoming>, ReadError> {
        let mut decoder = Decoder::new(LIMITS, Deflate::OFF);
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk) {
            let mut piece = piece.to_vec();
            if let Some(message) = decoder.feed(&mut piece)? {
                out.push(message);
            }
            while let Some(message) = decoder.next_buffered()? {
                out.push(message);
            }
        }
        assert!(!decoder.has_buffered(), "bytes left over");
        assert_eq!(decoder.buf.capacity(), 0, "buffer kept after everything was consumed");
        Ok(out)
    }

    #[test]
    fn messages_survive_any_chopping() {
        let mut stream = client_frame(0x81, b"hello");
        stream.extend(client_frame(0x82, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]));
        stream.extend(client_frame(0x01, "caf".as_bytes()));
        stream.extend(client_frame(0x89, b"ping!"));
        stream.extend(client_frame(0x80, "é au lait".as_bytes()));
        stream.extend(client_frame(0x81, &[b'x'; 300]));
        stream.extend(client_frame(0x8A, b""));
        stream.extend(client_frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e']));
        let expected = vec![
            text("hello"),
            Incoming::Binary(Bytes::from_static(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9])),
            Incoming::Ping(Bytes::from_static(b"ping!")),
            text("café au lait"),
            text(&"x".repeat(300)),
            Incoming::Pong(Bytes::new()),
            Incoming::Close(Some((CloseCode::NORMAL, "bye".to_owned()))),
        ];
        for chunk in [1, 2, 3, 7, 64, stream.len()] {
            assert_eq!(decode_chunked(&stream, chunk).unwrap(), expected, "chunk size {chunk}");
        }
    }

    /// Reads `frame` the way the connection does (`conn::poll_read`):
    /// pieces of at most `chunk` bytes through `feed` until the decoder asks
    /// for the rest of a large frame, then straight into its buffer. Checks
    /// after every step that the buffer holds at most twice what has
    /// arrived, and that a read into it never reallocates.
    fn read_like_the_connection(decoder: &mut Decoder, frame: &[u8], chunk: usize) -> Option<Incoming> {
        let mut at = 0;
        loop {
            if decoder.has_buffered()
                && let Some(message) = decoder.next_buffered().unwrap()
            {
                return Some(message);
            }
            if decoder.has_buffered()
                && let Some(want) = decoder.large_frame_remaining(chunk)
            {
                let capacity = decoder.buf.capacity();
                let n = want.min(chunk).min(frame.len() - at);
                assert!(n > 0, "asked for bytes the frame does not have");
                decoder.buffer().extend_from_slice(&frame[at..at + n]);
                at += n;
                assert_eq!(decoder.buf.capacity(), capacity, "a read into the buffer reallocated");
            } else {
                let n = chunk.min(frame.len() - at);
                if n == 0 {
                    return None;
                }
                let message = decoder.feed(&mut frame[at..at + n].to_vec()).unwrap();
                at += n;
                if message.is_some() {
                    return message;
                }
            }
            let held = decoder.buf.len() - decoder.pos;
            assert!(
                decoder.buf.capacity() <= 2 * held.max(chunk),
                "{} reserved for {held}",
                decoder.buf.capacity()
            );
        }
    }

    #[test]
    fn large_frames_are_read_in_place_and_handed_over_whole() {
        let limits = FrameLimits { max_frame: 1 << 20, max_message: 1 << 20 };
        let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let frame = client_frame(0x82, &payload);
        let mut decoder = Decoder::new(limits, Deflate::OFF);
        let message = read_like_the_connection(&mut decoder, &frame, 8192);
        assert_eq!(message, Some(Incoming::Binary(Bytes::from(payload))));
        assert_eq!(decoder.buf.capacity(), 0);
    }

    #[test]
    fn a_header_announcing_a_large_frame_reserves_nothing_until_its_bytes_come() {
        let limits = FrameLimits { max_frame: 65_540, max_message: 65_540 };
        let mut decoder = Decoder::new(limits, Deflate::OFF);
        // A masked binary frame header announcing 65,540 bytes, and 100 of them.
        let mut header = vec![0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 4];
        header.extend_from_slice(&MASK);
        assert_eq!(decoder.feed(&mut header.clone()).unwrap(), None);
        assert!(decoder.buf.capacity() < 64, "{} bytes reserved for a header", decoder.buf.capacity());
        assert_eq!(decoder.large_frame_remaining(8192), None, "read more before growing");
        assert_eq!(decoder.feed(&mut [0; 100]).unwrap(), None);
        assert!(decoder.buf.capacity() < 2 * (header.len() + 100));
        assert_eq!(decoder.large_frame_remaining(8192), None);
    }

    #[test]
    fn bad_frames_are_refused_with_the_right_code() {
        let cases: Vec<(Vec<u8>, ReadError)> = vec![
            (client_frame(0xC1, b"rsv1"), ReadError::Protocol("reserved bits set without an extension")),
            (client_frame(0x83, b""), ReadError::Protocol("reserved opcode")),
            (client_frame(0x8B, b""), ReadError::Protocol("reserved opcode")),
            (client_frame(0x80, b"x"), ReadError::Protocol("continuation frame with nothing to continue")),
            (client_frame(0x09, b""), ReadError::Protocol("control frame fragmented or over 125 bytes")),
            (
                client_frame(0x89, &[0; 126]),
                ReadError::Protocol("control frame fragmented or over 125 bytes"),
            ),
            (client_frame(0x82, &[0; 1025]), ReadError::TooBig),
            (client_frame(0x81, &[0xff, 0xfe]), ReadError::Utf8),
            (client_frame(0x88, &[0x03]), ReadError::Protocol("close frame with a one-byte payload")),
            (client_frame(0x88, &[0x03, 0xed]), ReadError::Protocol("invalid close code")),
            (client_frame(0x88, &[0x03, 0xf7]), ReadError::Protocol("invalid close code")),
            (client_frame(0x88, &[0x03, 0xe8, 0xff]), ReadError::Utf8),
            (
                [client_frame(0x01, b"a"), client_frame(0x81, b"b")].concat(),
                ReadError::Protocol("new message before the last one finished"),
            ),
            (encode(OpCode::Text, b"unmasked").to_vec(), ReadError::Protocol("client frame not masked")),
        ];
        for (bytes, want) in cases {
            assert_eq!(decode_chunked(&bytes, bytes.len()).unwrap_err(), want, "{bytes:02x?}");
        }
    }

    #[test]
    fn oversized_frames_fail_on_the_header_alone() {
        let mut decoder = Decoder::new(LIMITS, Deflate::OFF);
        // A header announcing 2^40 bytes, and nothing else.
        let mut header = vec![0x82, 0xFF, 0, 0, 1, 0, 0, 0, 0, 0];
        header.extend_from_slice(&MASK);
        assert_eq!(decoder.feed(&mut header).unwrap_err(), ReadError::TooBig);
        let mut top_bit = vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(Decoder::new(LIMITS, Deflate::OFF).feed(&mut top_bit), Err(ReadError::Protocol(_))));
    }

    #[test]
    fn every_registered_close_code_a_peer_may_send_is_accepted() {
        for code in [1000_u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999] {
            let [hi, lo] = code.to_be_bytes();
            let got = decode_chunked(&client_frame(0x88, &[hi, lo]), 64).unwrap();
            assert_eq!(got, vec![Incoming::Close(Some((CloseCode::from(code), String::new())))], "{code}");
        }
        for code in [0_u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            let [hi, lo] = code.to_be_bytes();
            let err = decode_chunked(&client_frame(0x88, &[hi, lo]), 64).unwrap_err();
            assert_eq!(err, ReadError::Protocol("invalid close code"), "{code}");
        }
    }

    #[test]
    fn fragmented_messages_are_bounded_and_fail_fast_on_bad_utf8() {
        let fragment = client_frame(0x02, &[0; 1000]);
        let more = client_frame(0x00, &[0; 1000]);
        let stream = [fragment, more.clone(), more.clone(), more.clone(), more].concat();
        assert_eq!(decode_chunked(&stream, 512).unwrap_err(), ReadError::TooBig);

        // The bad byte is in the first fragment; the message never finishes.
        let bad = client_frame(0x01, &[b'a', 0xC0, b'b']);
        assert_eq!(decode_chunked(&bad, bad.len()).unwrap_err(), ReadError::Utf8);
        // A character cut between fragments is fine.
        let euro = "€".as_bytes();
        let split = [client_frame(0x01, &euro[..1]), client_frame(0x80, &euro[1..])].concat();
        assert_eq!(decode_chunked(&split, 1).unwrap(), vec![text("€")]);
        // ... unless the message ends with it cut.
        let cut = [client_frame(0x01, b"a"), client_frame(0x80, &euro[..2])].concat();
        assert_eq!(decode_chunked(&cut, cut.len()).unwrap_err(), ReadError::Utf8);
    }

    /// Decodes `bytes` whole with compression negotiated.
    fn decode_deflate(bytes: &[u8]) -> Result<Vec<Incoming>, ReadError> {
        let mut decoder = Decoder::new(LIMITS, Deflate::FULL);
        let mut out = Vec::new();
        if let Some(message) = decoder.feed(&mut bytes.to_vec())? {
            out.push(message);
        }
        while let Some(message) = decoder.next_buffered()? {
            out.push(message);
        }
        Ok(out)
    }

    #[test]
    fn compressed_messages_are_inflated_within_the_message_limit() {
        let chat = "{\"type\":\"chatMessage\",\"text\":\"hello hello hello hello\"}".repeat(20);
        let deflated = deflate::compress(chat.as_bytes()).unwrap();
        let (first, rest) = deflated.split_at(deflated.len() / 2);
        let stream = [
            client_frame(0xC1, &deflated),
            client_frame(0x81, b"plain"),
            client_frame(0x42, first),
            client_frame(0x89, b"p"),
            client_frame(0x80, rest),
        ]
        .concat();
        assert_eq!(
            decode_deflate(&stream).unwrap(),
            vec![
                text(&chat),
                text("plain"),
                Incoming::Ping(Bytes::from_static(b"p")),
                Incoming::Binary(Bytes::from(chat.clone().into_bytes())),
            ]
        );
        // A bomb: a few hundred compressed bytes that inflate far past the
        // 4,096-byte limit.
        let bomb = deflate::compress(&[b'a'; 256 << 10]).unwrap();
        assert!(bomb.len() < LIMITS.max_frame);
        assert_eq!(decode_deflate(&client_frame(0xC1, &bomb)).unwrap_err(), ReadError::TooBig);
        // A message at the frame limit that does not compress grows a little
        // on the wire; it is still accepted.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let noise: Vec<u8> = (0..LIMITS.max_frame)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        let mut stored = vec![0x01, 0x00, 0x04, 0xff, 0xfb];
        stored.extend_from_slice(&noise);
        assert!(stored.len() > LIMITS.max_frame);
        assert_eq!(
            decode_deflate(&client_frame(0xC2, &stored)).unwrap(),
            vec![Incoming::Binary(Bytes::from(noise))]
        );
        let bad = [
            (client_frame(0xC1, &[0xff, 0xff, 0xff]), ReadError::Inflate),
            (client_frame(0xC1, &deflate::compress(&[0xff; 400]).unwrap()), ReadError::Utf8),
            (
                [client_frame(0x41, first), client_frame(0xC0, rest)].concat(),
                ReadError::Protocol("reserved bits set without an extension"),
            ),
            (client_frame(0xC9, b""), ReadError::Protocol("reserved bits set without an extension")),
            (client_frame(0xA1, b"rsv2"), ReadError::Protocol("reserved bits set without an extension")),
        ];
        for (bytes, want) in bad {
            assert_eq!(decode_deflate(&bytes).unwrap_err(), want, "{bytes:02x?}");
        }
    }

    #[test]
    fn a_frame_is_compressed_once_and_only_for_those_who_can_read_it() {
        let payload = "abc".repeat(200);
        let frame = encode(OpCode::Text, payload.as_bytes());
        assert_eq!(frame.wire(Deflate::OFF, 0), &*frame);
        let deflated = frame.wire(Deflate::FULL, 256);
        assert_eq!(deflated[0], 0xC1, "FIN, RSV1, text");
        assert!(deflated.len() < 40);
        assert_eq!(deflate::inflate(&deflated[2..], 1 << 10).unwrap(), payload.as_bytes());
        // The same bytes, shared, for every reader.
        assert_eq!(frame.clone().wire(Deflate::FULL, 256).as_ptr(), deflated.as_ptr());
        // Under the threshold, past a small window, or a control frame: plain.
        assert_eq!(frame.wire(Deflate::FULL, 601), &*frame);
        assert_eq!(frame.wire(Deflate::from_byte(9), 0), &*frame);
        assert_eq!(frame.wire(Deflate::from_byte(10), 0), deflated);
        let ping = encode(OpCode::Ping, &[b'a'; 100]);
        assert_eq!(ping.wire(Deflate::FULL, 0), &*ping);
    }

    #[test]
    fn control_frames_may_interleave_with_fragments() {
        let stream =
            [client_frame(0x01, b"one "), client_frame(0x89, b"p"), client_frame(0x80, b"two")].concat();
        assert_eq!(
            decode_chunked(&stream, 5).unwrap(),
            vec![Incoming::Ping(Bytes::from_static(b"p")), text("one two")]
        );
    }

    #[test]
    fn encoded_frames_have_minimal_headers() {
        assert_eq!(encode(OpCode::Text, b"hi").as_ref(), &[0x81, 2, b'h', b'i']);
        assert_eq!(&encode(OpCode::Binary, &[0; 126])[..4], &[0x82, 126, 0, 126]);
        assert_eq!(&encode(OpCode::Binary, &[0; 70_000])[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        let close = encode_close(CloseCode::POLICY, &"é".repeat(100));
        assert_eq!(close.len(), 2 + 2 + 122);
        assert_eq!(&close[2..4], &[0x03, 0xf0]);
    }

    #[test]
    fn unmask_matches_the_bytewise_definition() {
        let data: Vec<u8> = (0..=255).collect();
        for len in [0, 1, 7, 8, 9, 31, 256] {
            let mut fast = data[..len].to_vec();
            unmask(&mut fast, MASK);
            let slow: Vec<u8> = data[..len].iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]).collect();
            assert_eq!(fast, slow);
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Splits `bytes` at the given cut points (taken modulo its length).
        fn chop(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut pieces = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                pieces.push(bytes[from..cut].to_vec());
                from = cut;
            }
            pieces
        }

        /// Feeds the pieces until the first error; returns what came out.
        fn run(decoder: &mut Decoder, pieces: Vec<Vec<u8>>) -> Result<Vec<Incoming>, ReadError> {
            let mut out = Vec::new();
            for mut piece in pieces {
                if let Some(message) = decoder.feed(&mut piece)? {
                    out.push(message);
                }
                while let Some(message) = decoder.next_buffered()? {
                    out.push(message);
                }
                // Nothing beyond one frame, or one message, is ever held.
                assert!(decoder.buf.len() - decoder.pos <= LIMITS.max_frame + 14 + 8192);
                assert!(decoder.state.fragments.as_ref().is_none_or(|f| f.data.len() <= LIMITS.max_message));
            }
            Ok(out)
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic_and_stay_bounded(
                bytes in proptest::collection::vec(any::<u8>(), 0..4096),
                cuts in proptest::collection::vec(any::<usize>(), 0..8),
            ) {
                let _ = run(&mut Decoder::new(LIMITS, Deflate::OFF), chop(&bytes, &cuts));
            }

            #[test]
            fn fragmented_messages_decode_whatever_the_chopping(
                messages in proptest::collection::vec(
                    (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300), 1..4_usize),
                    1..6,
                ),
                cuts in proptest::collection::vec(any::<usize>(), 0..12),
            ) {
                let mut stream = Vec::new();
                let mut expected = Vec::new();
                for (text, raw, parts) in messages {
                    let payload = if text { String::from_utf8_lossy(&raw).into_owned().into_bytes() } else { raw };
                    let opcode = if text { TEXT } else { BINARY };
                    let size = payload.len().div_ceil(parts).max(1);
                    let chunks: Vec<&[u8]> =
                        if payload.is_empty() { vec![&[]] } else { payload.chunks(size).collect() };
                    for (i, chunk) in chunks.iter().enumerate() {
                        let first = if i == 0 { opcode } else { CONTINUATION };
                        let fin = if i + 1 == chunks.len() { 0x80 } else { 0 };
                        stream.extend(client_frame(fin | first, chunk));
                    }
                    expected.push(if text {
                        Incoming::Text(Text::try_from(Bytes::from(payload)).unwrap())
                    } else {
                        Incoming::Binary(Bytes::from(payload))
                    });
                }
                let limits = FrameLimits { max_frame: 1024, max_message: 4096 };
                let got = run(&mut Decoder::new(limits, Deflate::OFF), chop(&stream, &cuts)).unwrap();
                prop_assert_eq!(got, expected);
            }
        }
    }
}
