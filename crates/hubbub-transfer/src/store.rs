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
    /// How long an interrupted upload is kept for `fileResume`.
    pub resume_ttl: Duration,
    /// Most interrupted uploads kept at once; beyond it the one closest to
    /// expiry is dropped first.
    pub max_parked: usize,
    /// Limits on each upload.
    pub limits: TransferLimits,
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
    /// Bytes counted against the quota: saved files plus reservations.
    used: Mutex<u64>,
    /// Interrupted uploads by owner and transfer id, with when they expire.
    parked: Mutex<HashMap<ParkedKey, (Upload, Instant)>>,
}

/// Interrupted uploads are found by who started them and their id, so one
/// user's id cannot reach another's upload.
type ParkedKey = (Option<String>, String);

/// Media type for uploads that do not declare a usable one.
const OCTET_STREAM: &str = "application/octet-stream";

impl Store {
    /// Opens (creating if needed) the upload directory, loads the saved
    /// files' metadata and deletes leftovers of uploads a previous run did
    /// not finish. Blocking; meant for startup.
    pub fn open(config: StoreConfig) -> io::Result<Self> {
        let partial_dir = config.dir.join(".partial");
        fs::create_dir_all(&partial_dir)?;
        for entry in fs::read_dir(&partial_dir)? {
            let _ = fs::remove_file(entry?.path());
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
                used: Mutex::new(used),
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
        *lock(&self.inner.used)
    }

    /// A saved file's metadata.
    pub fn get(&self, id: &str) -> Option<StoredFile> {
        lock(&self.inner.files).get(id).cloned()
    }

    /// Where a saved file's bytes are.
    pub fn path_of(&self, file: &StoredFile) -> PathBuf {
        self.inner.config.dir.join(&file.id)
    }

    /// Starts an upload: validates what `fileStart` declared, reserves its
    /// size against the quota and creates its temporary file.
    pub async fn begin(&self, request: NewUpload) -> Result<Upload, StoreError> {
        let sha256 = request.sha256.as_deref().map(parse_sha256_hex).transpose()?;
        let spec = UploadSpec { size: request.size, chunk_size: request.chunk_size, sha256 };
        let assembler = Assembler::new(spec, &self.inner.config.limits)?;
        self.reserve(request.size)?;
        let temp_path = self.inner.partial_dir.join(format!("{}.part", uuid::Uuid::new_v4().simple()));
        let mime_type =
            if is_plausible_mime(&request.mime_type) { request.mime_type } else { OCTET_STREAM.to_owned() };
        let mut upload = Upload {
            store: self.clone(),
            transfer_id: request.transfer_id,
            owner: request.owner,
            name: sanitize_file_name(&request.name),
            mime_type,
            assembler,
            file: None,
            temp_path: temp_path.clone(),
            hasher: Some(Sha256::new()),
            hashed_upto: 0,
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

    /// Keeps an interrupted upload for [`StoreConfig::resume_ttl`].
    pub fn park(&self, upload: Upload, now: Instant) {
        let expires = now + self.inner.config.resume_ttl;
        let mut dropped = Vec::new();
        {
            let mut parked = lock(&self.inner.parked);
            let key = (upload.owner.clone(), upload.transfer_id.clone());
            // A second interrupted upload with the same owner and id wins.
            dropped.extend(parked.remove(&key).map(|(old, _)| old));
            while parked.len() >= self.inner.config.max_parked.max(1) {
                let soonest = parked.iter().min_by_key(|(_, (_, at))| *at).map(|(key, _)| key.clone());
                match soonest.and_then(|key| parked.remove(&key)) {
                    Some((old, _)) => dropped.push(old),
                    None => break,
                }
            }
            parked.insert(key, (upload, expires));
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

    fn reserve(&self, size: u64) -> Result<(), StoreError> {
        let mut used = lock(&self.inner.used);
        let available = self.inner.config.quota_bytes.saturating_sub(*used);
        if size > available {
            return Err(StoreError::QuotaExceeded { needed: size, available });
        }
        *used += size;
        Ok(())
    }

    fn release(&self, size: u64) {
        let mut used = lock(&self.inner.used);
        *used = used.saturating_sub(size);
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
    /// The last chunk's write (and hash), still running on the blocking pool
    /// while the connection reads the next chunk. At most one is in flight:
    /// the next write, and `finish`, wait for it first.
    in_flight: Option<tokio::task::JoinHandle<ChunkWritten>>,
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
    /// bytes written (0 for an identical duplicate).
    pub async fn write_frame(&mut self, frame: Bytes) -> Result<u64, StoreError> {
        let (placement, data) = self.assembler.on_frame(&frame)?;
        let Placement::Write { offset } = placement else { return Ok(0) };
        let len = data.len() as u64;
        // The previous chunk must be on disk (and its hasher back) first.
        self.settle().await?;
        let data = frame.slice(hubbub_protocol::chunk::HEADER_LEN..);
        let file = self.file.clone().ok_or_else(|| io::Error::other("upload file missing"))?;
        let in_order = offset == self.hashed_upto;
        let mut hasher = if in_order { self.hasher.take() } else { None };
        // Not awaited here: the write and the hash overlap with reading the
        // next chunk from the socket. A failure surfaces on the next write
        // or in `finish`.
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let result = file.write_all_at(&data, offset);
            if result.is_ok()
                && let Some(h) = hasher.as_mut()
            {
                h.update(&data);
            }
            ChunkWritten { len, hasher, result }
        }));
        Ok(len)
    }

    /// Waits for the chunk write in flight, if any.
    async fn settle(&mut self) -> Result<(), StoreError> {
        let Some(job) = self.in_flight.take() else { return Ok(()) };
        let written = job.await.map_err(io::Error::other)?;
        match written.result {
            Ok(()) => {
                if let Some(hasher) = written.hasher {
                    self.hasher = Some(hasher);
                    self.hashed_upto += written.len;
                }
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
            self.store.release(self.reserved);
        }
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
            self.store.release(self.reserved);
        }
    }
}

/// What a chunk write on the blocking pool hands back.
#[derive(Debug)]
struct ChunkWritten {
    len: u64,
    /// The running hash, when this chunk was the next in order.
    hasher: Option<Sha256>,
    result: io::Result<()>,
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
/// only the last path component, no control characters, no leading dots,
/// at most 255 bytes. Never empty.
///
/// ```
/// use hubbub_transfer::sanitize_file_name;
/// assert_eq!(sanitize_file_name("../../etc/passwd"), "passwd");
/// assert_eq!(sanitize_file_name("C:\\Users\\me\\report.pdf"), "report.pdf");
/// assert_eq!(sanitize_file_name(".."), "file");
/// ```
pub fn sanitize_file_name(raw: &str) -> String {
    let last = raw.rsplit(['/', '\\']).next().unwrap_or(raw);
    let cleaned: String = last.chars().filter(|c| !c.is_control()).collect();
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
            dir: dir.to_owned(),
            quota_bytes: quota,
            resume_ttl: Duration::from_secs(600),
            max_parked: 2,
            limits: TransferLimits { min_chunk_size: 4, ..TransferLimits::default() },
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
        }
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

        let upload =
            store.begin(NewUpload { transfer_id: "t2".into(), ..request(2, 4, None) }).await.unwrap();
        store.park(upload, now);
        assert_eq!(store.used_bytes(), 10);
        assert_eq!(store.sweep(now + Duration::from_secs(599)), 0);
        assert_eq!(store.sweep(now + Duration::from_secs(600)), 1);
        assert_eq!(store.used_bytes(), 8);
        assert!(store.resume("t2", Some("ada")).is_none());

        // At most `max_parked` (2) are kept: the one closest to expiry goes.
        for (i, id) in ["p1", "p2", "p3"].iter().enumerate() {
            let upload =
                store.begin(NewUpload { transfer_id: (*id).into(), ..request(0, 4, None) }).await.unwrap();
            store.park(upload, now + Duration::from_secs(i as u64));
        }
        assert!(store.resume("p1", Some("ada")).is_none());
        assert!(store.resume("p3", Some("ada")).is_some());
        assert_eq!(store.sweep(now + Duration::from_secs(3600)), 1, "p2 was still kept");
        partial_emptied(&dir).await;
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn names_and_ids_are_checked() {
        assert_eq!(sanitize_file_name("a\u{0}b\nc.txt"), "abc.txt");
        assert_eq!(sanitize_file_name(&"é".repeat(300)).len(), 254);
        assert!(is_file_id(&uuid::Uuid::new_v4().simple().to_string()));
        assert!(!is_file_id("../../etc/passwd"));
        assert!(is_plausible_mime("image/png"));
        assert!(!is_plausible_mime("text/html\r\nX-Evil: 1"));
        assert!(!is_plausible_mime(""));
    }
}
