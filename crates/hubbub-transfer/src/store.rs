//! The disk store: uploads streamed to temporary files, verified, and moved
//! into the upload directory; saved files listed for download.
//!
//! Chunks are written at their offsets with positioned writes, so they may
//! arrive in any order and the file is never held in memory. The SHA-256 is
//! computed on the way while chunks arrive in order (the common case, and the
//! tutorial's uploader); whatever arrived out of order is read back once at
//! the end. A finished upload is fsynced and renamed into place atomically,
//! with a small JSON sidecar holding its metadata, so it survives a restart.
//!
//! File IO runs on tokio's blocking pool, one task per chunk, so a large
//! upload never occupies a runtime thread that chat traffic needs.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    Assembler, Placement, TransferError, TransferLimits, UploadSpec, parse_sha256_hex, sha256_to_hex,
};

/// Where and how much the store keeps.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The upload directory. Saved files are `{dir}/{fileId}` with a
    /// `{fileId}.json` sidecar; unfinished ones live in `{dir}/.partial`.
    pub dir: PathBuf,
    /// Most bytes the directory may hold, saved files and uploads in
    /// progress (counted at their declared size) together.
    pub quota_bytes: u64,
    /// How long an interrupted upload is kept for `fileResume`, once some of
    /// its bytes have arrived.
    pub resume_ttl: Duration,
    /// How long an interrupted upload that received no bytes is kept; zero
    /// drops it (and its reservation) at once. Resuming such an upload saves
    /// nothing over starting it again, and keeping it would let a client
    /// hold quota without sending data.
    pub empty_resume_ttl: Duration,
    /// Most interrupted uploads kept at once; beyond it the one closest to
    /// expiry is dropped first.
    pub max_parked: usize,
    /// Most bytes the unfinished uploads (active and interrupted) of one
    /// account may reserve together, so that no account can reserve the
    /// whole quota. Saved files count only against `quota_bytes`.
    pub account_reserved_bytes: u64,
    /// Most unfinished uploads (active and interrupted) one account may have.
    pub account_max_uploads: usize,
    /// Limits on each upload.
    pub limits: TransferLimits,
    /// Whether other processes use the directory too (the nodes of a cluster): then a file
    /// another process saved is found on disk when asked for, and opening deletes only
    /// unfinished uploads nobody has written to for longer than any could be resumed
    /// ([`Store::open`]). The quota counts what this process saved and reserved.
    pub shared: bool,
    /// Chunk bytes an upload gathers before handing them to the blocking
    /// pool in one job (written and hashed there, in order). Each hand-off
    /// costs two thread wake-ups, as much as writing a 64 KiB chunk, so
    /// gathering several saves them; an upload holds at most about twice
    /// this in memory (the job's chunks and the next ones).
    pub write_batch_bytes: usize,
}

/// Why the store refused or failed an upload. Shown to the uploader in
/// `fileError {message}`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The upload broke a rule of the transfer (size, chunk, checksum, ...).
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// Accepting the upload would exceed the directory's quota.
    #[error("The server's upload space is full: {needed} bytes are needed and {available} are left.")]
    QuotaExceeded {
        /// The declared size of the upload.
        needed: u64,
        /// What the quota still allows.
        available: u64,
    },
    /// The account's unfinished uploads already reserve too much of the
    /// quota for this one.
    #[error(
        "Your unfinished uploads already reserve {reserved} of the {limit} bytes one user may reserve, \
         and this file needs {needed}: finish or resume them first, or wait until they expire."
    )]
    AccountQuotaExceeded {
        /// The declared size of the upload.
        needed: u64,
        /// What the account's unfinished uploads reserve now.
        reserved: u64,
        /// [`StoreConfig::account_reserved_bytes`].
        limit: u64,
    },
    /// The account already has as many unfinished uploads as it may.
    #[error(
        "You already have {limit} unfinished uploads, the most one user may have: \
         finish or resume one first, or wait until it expires."
    )]
    TooManyUploads {
        /// [`StoreConfig::account_max_uploads`].
        limit: usize,
    },
    /// Reading or writing the disk failed.
    #[error("The server could not store the file: {0}")]
    Io(#[from] io::Error),
}

/// A saved file's metadata, as kept in its sidecar and sent in `fileSaved`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredFile {
    /// The file's id; also its name on disk.
    pub id: String,
    /// The uploader's name for it, sanitized.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Media type it is served with.
    pub mime_type: String,
    /// Lower-case hex SHA-256 of its bytes.
    pub sha256: String,
}

/// What a `fileStart` asks for.
#[derive(Clone, Debug)]
pub struct NewUpload {
    /// The client's name for the file (sanitized by the store).
    pub name: String,
    /// Declared size in bytes.
    pub size: u64,
    /// Declared media type (empty means unknown).
    pub mime_type: String,
    /// Declared SHA-256 as hex, if any.
    pub sha256: Option<String>,
    /// Chunk size, if not the default.
    pub chunk_size: Option<u32>,
    /// The upload's id, for resume.
    pub transfer_id: String,
    /// Who uploads it (a username, if known): only the same owner may
    /// resume or replace it.
    pub owner: Option<String>,
    /// Whose share of the quota the upload is charged to while unfinished:
    /// the authenticated user, or the client's address when anonymous.
    /// Unlike `owner`, a client cannot choose it.
    pub account: String,
}

/// The upload directory and everything in it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: StoreConfig,
    /// `{dir}/.partial`.
    partial_dir: PathBuf,
    /// Saved files by id.
    files: Mutex<HashMap<String, StoredFile>>,
    /// Bytes counted against the quota, in total and per account.
    usage: Mutex<Usage>,
    /// Interrupted uploads by owner and transfer id, with when they expire.
    parked: Mutex<HashMap<ParkedKey, (Upload, Instant)>>,
}

/// Interrupted uploads are found by who started them and their id, so one
/// user's id cannot reach another's upload.
type ParkedKey = (Option<String>, String);

/// What the quota holds. One lock for the total and the accounts, so a
/// reservation is checked and taken against both at once.
#[derive(Debug, Default)]
struct Usage {
    /// Saved files plus the reservations of unfinished uploads.
    used: u64,
    /// Unfinished uploads by account; an account with none has no entry.
    accounts: HashMap<String, Reserved>,
}

/// One account's unfinished uploads.
#[derive(Debug, Default)]
struct Reserved {
    /// Their declared sizes, summed.
    bytes: u64,
    /// How many there are, active or interrupted.
    uploads: usize,
}

/// Media type for uploads that do not declare a usable one.
const OCTET_STREAM: &str = "application/octet-stream";

impl Store {
    /// Opens (creating if needed) the upload directory, loads the saved
    /// files' metadata and deletes leftovers of uploads a previous run did
    /// not finish (in a [`StoreConfig::shared`] directory, only those nobody
    /// has written to for longer than the resume time, at least 10 minutes,
    /// and a minute more: the others may be another process's uploads).
    /// Blocking; meant for startup.
    pub fn open(config: StoreConfig) -> io::Result<Self> {
        let partial_dir = config.dir.join(".partial");
        fs::create_dir_all(&partial_dir)?;
        let idle = config.resume_ttl.max(Duration::from_secs(600)) + Duration::from_secs(60);
        for entry in fs::read_dir(&partial_dir)? {
            let entry = entry?;
            let abandoned = !config.shared
                || entry
                    .metadata()
                    .and_then(|meta| meta.modified())
                    .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > idle));
            if abandoned {
                let _ = fs::remove_file(entry.path());
            }
        }
        let mut files = HashMap::new();
        let mut used = 0;
        for entry in fs::read_dir(&config.dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let Ok(text) = fs::read_to_string(&path) else { continue };
                let Ok(meta) = serde_json::from_str::<StoredFile>(&text) else { continue };
                if is_file_id(&meta.id) && config.dir.join(&meta.id).is_file() {
                    used += meta.size;
                    files.insert(meta.id.clone(), meta);
                }
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                partial_dir,
                files: Mutex::new(files),
                usage: Mutex::new(Usage { used, accounts: HashMap::new() }),
                parked: Mutex::default(),
            }),
        })
    }

    /// The store's configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// Bytes counted against the quota.
    pub fn used_bytes(&self) -> u64 {
        lock(&self.inner.usage).used
    }

    /// Bytes reserved by `account`'s unfinished uploads, and how many there
    /// are.
    pub fn account_usage(&self, account: &str) -> (u64, usize) {
        lock(&self.inner.usage).accounts.get(account).map_or((0, 0), |r| (r.bytes, r.uploads))
    }

    /// A saved file's metadata. In a [`StoreConfig::shared`] directory, a
    /// file this process does not know is looked for on disk (another process
    /// may have saved it), which blocks on a small read.
    pub fn get(&self, id: &str) -> Option<StoredFile> {
        if let Some(file) = lock(&self.inner.files).get(id) {
            return Some(file.clone());
        }
        if !self.inner.config.shared || !is_file_id(id) {
            return None;
        }
        let dir = &self.inner.config.dir;
        let text = fs::read_to_string(dir.join(format!("{id}.json"))).ok()?;
        let meta = serde_json::from_str::<StoredFile>(&text).ok()?;
        (meta.id == id && dir.join(id).is_file()).then_some(meta)
    }

    /// Where a saved file's bytes are.
    pub fn path_of(&self, file: &StoredFile) -> PathBuf {
        self.inner.config.dir.join(&file.id)
    }

    /// Starts an upload: validates what `fileStart` declared, reserves its
    /// size against the quota and its account's share of it, and creates its
    /// temporary file.
    pub async fn begin(&self, request: NewUpload) -> Result<Upload, StoreError> {
        let sha256 = request.sha256.as_deref().map(parse_sha256_hex).transpose()?;
        let spec = UploadSpec { size: request.size, chunk_size: request.chunk_size, sha256 };
        let assembler = Assembler::new(spec, &self.inner.config.limits)?;
        self.reserve(&request.account, request.size)?;
        let temp_path = self.inner.partial_dir.join(format!("{}.part", uuid::Uuid::new_v4().simple()));
        let mime_type =
            if is_plausible_mime(&request.mime_type) { request.mime_type } else { OCTET_STREAM.to_owned() };
        let mut upload = Upload {
            store: self.clone(),
            transfer_id: request.transfer_id,
            owner: request.owner,
            account: request.account,
            name: sanitize_file_name(&request.name),
            mime_type,
            assembler,
            file: None,
            temp_path: temp_path.clone(),
            hasher: Some(Sha256::new()),
            hashed_upto: 0,
            since_writeback: 0,
            pending: Vec::new(),
            pending_bytes: 0,
            in_flight: None,
            reserved: request.size,
            saved: false,
        };
        let file = tokio::task::spawn_blocking(move || {
            OpenOptions::new().read(true).write(true).create_new(true).open(&temp_path)
        })
        .await
        .map_err(io::Error::other)??;
        upload.file = Some(Arc::new(file));
        Ok(upload)
    }

    /// Keeps an interrupted upload for [`StoreConfig::resume_ttl`], or for
    /// [`StoreConfig::empty_resume_ttl`] if none of its bytes arrived (when
    /// that is zero, the upload is dropped at once).
    pub fn park(&self, mut upload: Upload, now: Instant) {
        // Chunks already accepted go to disk, after the job in flight, so
        // that a parked upload holds none of them in memory.
        upload.dispatch();
        let config = &self.inner.config;
        let ttl =
            if upload.assembler.received_bytes() == 0 { config.empty_resume_ttl } else { config.resume_ttl };
        let mut dropped = Vec::new();
        {
            let mut parked = lock(&self.inner.parked);
            let key = (upload.owner.clone(), upload.transfer_id.clone());
            // A second interrupted upload with the same owner and id wins.
            dropped.extend(parked.remove(&key).map(|(old, _)| old));
            if ttl.is_zero() {
                dropped.push(upload);
            } else {
                while parked.len() >= config.max_parked.max(1) {
                    let soonest = parked.iter().min_by_key(|(_, (_, at))| *at).map(|(key, _)| key.clone());
                    match soonest.and_then(|key| parked.remove(&key)) {
                        Some((old, _)) => dropped.push(old),
                        None => break,
                    }
                }
                parked.insert(key, (upload, now + ttl));
            }
        }
        // Dropped outside the lock: each deletes its temporary file.
        drop(dropped);
    }

    /// Takes back an interrupted upload to continue it, if `owner` is the
    /// one who started it.
    pub fn resume(&self, transfer_id: &str, owner: Option<&str>) -> Option<Upload> {
        let key = (owner.map(str::to_owned), transfer_id.to_owned());
        lock(&self.inner.parked).remove(&key).map(|(upload, _)| upload)
    }

    /// Deletes interrupted uploads whose time is up; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let expired: Vec<Upload> = {
            let mut parked = lock(&self.inner.parked);
            let keys: Vec<ParkedKey> = parked
                .iter()
                .filter(|(_, (_, expires))| *expires <= now)
                .map(|(key, _)| key.clone())
                .collect();
            keys.iter().filter_map(|key| parked.remove(key)).map(|(upload, _)| upload).collect()
        };
        // Dropping deletes each temporary file and releases its reservation.
        expired.len()
    }

    /// Takes `size` bytes of the quota for a new upload of `account`, if
    /// the account's share and the quota both allow it.
    fn reserve(&self, account: &str, size: u64) -> Result<(), StoreError> {
        let config = &self.inner.config;
        let mut usage = lock(&self.inner.usage);
        let (bytes, uploads) = usage.accounts.get(account).map_or((0, 0), |r| (r.bytes, r.uploads));
        if uploads >= config.account_max_uploads {
            return Err(StoreError::TooManyUploads { limit: config.account_max_uploads });
        }
        let available = config.quota_bytes.saturating_sub(usage.used);
        if size > available {
            return Err(StoreError::QuotaExceeded { needed: size, available });
        }
        if size > config.account_reserved_bytes.saturating_sub(bytes) {
            return Err(StoreError::AccountQuotaExceeded {
                needed: size,
                reserved: bytes,
                limit: config.account_reserved_bytes,
            });
        }
        usage.used += size;
        let reserved = usage.accounts.entry(account.to_owned()).or_default();
        reserved.bytes += size;
        reserved.uploads += 1;
        Ok(())
    }

    /// An upload of `account` that reserved `size` bytes is over. Its bytes
    /// leave the account's share either way; they stay in the quota if the
    /// file was `saved`.
    fn release(&self, account: &str, size: u64, saved: bool) {
        let mut usage = lock(&self.inner.usage);
        if !saved {
            usage.used = usage.used.saturating_sub(size);
        }
        if let Some(reserved) = usage.accounts.get_mut(account) {
            reserved.bytes = reserved.bytes.saturating_sub(size);
            reserved.uploads = reserved.uploads.saturating_sub(1);
            if reserved.uploads == 0 {
                usage.accounts.remove(account);
            }
        }
    }
}

/// One upload in progress. Dropping it unfinished deletes its temporary
/// file and gives its reservation back.
#[derive(Debug)]
pub struct Upload {
    store: Store,
    transfer_id: String,
    /// Who may resume it.
    owner: Option<String>,
    /// Whose share of the quota it is charged to.
    account: String,
    /// Sanitized name.
    name: String,
    mime_type: String,
    assembler: Assembler,
    /// The temporary file; `None` only until `begin` has created it.
    file: Option<Arc<File>>,
    temp_path: PathBuf,
    /// Hash of bytes `0..hashed_upto`. `None` if a write was interrupted
    /// mid-way; the whole file is then hashed at the end.
    hasher: Option<Sha256>,
    hashed_upto: u64,
    /// Chunks accepted and not yet handed to the blocking pool, with their
    /// offsets, in arrival order: up to `write_batch_bytes` of them.
    pending: Vec<(u64, Bytes)>,
    /// Their bytes.
    pending_bytes: usize,
    /// Bytes handed to the blocking pool since the last batch that started
    /// the file's writeback ([`WRITEBACK_BYTES`]).
    since_writeback: u64,
    /// The last batch's write (and hash), still running on the blocking pool
    /// while the connection reads the next chunks. At most one is in flight:
    /// the next batch, and `finish`, wait for it first.
    in_flight: Option<tokio::task::JoinHandle<BatchWritten>>,
    /// Bytes reserved against the quota.
    reserved: u64,
    /// Set once moved into place: the reservation then stands for the
    /// saved file and there is no temporary file to delete.
    saved: bool,
}

impl Upload {
    /// The upload's id.
    pub fn transfer_id(&self) -> &str {
        &self.transfer_id
    }

    /// The assembler, for sizes and received ranges.
    pub fn assembler(&self) -> &Assembler {
        &self.assembler
    }

    /// Stores one binary frame (`[index][bytes]`). Returns the number of new
    /// bytes accepted (0 for an identical duplicate). Chunks are gathered
    /// and written in batches of [`StoreConfig::write_batch_bytes`]; a
    /// failed write surfaces on a later call or in `finish`.
    pub async fn write_frame(&mut self, frame: Bytes) -> Result<u64, StoreError> {
        let (placement, data) = self.assembler.on_frame(&frame)?;
        let Placement::Write { offset } = placement else { return Ok(0) };
        let len = data.len();
        self.pending.push((offset, frame.slice(hubbub_protocol::chunk::HEADER_LEN..)));
        self.pending_bytes += len;
        if self.pending_bytes >= self.store.inner.config.write_batch_bytes {
            // The previous batch must be on disk (and its hasher back) first.
            self.settle().await?;
            self.dispatch();
        }
        Ok(len as u64)
    }

    /// Hands the gathered chunks to the blocking pool, without waiting: the
    /// write and the hash overlap with reading the next chunks from the
    /// socket. A batch in flight goes first (the new one is chained after
    /// it, which happens only when the upload is parked; otherwise it has
    /// been settled).
    fn dispatch(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let chunks = std::mem::take(&mut self.pending);
        self.since_writeback += self.pending_bytes as u64;
        self.pending_bytes = 0;
        let writeback = self.since_writeback >= WRITEBACK_BYTES;
        if writeback {
            self.since_writeback = 0;
        }
        let Some(file) = self.file.clone() else {
            // Only before `begin` created it, when nothing can be pending.
            return;
        };
        self.in_flight = Some(match self.in_flight.take() {
            None => {
                let (hasher, from) = (self.hasher.take(), self.hashed_upto);
                tokio::task::spawn_blocking(move || write_batch(&file, &chunks, hasher, from, writeback))
            }
            Some(previous) => tokio::spawn(async move {
                let previous = match previous.await {
                    Ok(previous) if previous.result.is_ok() => previous,
                    Ok(failed) => return failed,
                    Err(join) => return BatchWritten::failed(io::Error::other(join)),
                };
                let (hasher, from) = (previous.hasher, previous.hashed_upto);
                tokio::task::spawn_blocking(move || write_batch(&file, &chunks, hasher, from, writeback))
                    .await
                    .unwrap_or_else(|join| BatchWritten::failed(io::Error::other(join)))
            }),
        });
    }

    /// Waits for the batch in flight, if any.
    async fn settle(&mut self) -> Result<(), StoreError> {
        let Some(job) = self.in_flight.take() else { return Ok(()) };
        let written = job.await.map_err(io::Error::other)?;
        match written.result {
            Ok(()) => {
                self.hasher = written.hasher;
                self.hashed_upto = written.hashed_upto;
                Ok(())
            }
            Err(err) => {
                // The chunk may be partly on disk; hash everything again at
                // the end rather than trust the running digest.
                self.hasher = None;
                Err(err.into())
            }
        }
    }

    /// Completes the upload: every chunk must be there; the SHA-256 is
    /// checked if one was declared; the file is synced and moved into place.
    /// On [`TransferError::Incomplete`] the upload stays usable, so missing
    /// chunks may still come.
    pub async fn finish(mut self) -> Result<StoredFile, (Option<Self>, StoreError)> {
        if let Err(err) = self.settle().await {
            return Err((None, err));
        }
        self.dispatch();
        if let Err(err) = self.settle().await {
            return Err((None, err));
        }
        let completed = match self.assembler.on_end() {
            Ok(completed) => completed,
            Err(err @ TransferError::Incomplete { .. }) => return Err((Some(self), err.into())),
            Err(err) => return Err((None, err.into())),
        };
        let Some(file) = self.file.take() else {
            return Err((None, io::Error::other("upload file missing").into()));
        };
        let (hasher, from) = match self.hasher.take() {
            Some(hasher) => (hasher, self.hashed_upto),
            None => (Sha256::new(), 0),
        };
        // From here a blocking task owns the upload's data and reservation:
        // it saves the file (or cleans up) even if this future is dropped
        // half-way, say because the connection closed.
        self.saved = true;
        let job = Finish {
            store: self.store.clone(),
            file,
            temp: std::mem::take(&mut self.temp_path),
            account: std::mem::take(&mut self.account),
            reserved: self.reserved,
            name: std::mem::take(&mut self.name),
            mime_type: std::mem::take(&mut self.mime_type),
            completed,
            hasher,
            from,
        };
        match tokio::task::spawn_blocking(move || job.run()).await {
            Ok(result) => result.map_err(|err| (None, err)),
            Err(join) => Err((None, io::Error::other(join).into())),
        }
    }
}

/// The end of an upload, run to completion on the blocking pool.
struct Finish {
    store: Store,
    file: Arc<File>,
    temp: PathBuf,
    account: String,
    reserved: u64,
    name: String,
    mime_type: String,
    completed: crate::Completed,
    hasher: Sha256,
    from: u64,
}

impl Finish {
    fn run(self) -> Result<StoredFile, StoreError> {
        let outcome = self.save();
        if outcome.is_err() {
            let _ = fs::remove_file(&self.temp);
        }
        // Saved or not, the upload is no longer in flight for its account.
        self.store.release(&self.account, self.reserved, outcome.is_ok());
        outcome
    }

    fn save(&self) -> Result<StoredFile, StoreError> {
        let size = self.completed.size;
        let digest = hash_rest(&self.file, self.hasher.clone(), self.from, size)?;
        self.completed.verify(&digest)?;
        let meta = StoredFile {
            id: uuid::Uuid::new_v4().simple().to_string(),
            name: self.name.clone(),
            size,
            mime_type: self.mime_type.clone(),
            sha256: sha256_to_hex(&digest),
        };
        move_into_place(&self.file, &self.temp, &self.store.inner.config.dir, &meta)?;
        // The reservation now stands for the saved file.
        lock(&self.store.inner.files).insert(meta.id.clone(), meta.clone());
        Ok(meta)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.saved {
            self.file = None;
            let path = std::mem::take(&mut self.temp_path);
            // Off the async threads when there is a runtime to do it.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || fs::remove_file(path))),
                Err(_) => drop(fs::remove_file(path)),
            }
            self.store.release(&self.account, self.reserved, false);
        }
    }
}

/// What a chunk write on the blocking pool hands back.
#[derive(Debug)]
/// What a batch's job hands back.
struct BatchWritten {
    /// The running hash of `0..hashed_upto`; `None` after a failed write,
    /// when the whole file is hashed again at the end.
    hasher: Option<Sha256>,
    hashed_upto: u64,
    result: io::Result<()>,
}

impl BatchWritten {
    fn failed(err: io::Error) -> Self {
        Self { hasher: None, hashed_upto: 0, result: Err(err) }
    }
}

/// Writes a batch of chunks at their offsets, in order, on the blocking
/// pool, and hashes on the way each one that continues the bytes hashed so
/// far (`hasher` covers `0..from`); the others are hashed in `finish`.
/// With `writeback`, then starts writing the file's dirty pages to disk and
/// drops those already written ([`start_writeback`]).
fn write_batch(
    file: &File,
    chunks: &[(u64, Bytes)],
    mut hasher: Option<Sha256>,
    from: u64,
    writeback: bool,
) -> BatchWritten {
    let mut hashed_upto = from;
    for (offset, data) in chunks {
        if let Err(err) = file.write_all_at(data, *offset) {
            // The chunk may be partly on disk; hash everything again at
            // the end rather than trust the running digest.
            return BatchWritten::failed(err);
        }
        if let Some(h) = hasher.as_mut()
            && *offset == hashed_upto
        {
            h.update(data);
            hashed_upto += data.len() as u64;
        }
    }
    if writeback {
        start_writeback(file);
    }
    BatchWritten { hasher, hashed_upto, result: Ok(()) }
}

/// Bytes an upload writes between two calls of [`start_writeback`].
const WRITEBACK_BYTES: u64 = 8 << 20;

/// Starts writing the file's dirty pages to disk without waiting, and drops
/// from the page cache the pages already written, which the upload does not
/// read again (chunks are hashed from memory as they are written).
///
/// Without it, a 1 GiB upload leaves 1 GiB of dirty pages for the final
/// `fsync` to write (long seconds on a slow disk, while the kernel throttles
/// every other writer of the machine) and pushes out of the page cache what
/// the rest of the server reads, such as the history file. Called every
/// [`WRITEBACK_BYTES`], it keeps an upload's share of the page cache to a
/// few times that, and the memory it writes into is the memory it just
/// freed. `POSIX_FADV_DONTNEED` on Linux does both (asynchronous writeback
/// of the range, then dropping its clean pages); elsewhere this does
/// nothing. It is advice: a failure changes nothing the upload relies on.
fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed);
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// Hashes `file[from..size]` into `hasher`.
fn hash_rest(file: &File, mut hasher: Sha256, from: u64, size: u64) -> io::Result<[u8; 32]> {
    let mut reader = file;
    reader.seek(SeekFrom::Start(from))?;
    let mut rest = reader.take(size - from);
    let mut buffer = vec![0_u8; 256 * 1024];
    loop {
        let n = rest.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().into())
}

/// Syncs the temporary file, writes the sidecar, and renames both into the
/// upload directory; the data file last-but-one, the directory synced last.
fn move_into_place(file: &File, temp: &Path, dir: &Path, meta: &StoredFile) -> io::Result<()> {
    file.sync_all()?;
    let sidecar_temp = temp.with_extension("json");
    fs::write(&sidecar_temp, serde_json::to_vec(meta).map_err(io::Error::other)?)?;
    File::open(&sidecar_temp)?.sync_all()?;
    fs::rename(temp, dir.join(&meta.id))?;
    fs::rename(&sidecar_temp, dir.join(format!("{}.json", meta.id)))?;
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Makes an uploader's file name safe to show and to offer for download:
/// only the last path component, no control characters, no bidirectional
/// controls (which would show `evil\u{202E}gnp.exe` as `evilexe.png`; see
/// [`hubbub_protocol::is_bidi_control`]), no leading dots, at most 255
/// bytes. Never empty.
///
/// ```
/// use hubbub_transfer::sanitize_file_name;
/// assert_eq!(sanitize_file_name("../../etc/passwd"), "passwd");
/// assert_eq!(sanitize_file_name("C:\\Users\\me\\report.pdf"), "report.pdf");
/// assert_eq!(sanitize_file_name(".."), "file");
/// ```
pub fn sanitize_file_name(raw: &str) -> String {
    let last = raw.rsplit(['/', '\\']).next().unwrap_or(raw);
    let cleaned: String =
        last.chars().filter(|c| !c.is_control() && !hubbub_protocol::is_bidi_control(*c)).collect();
    let cleaned = cleaned.trim().trim_start_matches('.').trim();
    let mut name = String::new();
    for c in cleaned.chars() {
        if name.len() + c.len_utf8() > 255 {
            break;
        }
        name.push(c);
    }
    if name.is_empty() { "file".to_owned() } else { name }
}

/// File ids are 32 lower-case hex digits (a simple-form UUID).
pub fn is_file_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `type/subtype` made of token characters; anything else is not trusted
/// as a `Content-Type`.
fn is_plausible_mime(mime: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.len() <= 127
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    matches!(mime.split_once('/'), Some((kind, sub)) if token(kind) && token(sub))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, quota: u64) -> StoreConfig {
        StoreConfig {
            shared: false,
            dir: dir.to_owned(),
            quota_bytes: quota,
            resume_ttl: Duration::from_secs(600),
            empty_resume_ttl: Duration::ZERO,
            max_parked: 2,
            account_reserved_bytes: quota,
            account_max_uploads: 10,
            limits: TransferLimits { min_chunk_size: 4, ..TransferLimits::default() },
            // Small, so that the tests' tiny chunks make batches.
            write_batch_bytes: 16,
        }
    }

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hubbub-store-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn request(size: u64, chunk: u32, sha: Option<String>) -> NewUpload {
        NewUpload {
            name: "../notes.txt".into(),
            size,
            mime_type: "text/plain".into(),
            sha256: sha,
            chunk_size: Some(chunk),
            transfer_id: "t1".into(),
            owner: Some("ada".into()),
            account: "user:ada".into(),
        }
    }

    /// A request of `account` under its own transfer id.
    fn request_of(account: &str, transfer_id: &str, size: u64) -> NewUpload {
        NewUpload { transfer_id: transfer_id.into(), account: account.into(), ..request(size, 4, None) }
    }

    /// Waits until `.partial` is empty: dropped uploads delete their
    /// temporary files on the blocking pool.
    async fn partial_emptied(dir: &Path) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while fs::read_dir(dir.join(".partial")).unwrap().count() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("temporary files deleted");
    }

    fn frame(index: u32, data: &[u8]) -> Bytes {
        Bytes::from(hubbub_protocol::chunk::frame(index, data))
    }

    #[tokio::test]
    async fn a_shared_directory_keeps_others_uploads_and_finds_their_files() {
        let dir = temp_dir();
        let shared = || StoreConfig { shared: true, ..config(&dir, 1 << 20) };
        let one = Store::open(shared()).unwrap();
        let data = b"0123456789abcdef".to_vec();
        let mut upload = one.begin(request(16, 8, None)).await.unwrap();
        upload.write_frame(frame(0, &data[..8])).await.unwrap();
        // Another process opens the directory meanwhile: the upload under way stays.
        let two = Store::open(shared()).unwrap();
        upload.write_frame(frame(1, &data[8..])).await.unwrap();
        let saved = upload.finish().await.unwrap();
        // The other process finds the file on disk; a store of its own would not.
        assert_eq!(two.get(&saved.id), Some(saved.clone()));
        let alone = Store::open(config(&dir, 1 << 20)).unwrap();
        assert_eq!(alone.get(&"0".repeat(32)), None);
        assert_eq!(two.get("../etc/passwd"), None);
    }

    #[tokio::test]
    async fn a_large_upload_written_back_as_it_goes_is_saved_whole() {
        let dir = temp_dir();
        let store =
            Store::open(StoreConfig { write_batch_bytes: 256 << 10, ..config(&dir, 64 << 20) }).unwrap();
        let chunk = 64 << 10;
        let size = 2 * WRITEBACK_BYTES as usize + 3 * chunk + 100;
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let data: Vec<u8> = (0..size)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let sha = sha256_to_hex(&Sha256::digest(&data).into());
        let mut upload = store.begin(request(size as u64, chunk as u32, Some(sha.clone()))).await.unwrap();
        // Chunk 3 comes last: the bytes after it are hashed from the file in
        // `finish`, after their pages were written back and dropped.
        let chunks: Vec<_> = data.chunks(chunk).enumerate().collect();
        for (index, bytes) in chunks.iter().filter(|(i, _)| *i != 3).chain(&chunks[3..4]) {
            upload.write_frame(frame(*index as u32, bytes)).await.unwrap();
        }
        assert!(upload.since_writeback < WRITEBACK_BYTES, "writeback started during the upload");
        let saved = upload.finish().await.unwrap();
        assert_eq!(saved.sha256, sha);
        assert_eq!(fs::read(store.path_of(&saved)).unwrap(), data);
    }

    #[tokio::test]
    async fn out_of_order_chunks_are_saved_verified_and_reloaded() {
        let dir = temp_dir();
        let store = Store::open(config(&dir, 1 << 20)).unwrap();
        let data = b"0123456789abcdefghij".to_vec();
        let sha = sha256_to_hex(&Sha256::digest(&data).into());
        let mut upload = store.begin(request(20, 8, Some(sha.clone()))).await.unwrap();
        upload.write_frame(frame(2, &data[16..])).await.unwrap();
        upload.write_frame(frame(0, &data[..8])).await.unwrap();
        assert_eq!(upload.write_frame(frame(0, &data[..8])).await.unwrap(), 0, "identical duplicate");
        upload.write_frame(frame(1, &data[8..16])).await.unwrap();
        let saved = upload.finish().await.unwrap();
        assert_eq!(saved.sha256, sha);
        assert_eq!(saved.name, "notes.txt");
        assert_eq!(fs::read(store.path_of(&saved)).unwrap(), data);
        assert_eq!(store.used_bytes(), 20);
        assert_eq!(fs::read_dir(dir.join(".partial")).unwrap().count(), 0);

        let reopened = Store::open(config(&dir, 1 << 20)).unwrap();
        assert_eq!(reopened.get(&saved.id), Some(saved));
        assert_eq!(reopened.used_bytes(), 20);
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_wrong_checksum_fails_and_frees_everything() {
        let dir = temp_dir();
        let store = Store::open(config(&dir, 1 << 20)).unwrap();
        let mut upload = store.begin(request(4, 4, Some("00".repeat(32)))).await.unwrap();
        upload.write_frame(frame(0, b"abcd")).await.unwrap();
        let (kept, err) = upload.finish().await.unwrap_err();
        assert!(kept.is_none());
        assert!(matches!(err, StoreError::Transfer(TransferError::Sha256Mismatch)), "{err}");
        assert_eq!(store.used_bytes(), 0);
        partial_emptied(&dir).await;
        fs::remove_dir_all(dir).unwrap();
    }

    /// Parked uploads (up to `max_parked`) must not hold their gathered
    /// chunks in memory until resumed or expired.
    #[tokio::test]
    async fn chunks_still_gathered_when_an_upload_is_parked_reach_the_file_and_the_hash() {
        let dir = temp_dir();
        let store = Store::open(config(&dir, 1 << 20)).unwrap();
        let data: Vec<u8> = (0..40).collect();
        let sha = sha256_to_hex(&Sha256::digest(&data).into());
        let mut upload = store.begin(request(40, 4, Some(sha))).await.unwrap();
        // Batches of 16 bytes: chunks 0-3 go as one, chunk 4 is still
        // gathered when the connection drops.
        for (index, chunk) in data.chunks(4).enumerate().take(5) {
            upload.write_frame(frame(index as u32, chunk)).await.unwrap();
        }
        assert_eq!(upload.pending.len(), 1);
        store.park(upload, Instant::now());
        let mut resumed = store.resume("t1", Some("ada")).unwrap();
        assert_eq!(resumed.assembler().received_ranges(), vec![0..5]);
        // A parked upload holds no chunk in memory: they went to the pool.
        assert!(resumed.pending.is_empty());
        for (index, chunk) in data.chunks(4).enumerate().skip(5) {
            resumed.write_frame(frame(index as u32, chunk)).await.unwrap();
        }
        let saved = resumed.finish().await.unwrap();
        assert_eq!(fs::read(store.path_of(&saved)).unwrap(), data);
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn quota_parking_resume_and_expiry() {
        let dir = temp_dir();
        let store = Store::open(config(&dir, 10)).unwrap();
        assert!(matches!(
            store.begin(request(11, 4, None)).await.unwrap_err(),
            StoreError::QuotaExceeded { needed: 11, available: 10 }
        ));
        let mut upload = store.begin(request(8, 4, None)).await.unwrap();
        upload.write_frame(frame(1, b"5678")).await.unwrap();
        let (kept, err) = upload.finish().await.unwrap_err();
        assert!(matches!(err, StoreError::Transfer(TransferError::Incomplete { missing_chunks: 1 })));
        let now = Instant::now();
        store.park(kept.unwrap(), now);
        assert!(store.resume("t1", Some("eve")).is_none(), "only the owner resumes");
        let mut resumed = store.resume("t1", Some("ada")).unwrap();
        assert_eq!(resumed.assembler().received_ranges(), vec![1..2]);
        resumed.write_frame(frame(0, b"1234")).await.unwrap();
        let saved = resumed.finish().await.unwrap();
        assert_eq!(fs::read(store.path_of(&saved)).unwrap(), b"12345678");

        let mut upload =
            store.begin(NewUpload { transfer_id: "t2".into(), ..request(2, 4, None) }).await.unwrap();
        upload.write_frame(frame(0, b"ab")).await.unwrap();
        store.park(upload, now);
        assert_eq!(store.used_bytes(), 10);
        assert_eq!(store.account_usage("user:ada"), (2, 1));
        assert_eq!(store.sweep(now + Duration::from_secs(599)), 0);
        assert_eq!(store.sweep(now + Duration::from_secs(600)), 1);
        assert_eq!(store.used_bytes(), 8);
        assert_eq!(store.account_usage("user:ada"), (0, 0));
        assert!(store.resume("t2", Some("ada")).is_none());
        partial_emptied(&dir).await;
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn at_most_max_parked_are_kept_and_the_one_closest_to_expiry_goes_first() {
        let dir = temp_dir();
        let store = Store::open(config(&dir, 100)).unwrap();
        let now = Instant::now();
        for (i, id) in ["p1", "p2", "p3"].iter().enumerate() {
            let mut upload = store.begin(request_of("user:ada", id, 4)).await.unwrap();
            upload.write_frame(frame(0, b"abcd")).await.unwrap();
            store.park(upload, now + Duration::from_secs(i as u64));
        }
        assert!(store.resume("p1", Some("ada")).is_none());
        assert_eq!(store.used_bytes(), 8, "p1's reservation went with it");
        assert!(store.resume("p3", Some("ada")).is_some());
        assert_eq!(store.sweep(now + Duration::from_secs(3600)), 1, "p2 was still kept");
        assert_eq!((store.used_bytes(), store.account_usage("user:ada")), (0, (0, 0)));
        partial_emptied(&dir).await;
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn one_account_cannot_reserve_more_than_its_share_of_the_quota() {
        let dir = temp_dir();
        let store = Store::open(StoreConfig { account_reserved_bytes: 40, ..config(&dir, 100) }).unwrap();
        let mut first = store.begin(request_of("ip:10.0.0.1", "a", 30)).await.unwrap();
        assert!(matches!(
            store.begin(request_of("ip:10.0.0.1", "b", 20)).await.unwrap_err(),
            StoreError::AccountQuotaExceeded { needed: 20, reserved: 30, limit: 40 }
        ));
        // Others still have their share; the total quota binds last.
        let other = store.begin(request_of("ip:10.0.0.2", "a", 40)).await.unwrap();
        assert!(matches!(
            store.begin(request_of("ip:10.0.0.3", "a", 40)).await.unwrap_err(),
            StoreError::QuotaExceeded { needed: 40, available: 30 }
        ));
        assert_eq!(store.account_usage("ip:10.0.0.3"), (0, 0), "a refusal reserves nothing");

        // A saved file leaves the account's share and stays in the quota.
        for (i, chunk) in [0_u8; 30].chunks(4).enumerate() {
            first.write_frame(frame(i as u32, chunk)).await.unwrap();
        }
        first.finish().await.unwrap();
        assert_eq!((store.used_bytes(), store.account_usage("ip:10.0.0.1")), (70, (0, 0)));
        store.begin(request_of("ip:10.0.0.1", "b", 20)).await.unwrap();
        // Dropped unfinished, an upload gives both back.
        assert_eq!(store.used_bytes(), 70, "b was dropped right away");
        drop(other);
        assert_eq!((store.used_bytes(), store.account_usage("ip:10.0.0.2")), (30, (0, 0)));
        partial_emptied(&dir).await;
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn one_account_has_at_most_a_few_uploads_active_or_interrupted() {
        let dir = temp_dir();
        let store = Store::open(StoreConfig { account_max_uploads: 2, ..config(&dir, 100) }).unwrap();
        let now = Instant::now();
        let mut parked = store.begin(request_of("user:ada", "a", 4)).await.unwrap();
        parked.write_frame(frame(0, b"abcd")).await.unwrap();
        store.park(parked, now);
        let active = store.begin(request_of("user:ada", "b", 4)).await.unwrap();
        let refused = store.begin(request_of("user:ada", "c", 4)).await.unwrap_err();
        assert!(matches!(refused, StoreError::TooManyUploads { limit: 2 }), "{refused}");
        assert!(refused.to_string().contains("2 unfinished uploads"), "{refused}");
        let _bob = store.begin(request_of("user:bob", "c", 4)).await.unwrap();
        drop(active);
        let _again = store.begin(request_of("user:ada", "c", 4)).await.unwrap();
        assert_eq!(store.account_usage("user:ada"), (8, 2));
        drop((_bob, _again, store.resume("a", Some("ada"))));
        assert_eq!(store.used_bytes(), 0);
        partial_emptied(&dir).await;
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn an_interrupted_upload_without_bytes_keeps_its_reservation_only_briefly() {
        let dir = temp_dir();
        let store = Store::open(config(&dir, 100)).unwrap();
        let now = Instant::now();
        // With no grace time it goes at once, with its reservation.
        let empty = store.begin(request_of("user:ada", "empty", 50)).await.unwrap();
        store.park(empty, now);
        assert_eq!((store.used_bytes(), store.account_usage("user:ada")), (0, (0, 0)));
        assert!(store.resume("empty", Some("ada")).is_none());
        // One whose bytes arrived keeps the full resume time.
        let mut started = store.begin(request_of("user:ada", "started", 50)).await.unwrap();
        started.write_frame(frame(0, b"abcd")).await.unwrap();
        store.park(started, now);
        assert_eq!(store.sweep(now + Duration::from_secs(599)), 0);
        assert!(store.resume("started", Some("ada")).is_some());
        partial_emptied(&dir).await;

        // With a grace time, until it is up.
        let store =
            Store::open(StoreConfig { empty_resume_ttl: Duration::from_secs(5), ..config(&dir, 100) })
                .unwrap();
        let empty = store.begin(request_of("user:ada", "empty", 50)).await.unwrap();
        store.park(empty, now);
        assert_eq!(store.used_bytes(), 50);
        assert_eq!(store.sweep(now + Duration::from_secs(4)), 0);
        assert_eq!(store.sweep(now + Duration::from_secs(5)), 1);
        assert_eq!((store.used_bytes(), store.account_usage("user:ada")), (0, (0, 0)));
        partial_emptied(&dir).await;
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn names_and_ids_are_checked() {
        assert_eq!(sanitize_file_name("a\u{0}b\nc.txt"), "abc.txt");
        assert_eq!(sanitize_file_name("evil\u{202E}gnp.exe"), "evilgnp.exe");
        assert_eq!(sanitize_file_name("\u{2067}\u{200F}"), "file");
        assert_eq!(sanitize_file_name(&"é".repeat(300)).len(), 254);
        assert!(is_file_id(&uuid::Uuid::new_v4().simple().to_string()));
        assert!(!is_file_id("../../etc/passwd"));
        assert!(is_plausible_mime("image/png"));
        assert!(!is_plausible_mime("text/html\r\nX-Evil: 1"));
        assert!(!is_plausible_mime(""));
    }
}
