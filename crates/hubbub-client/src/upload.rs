//! The sending side of file uploads: one active upload at a time (the
//! protocol binds binary frames to the connection's current upload), the
//! others waiting behind it, each resumed after a reconnect.
//!
//! Sans-IO: the connection task asks what to send and reports what the
//! server answered.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use hubbub_protocol::{ClientMessage, ServerMessage};
use hubbub_transfer::{Chunker, sha256_to_hex};
use sha2::{Digest, Sha256};

use crate::Event;
use crate::error::{ClientError, Result};

/// A file to upload with [`Client::send_file`](crate::Client::send_file):
/// its name, media type and bytes.
///
/// The bytes are held in memory until the server has stored the file, so
/// that chunks lost with a connection can be sent again.
///
/// ```
/// use hubbub_client::FileUpload;
///
/// let file = FileUpload::from_bytes("notes.txt", b"hello".to_vec());
/// assert_eq!(file.mime_type, "text/plain");
/// let file = file.with_mime_type("text/markdown");
/// assert_eq!((file.name.as_str(), file.data.len()), ("notes.txt", 5));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileUpload {
    /// The name the room sees.
    pub name: String,
    /// The media type; guessed from the name's extension by the
    /// constructors, `application/octet-stream` when unknown.
    pub mime_type: String,
    /// The file's contents.
    pub data: Vec<u8>,
}

impl FileUpload {
    /// A file from bytes in memory.
    pub fn from_bytes(name: impl Into<String>, data: Vec<u8>) -> Self {
        let name = name.into();
        let mime_type = guess_mime_type(&name).to_owned();
        Self { name, mime_type, data }
    }

    /// Reads a file from disk; its name is the path's last component.
    pub async fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let data = tokio::fs::read(path)
            .await
            .map_err(|source| ClientError::ReadFile { path: path.to_owned(), source })?;
        let name = path.file_name().map_or_else(|| "file".to_owned(), |n| n.to_string_lossy().into_owned());
        Ok(Self::from_bytes(name, data))
    }

    /// Sets the media type.
    pub fn with_mime_type(mut self, mime_type: impl Into<String>) -> Self {
        self.mime_type = mime_type.into();
        self
    }
}

/// A media type for common extensions. Only used to label uploads; the
/// server decides what it serves files as.
fn guess_mime_type(name: &str) -> &'static str {
    let extension = name.rsplit_once('.').map(|(_, ext)| ext.to_ascii_lowercase());
    match extension.as_deref() {
        Some("txt" | "log") => "text/plain",
        Some("md") => "text/markdown",
        Some("html" | "htm") => "text/html",
        Some("csv") => "text/csv",
        Some("json") => "application/json",
        Some("pdf") => "application/pdf",
        Some("zip") => "application/zip",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("svg") => "image/svg+xml",
        Some("mp3") => "audio/mpeg",
        Some("mp4") => "video/mp4",
        _ => "application/octet-stream",
    }
}

/// A file the client has been asked to upload, ready to go: its bytes are
/// shared and hashed once.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// The client-chosen id, used to resume after a reconnect.
    pub(crate) transfer_id: String,
    /// The name the room sees.
    pub(crate) name: String,
    /// The media type.
    pub(crate) mime_type: String,
    /// The file's contents.
    pub(crate) data: Arc<[u8]>,
    /// Lower-case hex SHA-256 of `data`.
    pub(crate) sha256: String,
}

impl Prepared {
    /// Hashes the file. Blocking work: call it off the async threads.
    pub(crate) fn new(file: FileUpload) -> Self {
        let sha256 = sha256_to_hex(&Sha256::digest(&file.data).into());
        // A v4 UUID's 32 hex digits fit the protocol's 64-character limit.
        let transfer_id = uuid::Uuid::new_v4().simple().to_string();
        Self { transfer_id, name: file.name, mime_type: file.mime_type, data: file.data.into(), sha256 }
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }
}

/// Where one upload stands.
#[derive(Debug)]
enum Stage {
    /// Not started on the current link: `fileStart` comes next.
    Waiting,
    /// `fileStart` sent; waiting for `fileAccepted`.
    Starting,
    /// Started on a lost link: `fileResume` comes next.
    Interrupted,
    /// `fileResume` sent; waiting for `fileResumeState`.
    Resuming,
    /// Sending the chunks the server lacks.
    Sending(Chunker),
    /// `fileEnd` sent; waiting for `fileSaved`.
    Ending,
}

/// What the uploads want written next.
#[derive(Debug, PartialEq)]
pub(crate) enum Send {
    /// A text frame.
    Message(ClientMessage),
    /// A binary chunk frame.
    Chunk(Vec<u8>),
}

/// The uploads of one client, the active one first.
#[derive(Debug)]
pub(crate) struct Uploads {
    /// The chunk size asked for in `fileStart`.
    chunk_size: u32,
    /// Waiting uploads; the front one is active.
    queue: VecDeque<(Prepared, Stage)>,
}

impl Uploads {
    pub(crate) fn new(chunk_size: u32) -> Self {
        Self { chunk_size, queue: VecDeque::new() }
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn push(&mut self, upload: Prepared) {
        self.queue.push_back((upload, Stage::Waiting));
    }

    /// The link was lost. An upload that was started is resumed on the next
    /// link, even one whose `fileAccepted` never came: the server may have
    /// accepted it and kept it, and if not, the failed resume starts it over.
    pub(crate) fn on_link_lost(&mut self) {
        if let Some((_, stage)) = self.queue.front_mut()
            && !matches!(stage, Stage::Waiting)
        {
            *stage = Stage::Interrupted;
        }
    }

    /// On a live link: the next frame the uploads want sent, if any. Chunks
    /// come one per call, so the caller can interleave other traffic.
    pub(crate) fn next_send(&mut self) -> Option<Send> {
        let (upload, stage) = self.queue.front_mut()?;
        match stage {
            Stage::Waiting => {
                *stage = Stage::Starting;
                Some(Send::Message(ClientMessage::FileStart {
                    name: upload.name.clone(),
                    size: upload.size(),
                    mime_type: upload.mime_type.clone(),
                    sha256: Some(upload.sha256.clone()),
                    chunk_size: Some(self.chunk_size),
                    transfer_id: Some(upload.transfer_id.clone()),
                }))
            }
            Stage::Interrupted => {
                *stage = Stage::Resuming;
                Some(Send::Message(ClientMessage::FileResume { transfer_id: upload.transfer_id.clone() }))
            }
            Stage::Sending(chunker) => match chunker.next() {
                Some(chunk) => match chunk.frame(&upload.data) {
                    Some(frame) => Some(Send::Chunk(frame)),
                    // The chunker was built for this file's size.
                    None => unreachable!("a chunk lies outside its file"),
                },
                None => {
                    *stage = Stage::Ending;
                    Some(Send::Message(ClientMessage::FileEnd {
                        transfer_id: Some(upload.transfer_id.clone()),
                    }))
                }
            },
            Stage::Starting | Stage::Resuming | Stage::Ending => None,
        }
    }

    /// Whether [`Uploads::next_send`] has something now.
    pub(crate) fn wants_to_send(&self) -> bool {
        matches!(self.queue.front(), Some((_, Stage::Waiting | Stage::Interrupted | Stage::Sending(_))))
    }

    /// A server message about uploads. Returns the event to emit, if any.
    /// Messages about other uploads (stale ones from a lost link) are
    /// ignored.
    pub(crate) fn on_message(&mut self, msg: ServerMessage) -> Option<Event> {
        match msg {
            ServerMessage::FileProgress { transfer_id, received_bytes, size } => self
                .is_active(&transfer_id)
                .then_some(Event::FileProgress { transfer_id, received_bytes, size }),
            ServerMessage::FileAccepted { transfer_id, chunk_size, .. } => {
                let (upload, stage) = self.active_in(&transfer_id, |s| matches!(s, Stage::Starting))?;
                match Chunker::new(upload.size(), chunk_size) {
                    Ok(chunker) => {
                        *stage = Stage::Sending(chunker);
                        None
                    }
                    Err(err) => self.finish(Some(err.to_string())),
                }
            }
            ServerMessage::FileResumeState { transfer_id, chunk_size, received_chunks } => {
                let (upload, stage) = self.active_in(&transfer_id, |s| matches!(s, Stage::Resuming))?;
                let received = received_chunks.into_iter().map(|[start, end]| start..end);
                match Chunker::missing(upload.size(), chunk_size, received) {
                    Ok(chunker) => {
                        *stage = Stage::Sending(chunker);
                        None
                    }
                    Err(err) => self.finish(Some(err.to_string())),
                }
            }
            ServerMessage::FileSaved { file_id, name, size, mime_type, sha256, url, transfer_id, .. } => {
                if !self.is_active(&transfer_id) {
                    return None;
                }
                self.queue.pop_front();
                Some(Event::FileSaved { transfer_id, file_id, name, size, mime_type, sha256, url })
            }
            ServerMessage::FileError { transfer_id, message } => {
                if let Some(id) = &transfer_id
                    && !self.is_active(id)
                {
                    return None;
                }
                let (_, stage) = self.queue.front_mut()?;
                if matches!(stage, Stage::Resuming) {
                    // The server no longer has the upload (it restarted, or
                    // the upload expired): send it all again.
                    tracing::debug!(%message, "upload cannot be resumed; starting it again");
                    *stage = Stage::Waiting;
                    return None;
                }
                self.finish(Some(message))
            }
            ServerMessage::Error { code: Some(code), message, .. } if code == "uploadsDisabled" => {
                self.active_in_any(|s| matches!(s, Stage::Starting | Stage::Resuming))?;
                self.finish(Some(message))
            }
            _ => None,
        }
    }

    fn is_active(&self, transfer_id: &str) -> bool {
        self.queue.front().is_some_and(|(upload, _)| upload.transfer_id == transfer_id)
    }

    fn active_in(
        &mut self,
        transfer_id: &str,
        at: impl Fn(&Stage) -> bool,
    ) -> Option<(&Prepared, &mut Stage)> {
        let (upload, stage) = self.queue.front_mut()?;
        (upload.transfer_id == transfer_id && at(stage)).then_some((&*upload, stage))
    }

    fn active_in_any(&mut self, at: impl Fn(&Stage) -> bool) -> Option<()> {
        let (_, stage) = self.queue.front()?;
        at(stage).then_some(())
    }

    /// Drops the active upload as failed.
    fn finish(&mut self, message: Option<String>) -> Option<Event> {
        let (upload, _) = self.queue.pop_front()?;
        let message = message.unwrap_or_else(|| "The upload failed".to_owned());
        Some(Event::FileFailed { transfer_id: upload.transfer_id, message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(data: &[u8]) -> Prepared {
        Prepared::new(FileUpload::from_bytes("a.bin", data.to_vec()))
    }

    fn chunk_indices(uploads: &mut Uploads) -> Vec<u32> {
        let mut indices = Vec::new();
        while let Some(Send::Chunk(frame)) = uploads.next_send() {
            indices.push(hubbub_protocol::chunk::split(&frame).unwrap().0);
        }
        indices
    }

    #[test]
    fn start_send_end_and_resume_only_what_is_missing() {
        let mut uploads = Uploads::new(4);
        let upload = prepared(b"0123456789");
        let id = upload.transfer_id.clone();
        uploads.push(upload);
        let Some(Send::Message(ClientMessage::FileStart { size, sha256, chunk_size, .. })) =
            uploads.next_send()
        else {
            panic!("a fileStart first")
        };
        assert_eq!((size, chunk_size), (10, Some(4)));
        assert_eq!(sha256.unwrap(), sha256_to_hex(&Sha256::digest(b"0123456789").into()));
        assert_eq!(uploads.next_send(), None, "nothing until accepted");
        // The server picks a chunk size of its own.
        let accepted = ServerMessage::FileAccepted { transfer_id: id.clone(), chunk_size: 3, max_size: 100 };
        assert_eq!(uploads.on_message(accepted), None);
        assert!(
            matches!(uploads.next_send(), Some(Send::Chunk(frame)) if frame == [0, 0, 0, 0, b'0', b'1', b'2'])
        );
        // The link drops after the first chunk.
        uploads.on_link_lost();
        assert_eq!(
            uploads.next_send(),
            Some(Send::Message(ClientMessage::FileResume { transfer_id: id.clone() }))
        );
        let state = ServerMessage::FileResumeState {
            transfer_id: id.clone(),
            chunk_size: 3,
            received_chunks: vec![[0, 1], [2, 3]],
        };
        assert_eq!(uploads.on_message(state), None);
        assert_eq!(chunk_indices(&mut uploads), [1, 3]);
        let progress = ServerMessage::FileProgress { transfer_id: id.clone(), received_bytes: 10, size: 10 };
        assert!(matches!(uploads.on_message(progress), Some(Event::FileProgress { .. })));
        let saved = ServerMessage::FileSaved {
            file_id: "f".into(),
            name: "a.bin".into(),
            size: 10,
            mime_type: "application/octet-stream".into(),
            sha256: String::new(),
            url: "/files/f".into(),
            transfer_id: id,
            offset: None,
        };
        assert!(matches!(uploads.on_message(saved), Some(Event::FileSaved { .. })));
        assert_eq!(uploads.len(), 0);
    }

    #[test]
    fn a_lost_resume_starts_over_and_a_refusal_fails_the_upload() {
        let mut uploads = Uploads::new(4);
        let upload = prepared(b"abc");
        let id = upload.transfer_id.clone();
        uploads.push(upload);
        uploads.next_send();
        uploads.on_message(ServerMessage::FileAccepted {
            transfer_id: id.clone(),
            chunk_size: 4,
            max_size: 9,
        });
        uploads.on_link_lost();
        assert!(matches!(uploads.next_send(), Some(Send::Message(ClientMessage::FileResume { .. }))));
        let gone = ServerMessage::FileError { transfer_id: Some(id.clone()), message: "gone".into() };
        assert_eq!(uploads.on_message(gone), None);
        assert!(matches!(uploads.next_send(), Some(Send::Message(ClientMessage::FileStart { .. }))));
        let refused = ServerMessage::FileError { transfer_id: Some(id.clone()), message: "too big".into() };
        assert_eq!(
            uploads.on_message(refused),
            Some(Event::FileFailed { transfer_id: id, message: "too big".into() })
        );
        assert_eq!(uploads.len(), 0);
    }

    #[test]
    fn mime_types_come_from_the_extension() {
        assert_eq!(guess_mime_type("a.PNG"), "image/png");
        assert_eq!(guess_mime_type("README"), "application/octet-stream");
    }
}
