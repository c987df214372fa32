//! A blocking WebSocket client made by hand, enough for the process tests:
//! masked text and binary frames out, JSON text frames in, every read with
//! a timeout, and a ping round trip to know that the server has set the
//! connection up.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::WAIT;

/// What a read with a timeout found.
#[derive(Debug)]
pub(super) enum Next {
    /// A text frame, as JSON.
    Message(Value),
    /// Nothing within the timeout.
    Timeout,
    /// The connection ended (a close frame, end of stream or a reset).
    Closed,
}

/// A WebSocket on a plain TCP stream.
pub(super) struct Chat {
    tcp: TcpStream,
    /// Bytes read past the last frame.
    pending: Vec<u8>,
    /// Text frames read while waiting for a pong, to be returned first.
    early: std::collections::VecDeque<Value>,
}

impl Chat {
    /// Opens `/ws/chat` and reads the greeting (`welcome`, `connected`).
    pub(super) fn connect(port: u16) -> Self {
        let mut chat = Self::open(port, "/ws/chat");
        assert_eq!(chat.recv()["type"], "welcome");
        assert_eq!(chat.recv()["type"], "connected");
        chat
    }

    /// Opens a WebSocket on `path`, reading nothing after the handshake.
    pub(super) fn open(port: u16, path: &str) -> Self {
        let tcp = super::abuse::upgrade(port, path);
        Self { tcp, pending: Vec::new(), early: std::collections::VecDeque::new() }
    }

    /// Sends `value` as a text frame; panics if the connection is gone.
    pub(super) fn send(&mut self, value: &Value) {
        self.try_send(value).expect("the connection is open");
    }

    /// Sends `value` as a text frame.
    pub(super) fn try_send(&mut self, value: &Value) -> std::io::Result<()> {
        self.send_frame(0x1, value.to_string().as_bytes())
    }

    /// Sends `data` as one binary frame.
    pub(super) fn send_binary(&mut self, data: &[u8]) {
        self.send_frame(0x2, data).expect("the connection is open");
    }

    /// Sends one masked frame (all-zero key, so the payload goes as it is).
    fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut frame = vec![0x80 | opcode];
        if payload.len() < 126 {
            frame.push(0x80 | payload.len() as u8);
        } else if let Ok(len) = u16::try_from(payload.len()) {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&len.to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(payload);
        self.tcp.write_all(&frame)
    }

    /// Waits until the server answers a ping: by then it has set up the
    /// connection (a notifications subscriber is registered, say). Text
    /// frames that arrive meanwhile are kept for [`Chat::next`].
    pub(super) fn round_trip(&mut self) {
        self.send_frame(0x9, b"sync").expect("the connection is open");
        let deadline = Instant::now() + WAIT;
        loop {
            match self.frame(deadline) {
                Some((0xA, payload)) if payload == b"sync" => return,
                Some((0x1, payload)) => self.early.push_back(serde_json::from_slice(&payload).unwrap()),
                Some((0x8, _)) | None => panic!("no pong: the connection ended or timed out"),
                Some(_) => {}
            }
        }
    }

    /// The next text frame, as JSON; panics after [`WAIT`] or if the
    /// connection ends.
    pub(super) fn recv(&mut self) -> Value {
        match self.next(WAIT) {
            Next::Message(value) => value,
            Next::Timeout => panic!("nothing arrived within {WAIT:?}"),
            Next::Closed => panic!("the connection ended"),
        }
    }

    /// The next message of type `kind`, skipping presence events.
    pub(super) fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let msg = self.recv();
            if msg["type"] == kind {
                return msg;
            }
            assert!(["userJoined", "userLeft"].contains(&msg["type"].as_str().unwrap()), "{msg}");
        }
    }

    /// The next text frame within `timeout` (control frames are skipped).
    pub(super) fn next(&mut self, timeout: Duration) -> Next {
        if let Some(value) = self.early.pop_front() {
            return Next::Message(value);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.frame(deadline) {
                Some((0x1, payload)) => return Next::Message(serde_json::from_slice(&payload).unwrap()),
                Some((0x8, _)) => return Next::Closed,
                Some(_) => {}
                None if Instant::now() >= deadline => return Next::Timeout,
                None => return Next::Closed,
            }
        }
    }

    /// The next frame (opcode and payload) before `deadline`; `None` when
    /// the deadline passed or the connection ended.
    fn frame(&mut self, deadline: Instant) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((opcode, payload, used)) = frame(&self.pending) {
                self.pending.drain(..used);
                return Some((opcode, payload));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.tcp.set_read_timeout(Some(left)).unwrap();
            let mut buf = [0_u8; 16 << 10];
            match self.tcp.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                // A reset: the server is gone.
                Err(_) => return None,
            }
        }
    }
}

/// A complete unmasked server frame at the start of `bytes`: opcode,
/// payload and bytes used.
fn frame(bytes: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if bytes.len() < 2 {
        return None;
    }
    let (header, len) = match bytes[1] & 0x7f {
        126 => (4, usize::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]))),
        127 => (10, u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?) as usize),
        len => (2, usize::from(len)),
    };
    let payload = bytes.get(header..header + len)?.to_vec();
    Some((bytes[0] & 0x0f, payload, header + len))
}
