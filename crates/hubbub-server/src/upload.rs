//! One chat connection's file uploads: the `fileStart` / binary chunks /
//! `fileEnd` / `fileResume` exchange, on top of the transfer crate's store.
//!
//! The classic tutorial's format binds binary frames to the connection's
//! current upload, so a connection has at most one active upload. Starting
//! (or resuming) another parks the active one, resumable by its id. After an
//! upload fails, the chunks its client still streams are dropped quietly
//! until the next `fileStart` or `fileEnd`, so one failure is reported once,
//! not once per chunk.

use std::time::Instant;

use bytes::Bytes;
use hubbub_protocol::ServerMessage;
use hubbub_transfer::{NewUpload, ProgressPolicy, ProgressThrottle, Store, StoreError, StoredFile, Upload};

use crate::config::UploadSettings;
use crate::ratelimit::Key;

/// A connection's upload state.
#[derive(Debug, Default)]
pub(crate) struct Uploads {
    /// The upload binary frames go to.
    /// Boxed: most connections never upload, and an idle one should stay small.
    active: Option<Box<Active>>,
    /// The id of an upload that failed; its remaining chunks are ignored.
    /// (A boxed `str`, 8 bytes smaller than a `String`, in every chat
    /// connection's state.)
    failed: Option<Box<str>>,
}

#[derive(Debug)]
struct Active {
    upload: Upload,
    throttle: ProgressThrottle,
    /// When the per-connection rate limit next allows reading.
    not_before: Option<tokio::time::Instant>,
}

/// What the chat session should do after an upload event.
pub(crate) enum Outcome {
    /// Reply to the uploader.
    Reply(ServerMessage),
    /// The file is saved: tell the uploader, and the room.
    Saved(StoredFile, String),
    /// Nothing to say.
    Quiet,
}

impl Uploads {
    /// `fileStart`.
    pub(crate) async fn start(
        &mut self,
        store: &Store,
        settings: &UploadSettings,
        request: NewUpload,
    ) -> Outcome {
        self.park_active(store);
        self.failed = None;
        // A new upload under the id of an interrupted one replaces it:
        // dropping the old one frees its data and quota now, not at expiry.
        drop(store.resume(&request.transfer_id, request.owner.as_deref()));
        let transfer_id = request.transfer_id.clone();
        let size = request.size;
        match store.begin(request).await {
            Ok(upload) => {
                tracing::info!(%transfer_id, size, "upload started");
                let chunk_size = upload.assembler().chunk_size();
                self.activate(upload);
                Outcome::Reply(ServerMessage::FileAccepted {
                    transfer_id,
                    chunk_size,
                    max_size: settings.max_file_size,
                })
            }
            Err(err) => {
                tracing::info!(%transfer_id, error = %err, "upload refused");
                self.failed = Some(transfer_id.as_str().into());
                Outcome::Reply(file_error(Some(transfer_id), &err))
            }
        }
    }

    /// A binary frame. `None` means there is no upload to put it in.
    pub(crate) async fn chunk(&mut self, settings: &UploadSettings, frame: Bytes) -> Option<Outcome> {
        let Some(active) = self.active.as_mut() else {
            return if self.failed.is_some() { Some(Outcome::Quiet) } else { None };
        };
        if let Some(at) = active.not_before {
            // Reading stops until the rate allows more: TCP pushes back.
            tokio::time::sleep_until(at).await;
        }
        let written = match active.upload.write_frame(frame).await {
            Ok(written) => written,
            Err(err) => return Some(self.fail(&err)),
        };
        if settings.rate_bytes_per_sec > 0 && written > 0 {
            let cost =
                std::time::Duration::from_secs_f64(written as f64 / settings.rate_bytes_per_sec as f64);
            let now = tokio::time::Instant::now();
            active.not_before = Some(active.not_before.map_or(now, |at| at.max(now)) + cost);
        }
        let received = active.upload.assembler().received_bytes();
        if active.throttle.should_report(Instant::now(), received) {
            return Some(Outcome::Reply(ServerMessage::FileProgress {
                transfer_id: active.upload.transfer_id().to_owned(),
                received_bytes: received,
                size: active.upload.assembler().size(),
            }));
        }
        Some(Outcome::Quiet)
    }

    /// `fileEnd`.
    pub(crate) async fn end(&mut self) -> Outcome {
        let Some(active) = self.active.take() else {
            return match self.failed.take() {
                Some(id) => Outcome::Reply(ServerMessage::FileError {
                    transfer_id: Some(id.into()),
                    message: "The upload had already failed; start it again.".to_owned(),
                }),
                None => Outcome::Reply(ServerMessage::error("No file upload in progress", "noUpload")),
            };
        };
        let transfer_id = active.upload.transfer_id().to_owned();
        match active.upload.finish().await {
            Ok(stored) => {
                tracing::info!(%transfer_id, file = %stored.id, size = stored.size, "upload saved");
                Outcome::Saved(stored, transfer_id)
            }
            Err((kept, err)) => {
                tracing::info!(%transfer_id, error = %err, "upload not finished");
                if let Some(upload) = kept {
                    // Missing chunks may still come; the upload stays active.
                    self.activate(upload);
                } else {
                    self.failed = Some(transfer_id.as_str().into());
                }
                Outcome::Reply(file_error(Some(transfer_id), &err))
            }
        }
    }

    /// `fileResume`.
    pub(crate) fn resume(&mut self, store: &Store, transfer_id: String, owner: Option<&str>) -> Outcome {
        let current = self.active.as_ref().is_some_and(|a| a.upload.transfer_id() == transfer_id);
        if !current {
            let Some(upload) = store.resume(&transfer_id, owner) else {
                return Outcome::Reply(ServerMessage::FileError {
                    transfer_id: Some(transfer_id),
                    message: "There is no interrupted upload with this id (it may have expired).".to_owned(),
                });
            };
            self.park_active(store);
            self.activate(upload);
        }
        self.failed = None;
        let Some(active) = self.active.as_ref() else { return Outcome::Quiet };
        let assembler = active.upload.assembler();
        tracing::info!(%transfer_id, received = assembler.received_bytes(), "upload resumed");
        Outcome::Reply(ServerMessage::FileResumeState {
            transfer_id,
            chunk_size: assembler.chunk_size(),
            received_chunks: assembler.received_ranges().into_iter().map(|r| [r.start, r.end]).collect(),
        })
    }

    /// The connection is gone: keep the active upload for resume.
    pub(crate) fn close(&mut self, store: &Store) {
        self.park_active(store);
    }

    fn activate(&mut self, upload: Upload) {
        let throttle =
            ProgressThrottle::new(upload.assembler().size(), ProgressPolicy::default(), Instant::now());
        self.active = Some(Box::new(Active { upload, throttle, not_before: None }));
    }

    fn park_active(&mut self, store: &Store) {
        if let Some(active) = self.active.take() {
            tracing::debug!(transfer_id = active.upload.transfer_id(), "upload parked for resume");
            store.park(active.upload, Instant::now());
        }
    }

    fn fail(&mut self, err: &StoreError) -> Outcome {
        // Dropping the upload deletes its temporary data.
        let transfer_id = self.active.take().map(|a| a.upload.transfer_id().to_owned());
        tracing::info!(transfer_id = ?transfer_id, error = %err, "upload aborted");
        self.failed = Some(transfer_id.as_deref().unwrap_or_default().into());
        Outcome::Reply(file_error(transfer_id, err))
    }
}

/// The store's account for an owner of uploads: whose share of the quota
/// they are charged to. Distinct prefixes keep a user named like an address
/// apart from that address.
pub(crate) fn account(owner: &Key) -> String {
    match owner {
        Key::Address(ip) => format!("ip:{ip}"),
        Key::User(name) => format!("user:{name}"),
    }
}

fn file_error(transfer_id: Option<String>, err: &StoreError) -> ServerMessage {
    ServerMessage::FileError { transfer_id, message: err.to_string() }
}
