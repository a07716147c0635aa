//! Multipart uploads staged on the volume itself, as RunPod stages them: parts wait in the
//! hidden `.s3compat_uploads/` folder at the volume root until Complete or Abort, so an upload
//! left open keeps using the volume's fixed capacity, and a walk of the volume directory finds
//! its bytes.
//!
//! Layout: `.s3compat_uploads/<upload id>/upload.json` (key, initiation time, the object
//! attributes to apply on Complete) and one file per part, named by its number. A part is
//! written to a temp file in the same folder and renamed into place, so a retried or
//! concurrent UploadPart of the same number never leaves a torn part.
//!
//! s3s-fs stages parts in its own root, off the volume, with no way to choose the place, hence
//! this module.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use futures::{Stream, StreamExt};
use s3s::crypto::{Checksum, Md5};
use s3s::dto::StreamingBlob;
use s3s::{s3_error, S3Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufWriter, ReadBuf};

/// The staging folder's name at the volume root (RunPod's).
pub(crate) const STAGING_DIR: &str = ".s3compat_uploads";
const RECORD: &str = "upload.json";

/// Part numbers S3 accepts.
pub(crate) const PART_NUMBERS: std::ops::RangeInclusive<i32> = 1..=10_000;

/// What CreateMultipartUpload was told, kept until Complete applies it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct UploadRecord {
    pub key: String,
    pub initiated_ms: u64,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub content_encoding: Option<String>,
    #[serde(default)]
    pub content_disposition: Option<String>,
    #[serde(default)]
    pub content_language: Option<String>,
    #[serde(default)]
    pub cache_control: Option<String>,
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
}

impl UploadRecord {
    pub(crate) fn initiated(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.initiated_ms)
    }
}

/// A multipart upload begun on the volume and neither completed nor aborted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StagedUpload {
    pub upload_id: String,
    pub key: String,
    /// When CreateMultipartUpload answered (Unix ms).
    pub initiated_ms: u64,
    /// Parts stored so far.
    pub parts: usize,
    /// Bytes its staging folder holds on the volume: parts, parts still arriving, its record.
    pub bytes: u64,
}

/// A stored part.
#[derive(Debug, Clone)]
pub(crate) struct StagedPart {
    pub number: i32,
    pub size: u64,
    pub modified: Option<SystemTime>,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub(crate) struct Staging {
    root: PathBuf,
}

impl Staging {
    pub(crate) fn new(volume_dir: &Path) -> Self {
        Self {
            root: volume_dir.join(STAGING_DIR),
        }
    }

    pub(crate) async fn create(&self, record: &UploadRecord) -> io::Result<String> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = self.root.join(&id);
        tokio::fs::create_dir_all(&dir).await?;
        // Renamed into place so a concurrent ListMultipartUploads never reads half a record.
        let tmp = dir.join(format!(".{RECORD}.tmp"));
        tokio::fs::write(&tmp, serde_json::to_vec(record)?).await?;
        tokio::fs::rename(&tmp, dir.join(RECORD)).await?;
        Ok(id)
    }

    /// The upload's folder and record; NoSuchUpload unless `upload_id` is in progress for `key`.
    pub(crate) async fn open(
        &self,
        upload_id: &str,
        key: &str,
    ) -> S3Result<(PathBuf, UploadRecord)> {
        let no_such = || {
            s3_error!(
                NoSuchUpload,
                "no upload '{upload_id}' in progress for this key"
            )
        };
        // Only ids we handed out name a folder: nothing a client sends reaches another path.
        let id = uuid::Uuid::try_parse(upload_id).map_err(|_| no_such())?;
        let dir = self.root.join(id.simple().to_string());
        let record = match tokio::fs::read(dir.join(RECORD)).await {
            Ok(bytes) => serde_json::from_slice::<UploadRecord>(&bytes).map_err(|_| no_such())?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(no_such()),
            Err(e) => return Err(internal(e)),
        };
        if record.key != key {
            return Err(no_such());
        }
        Ok((dir, record))
    }

    /// Every upload in progress, by key, then initiation time, then id.
    pub(crate) fn uploads(&self) -> io::Result<Vec<(StagedUpload, UploadRecord)>> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut uploads = Vec::new();
        for entry in entries {
            let entry = entry?;
            let Ok(upload_id) = entry.file_name().into_string() else {
                continue;
            };
            let dir = entry.path();
            // A folder being created or removed right now has no record yet, or none any more.
            let Ok(bytes) = std::fs::read(dir.join(RECORD)) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<UploadRecord>(&bytes) else {
                continue;
            };
            let parts = parts(&dir).map(|p| p.len()).unwrap_or(0);
            uploads.push((
                StagedUpload {
                    upload_id,
                    key: record.key.clone(),
                    initiated_ms: record.initiated_ms,
                    parts,
                    bytes: bytes_under(&dir),
                },
                record,
            ));
        }
        uploads.sort_by(|(a, _), (b, _)| {
            (&a.key, a.initiated_ms, &a.upload_id).cmp(&(&b.key, b.initiated_ms, &b.upload_id))
        });
        Ok(uploads)
    }

    /// Bytes every upload in progress holds on the volume.
    pub(crate) fn bytes(&self) -> u64 {
        bytes_under(&self.root)
    }
}

/// The stored parts in an upload's folder, by number.
pub(crate) fn parts(dir: &Path) -> io::Result<Vec<StagedPart>> {
    let mut parts = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(number) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
            .filter(|n| PART_NUMBERS.contains(n))
        else {
            continue;
        };
        let meta = entry.metadata()?;
        parts.push(StagedPart {
            number,
            size: meta.len(),
            modified: meta.modified().ok(),
            path: entry.path(),
        });
    }
    parts.sort_by_key(|p| p.number);
    Ok(parts)
}

/// Streams `body` into part `number` of the upload in `dir`; returns its MD5 (hex). With
/// `content_md5` (hex), a body that does not match it is refused and nothing is stored.
pub(crate) async fn write_part(
    dir: &Path,
    number: i32,
    mut body: StreamingBlob,
    content_md5: Option<String>,
) -> S3Result<String> {
    let tmp_path = dir.join(format!(".{number}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let tmp = TempFile(Some(tmp_path.clone()));
    let aborted = || {
        s3_error!(
            NoSuchUpload,
            "the upload was completed or aborted meanwhile"
        )
    };
    let file = match tokio::fs::File::create(&tmp_path).await {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(aborted()),
        Err(e) => return Err(internal(e)),
    };
    let mut out = BufWriter::new(file);
    let mut md5 = Md5::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| s3_error!(IncompleteBody, "part body: {e}"))?;
        md5.update(&chunk);
        out.write_all(&chunk).await.map_err(internal)?;
    }
    out.flush().await.map_err(internal)?;
    drop(out);
    let md5 = hex(&md5.finalize());
    if content_md5.is_some_and(|wanted| wanted != md5) {
        return Err(s3_error!(
            BadDigest,
            "Content-MD5 does not match the part received"
        ));
    }
    match tokio::fs::rename(&tmp_path, dir.join(number.to_string())).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(aborted()),
        Err(e) => return Err(internal(e)),
    }
    tmp.keep();
    Ok(md5)
}

pub(crate) async fn file_md5(path: &Path) -> io::Result<String> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(hex(&md5.finalize()));
        }
        md5.update(&buf[..n]);
    }
}

/// A part Complete asked for, with the ETag the client holds for it, if it sent one.
pub(crate) struct WantedPart {
    pub number: i32,
    pub path: PathBuf,
    pub e_tag: Option<String>,
}

/// The parts, one after another, read as they are sent (a chunk at a time, whatever their
/// size). A part whose MD5 differs from the ETag the client sent for it ends the stream with an
/// error and leaves the reason in [`Assembly::failure`].
pub(crate) struct Assembly {
    parts: VecDeque<WantedPart>,
    current: Option<(tokio::fs::File, Md5, WantedPart)>,
    buf: Box<[u8]>,
    failure: Arc<Mutex<Option<String>>>,
}

impl Assembly {
    pub(crate) fn new(parts: Vec<WantedPart>) -> Self {
        Self {
            parts: parts.into(),
            current: None,
            buf: vec![0u8; 64 * 1024].into_boxed_slice(),
            failure: Arc::default(),
        }
    }

    /// Where the reason for a failed part will be, once the stream has ended.
    pub(crate) fn failure(&self) -> Arc<Mutex<Option<String>>> {
        self.failure.clone()
    }

    fn fail(&mut self, reason: String) -> Poll<Option<io::Result<Bytes>>> {
        self.parts.clear();
        self.current = None;
        let error = io::Error::other(reason.clone());
        *self
            .failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(reason);
        Poll::Ready(Some(Err(error)))
    }
}

impl Stream for Assembly {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.current.is_none() {
                let Some(part) = this.parts.pop_front() else {
                    return Poll::Ready(None);
                };
                match std::fs::File::open(&part.path) {
                    Ok(file) => {
                        this.current = Some((tokio::fs::File::from_std(file), Md5::new(), part));
                    }
                    Err(_) => return this.fail(format!("part {} is gone", part.number)),
                }
            }
            let (file, md5, _) = this.current.as_mut().expect("set above");
            let mut buf = ReadBuf::new(&mut this.buf);
            if let Err(e) = ready!(Pin::new(file).poll_read(cx, &mut buf)) {
                this.parts.clear();
                this.current = None;
                return Poll::Ready(Some(Err(e)));
            }
            let filled = buf.filled();
            if filled.is_empty() {
                let (_, md5, part) = this.current.take().expect("set above");
                let actual = hex(&md5.finalize());
                if part.e_tag.as_deref().is_some_and(|wanted| wanted != actual) {
                    return this.fail(format!(
                        "part {}: ETag does not match the part stored",
                        part.number
                    ));
                }
                continue;
            }
            md5.update(filled);
            return Poll::Ready(Some(Ok(Bytes::copy_from_slice(filled))));
        }
    }
}

/// Removed on drop unless kept: a part that never arrived whole leaves nothing behind.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Bytes of the files under `dir` (0 if it is missing); linked directories are not followed.
pub(crate) fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => bytes_under(&entry.path()),
            Ok(_) => entry.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub(crate) fn internal(e: impl std::error::Error + Send + Sync + 'static) -> s3s::S3Error {
    s3s::S3Error::internal_error(e)
}
