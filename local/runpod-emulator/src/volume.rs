//! The network volume's S3-compatible API (reference §3): path-style, bucket = volume id,
//! key = path relative to the volume root, SigV4 with one access key.
//!
//! Storage is s3s-fs, which serves bucket `b` from `<root>/b` and keeps its bookkeeping files in
//! `<root>` itself. The emulator gives it a private root next to the volume holding a single
//! symlink `<volume_id> -> volume_dir`, so the worker and the S3 API see the same files, nothing
//! foreign appears inside the volume, and the volume directory may have any name. The root is
//! per instance (two emulators on one volume must not share s3s-fs temp-file names) and is
//! removed on shutdown.
//!
//! [`VolumeS3`] sits in front of s3s-fs and lets through only what RunPod supports, on the one
//! bucket: no CreateBucket/DeleteBucket, no DeleteObjects, no presigned URLs. It answers
//! itself what RunPod does differently from s3s-fs: listings (`listing`: empty folders, the
//! hidden staging folder, the repeated continuation token) and multipart uploads (`uploads`:
//! parts staged on the volume). Objects themselves are read and written by s3s-fs.

mod listing;
mod uploads;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use s3s::auth::SimpleAuth;
use s3s::config::{S3Config, StaticConfigProvider};
use s3s::dto::*;
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};
use s3s_fs::FileSystem;

use crate::chaos::{FaultKind, S3Fault};
use crate::config::EmulatorConfig;
use crate::faults::FaultState;
use crate::EmulatorError;

use listing::{ListQuery, Page};
pub use uploads::StagedUpload;
use uploads::{Staging, UploadRecord, WantedPart, PART_NUMBERS, STAGING_DIR};

/// The s3s-fs root prepared for one emulator instance.
#[derive(Debug)]
pub(crate) struct VolumeRoot {
    /// Canonical volume directory.
    pub volume_dir: PathBuf,
    /// Private s3s-fs root (sibling of the volume directory).
    pub fs_root: PathBuf,
}

impl VolumeRoot {
    pub(crate) fn prepare(config: &EmulatorConfig) -> Result<Self, EmulatorError> {
        if !s3s::path::check_bucket_name(&config.volume_id) {
            return Err(EmulatorError::Config(format!(
                "volume_id '{}' is not a valid S3 bucket name",
                config.volume_id
            )));
        }
        std::fs::create_dir_all(&config.volume_dir)?;
        let volume_dir = config.volume_dir.canonicalize()?;
        let (Some(parent), Some(name)) = (volume_dir.parent(), volume_dir.file_name()) else {
            return Err(EmulatorError::Config(format!(
                "volume_dir {} must not be the filesystem root",
                volume_dir.display()
            )));
        };
        let fs_root = parent.join(format!(
            ".{}.s3s-{}",
            name.to_string_lossy(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&fs_root)?;
        link_dir(&volume_dir, &fs_root.join(&config.volume_id))?;
        Ok(Self {
            volume_dir,
            fs_root,
        })
    }

    /// Best effort: the symlink goes first so nothing can ever recurse into the volume.
    pub(crate) fn remove(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.fs_root) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.fs_root);
    }
}

#[cfg(unix)]
fn link_dir(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn link_dir(_target: &Path, _link: &Path) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "the volume S3 API needs symlinks (unix)",
    ))
}

pub(crate) fn service(
    config: &EmulatorConfig,
    root: &VolumeRoot,
) -> Result<S3Service, EmulatorError> {
    let fs = FileSystem::new(&root.fs_root).map_err(|e| EmulatorError::Volume(format!("{e:?}")))?;
    let volume = VolumeS3 {
        fs,
        volume_id: config.volume_id.clone(),
        volume_dir: root.volume_dir.clone(),
        staging: Staging::new(&root.volume_dir),
        list_staging_folder: config.s3_list_staging_folder,
        list_empty_folders: config.s3_list_empty_folders,
        delete_removes_empty_folder: config.s3_delete_removes_empty_folder,
        repeat_token_above: config.s3_repeat_token_above,
        repeat_token_delimited: config.s3_repeat_token_delimited,
    };
    let mut builder = S3ServiceBuilder::new(volume);
    builder.set_auth(SimpleAuth::from_single(
        config.volume_access_key.clone(),
        config.volume_secret_key.clone(),
    ));
    let mut s3_config = S3Config::default();
    // RunPod tolerates clocks up to 1 h off (AWS: 15 min).
    s3_config.presigned_url_max_skew_time_secs = 3600;
    builder.set_config(Arc::new(StaticConfigProvider::new(Arc::new(s3_config))));
    Ok(builder.build())
}

/// Multipart uploads in progress on the volume at `volume_dir`, by key.
pub(crate) fn staged_uploads(volume_dir: &Path) -> Vec<StagedUpload> {
    Staging::new(volume_dir)
        .uploads()
        .map(|found| found.into_iter().map(|(upload, _)| upload).collect())
        .unwrap_or_default()
}

/// Bytes the uploads in progress hold in the volume's staging folder.
pub(crate) fn staged_upload_bytes(volume_dir: &Path) -> u64 {
    Staging::new(volume_dir).bytes()
}

/// Bytes of every file on the volume, staged parts included.
pub(crate) fn volume_bytes(volume_dir: &Path) -> u64 {
    uploads::bytes_under(volume_dir)
}

#[derive(Clone)]
struct HttpState {
    service: S3Service,
    reject_presigned: bool,
    faults: Arc<FaultState>,
}

pub(crate) fn router(
    service: S3Service,
    reject_presigned: bool,
    faults: Arc<FaultState>,
) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(HttpState {
        service,
        reject_presigned,
        faults,
    })
}

async fn handle(State(state): State<HttpState>, req: Request) -> Response {
    if state.reject_presigned && is_presigned(req.uri().query().unwrap_or("")) {
        return xml_error(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "Pre-signed URLs are not supported by the network volume S3 API",
        );
    }
    let mut fault = S3Fault::default();
    let what = format!("{} {}", req.method(), req.uri().path());
    if let Some(chaos) = state.faults.chaos_config() {
        fault = state
            .faults
            .chaos
            .s3_fault(&chaos, req.method() == Method::GET);
        if let Some(slow) = fault.slow {
            state.faults.chaos.record(FaultKind::S3Slow, &what);
            tokio::time::sleep(slow).await;
        }
        if fault.error_502 {
            state.faults.chaos.record(FaultKind::S3Error502, &what);
            // What a proxy in front of the S3 API answers: HTML, not an S3 XML error.
            return (
                StatusCode::BAD_GATEWAY,
                [(header::CONTENT_TYPE, "text/html")],
                "<html><body><h1>502 Bad Gateway</h1></body></html>",
            )
                .into_response();
        }
    }
    let req = req.map(s3s::Body::http_body_unsync);
    match state.service.call(req).await {
        Ok(response) if fault.truncate && response.status().is_success() => {
            state.faults.chaos.record(FaultKind::S3Truncated, &what);
            truncated(response.map(Body::new))
        }
        Ok(response) => response.map(Body::new),
        Err(err) => {
            tracing::error!(?err, "s3 request failed");
            xml_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "internal error",
            )
        }
    }
}

/// Sends the first half of the body (the headers still announce all of it), then fails the
/// stream, which drops the connection mid-body: the client sees a short read.
fn truncated(response: Response) -> Response {
    let (parts, body) = response.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut budget = declared / 2;
    let stream = body.into_data_stream().map(move |chunk| match chunk {
        Ok(bytes) if budget == 0 => {
            let _ = bytes;
            Err(std::io::Error::other("connection dropped (injected)"))
        }
        Ok(mut bytes) => {
            if bytes.len() > budget {
                bytes.truncate(budget);
            }
            budget -= bytes.len();
            Ok(bytes)
        }
        Err(err) => Err(std::io::Error::other(err)),
    });
    // End with an error even when the half fits in the first chunk.
    let stream = stream.chain(futures::stream::once(async {
        Err(std::io::Error::other("connection dropped (injected)"))
    }));
    Response::from_parts(parts, Body::from_stream(stream))
}

fn is_presigned(query: &str) -> bool {
    let keys: Vec<String> = query
        .split('&')
        .map(|pair| pair.split('=').next().unwrap_or("").to_ascii_lowercase())
        .collect();
    let has = |k: &str| keys.iter().any(|key| key == k);
    has("x-amz-signature") || (has("signature") && has("awsaccesskeyid"))
}

fn xml_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    (status, [(header::CONTENT_TYPE, "application/xml")], body).into_response()
}

struct VolumeS3 {
    fs: FileSystem,
    volume_id: String,
    volume_dir: PathBuf,
    staging: Staging,
    list_staging_folder: bool,
    list_empty_folders: bool,
    delete_removes_empty_folder: bool,
    repeat_token_above: Option<usize>,
    repeat_token_delimited: bool,
}

impl VolumeS3 {
    fn bucket(&self, bucket: &str) -> S3Result<()> {
        if bucket == self.volume_id {
            Ok(())
        } else {
            Err(s3_error!(NoSuchBucket, "no network volume '{bucket}'"))
        }
    }

    fn object(&self, bucket: &str, key: &str) -> S3Result<()> {
        self.bucket(bucket)?;
        check_key(key)
    }

    /// A key whose file may be read: a hidden staging folder holds none, and a directory is
    /// no file (s3s-fs would answer 500 reading one).
    fn readable(&self, bucket: &str, key: &str) -> S3Result<()> {
        self.object(bucket, key)?;
        if (is_staging(key) && !self.list_staging_folder) || self.volume_dir.join(key).is_dir() {
            return Err(s3_error!(NoSuchKey));
        }
        Ok(())
    }

    /// A key that may be written or removed: never one in the staging folder, whose files are
    /// the emulator's own record of the uploads in progress.
    fn writable(&self, bucket: &str, key: &str) -> S3Result<()> {
        self.object(bucket, key)?;
        if is_staging(key) {
            return Err(s3_error!(
                AccessDenied,
                "{STAGING_DIR}/ holds the volume's multipart uploads in progress"
            ));
        }
        Ok(())
    }

    async fn list(&self, query: ListQuery) -> S3Result<Page> {
        let volume = self.volume_dir.clone();
        tokio::task::spawn_blocking(move || listing::list(&volume, &query))
            .await
            .map_err(uploads::internal)?
            .map_err(uploads::internal)
    }

    fn query(
        &self,
        prefix: Option<&str>,
        delimiter: Option<&str>,
        max_keys: Option<i32>,
    ) -> ListQuery {
        ListQuery {
            prefix: prefix.unwrap_or_default().to_owned(),
            delimiter: delimiter.filter(|d| !d.is_empty()).map(str::to_owned),
            after: None,
            // S3 hands out at most 1000 a page, whatever a client asks for.
            max_keys: max_keys.map_or(1000, |n| usize::try_from(n.clamp(0, 1000)).unwrap_or(0)),
            empty_folders: self.list_empty_folders,
            staging_folder: self.list_staging_folder,
        }
    }
}

fn is_staging(key: &str) -> bool {
    key.split('/').next() == Some(STAGING_DIR)
}

/// Keys are file paths under the volume root; s3s-fs only checks they stay under its own root,
/// which here would still reach the bookkeeping files next to the volume.
fn check_key(key: &str) -> S3Result<()> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.contains('\0')
        || key.split('/').any(|part| part == "..");
    if bad {
        Err(s3_error!(
            InvalidArgument,
            "object key must be a path relative to the volume root"
        ))
    } else {
        Ok(())
    }
}

/// A ListObjectsV2 continuation token. Clients see it as opaque (base64 of this JSON); it
/// carries all the repeated-token bug needs, so the emulator keeps no state per listing.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct ListToken {
    /// The last key or common prefix handed out: the next page starts after it.
    after: String,
    /// Where the page that handed out this token started.
    page_after: Option<String>,
    /// Keys and common prefixes handed out so far in this listing.
    handed_out: usize,
}

impl ListToken {
    fn encode(&self) -> String {
        use base64::Engine;
        let json = serde_json::to_vec(self).expect("a token serialises");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    fn decode(token: &str) -> S3Result<Self> {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or_else(|| {
                s3_error!(
                    InvalidArgument,
                    "The continuation token provided is incorrect"
                )
            })
    }
}

fn listed_objects(page: &mut Page) -> (Option<Vec<Object>>, Option<Vec<CommonPrefix>>) {
    let objects: Vec<Object> = page
        .objects
        .drain(..)
        .map(|listed| Object {
            key: Some(listed.key),
            size: Some(i64::try_from(listed.size).unwrap_or(i64::MAX)),
            last_modified: listed.modified.map(Timestamp::from),
            ..Default::default()
        })
        .collect();
    let prefixes: Vec<CommonPrefix> = page
        .prefixes
        .drain(..)
        .map(|prefix| CommonPrefix {
            prefix: Some(prefix),
        })
        .collect();
    (
        (!objects.is_empty()).then_some(objects),
        (!prefixes.is_empty()).then_some(prefixes),
    )
}

#[async_trait::async_trait]
impl S3 for VolumeS3 {
    async fn list_buckets(
        &self,
        _req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let created = std::fs::metadata(&self.volume_dir)
            .and_then(|m| m.created().or_else(|_| m.modified()))
            .ok()
            .map(Timestamp::from);
        let output = ListBucketsOutput {
            buckets: Some(vec![Bucket {
                creation_date: created,
                name: Some(self.volume_id.clone()),
                bucket_region: None,
            }]),
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.bucket(&req.input.bucket)?;
        self.fs.head_bucket(req).await
    }

    /// Version 1 pages by key (`Marker`), so it never meets the repeated-token bug.
    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let input = req.input;
        self.bucket(&input.bucket)?;
        let mut query = self.query(
            input.prefix.as_deref(),
            input.delimiter.as_deref(),
            input.max_keys,
        );
        query.after = input.marker.clone();
        let max_keys = i32::try_from(query.max_keys).unwrap_or(1000);
        let mut page = self.list(query).await?;
        let (contents, common_prefixes) = listed_objects(&mut page);
        let output = ListObjectsOutput {
            name: Some(input.bucket),
            prefix: input.prefix,
            marker: input.marker,
            max_keys: Some(max_keys),
            is_truncated: Some(page.truncated),
            contents,
            common_prefixes,
            delimiter: input.delimiter,
            next_marker: page.last.filter(|_| page.truncated),
            encoding_type: input.encoding_type,
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        self.bucket(&input.bucket)?;
        let token = input
            .continuation_token
            .as_deref()
            .map(ListToken::decode)
            .transpose()?;
        let mut query = self.query(
            input.prefix.as_deref(),
            input.delimiter.as_deref(),
            input.max_keys,
        );
        let repeat = (query.delimiter.is_none() || self.repeat_token_delimited)
            && token.as_ref().is_some_and(|token| {
                self.repeat_token_above
                    .is_some_and(|limit| token.handed_out >= limit)
            });
        query.after = match &token {
            Some(token) if repeat => token.page_after.clone(),
            Some(token) => Some(token.after.clone()),
            None => input.start_after.clone(),
        };
        let page_after = query.after.clone();
        let max_keys = i32::try_from(query.max_keys).unwrap_or(1000);
        let mut page = self.list(query).await?;
        let next_continuation_token = if repeat {
            // RunPod's bug: the page before comes back, with the very token the client sent.
            input.continuation_token.clone()
        } else if page.truncated {
            page.last.clone().map(|after| {
                ListToken {
                    after,
                    page_after,
                    handed_out: token.as_ref().map_or(0, |t| t.handed_out) + page.len(),
                }
                .encode()
            })
        } else {
            None
        };
        let key_count = i32::try_from(page.len()).unwrap_or(i32::MAX);
        let (contents, common_prefixes) = listed_objects(&mut page);
        let output = ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: input.prefix,
            max_keys: Some(max_keys),
            key_count: Some(key_count),
            continuation_token: input.continuation_token,
            is_truncated: Some(repeat || page.truncated),
            next_continuation_token,
            contents,
            common_prefixes,
            delimiter: input.delimiter,
            encoding_type: input.encoding_type,
            start_after: input.start_after,
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        self.readable(&req.input.bucket, &req.input.key)?;
        self.fs.get_object(req).await
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        self.readable(&req.input.bucket, &req.input.key)?;
        self.fs.head_object(req).await
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        self.writable(&req.input.bucket, &req.input.key)?;
        self.fs.put_object(req).await
    }

    /// A file goes and its folder stays, even emptied, as on a filesystem (s3s-fs removes only
    /// the file). `dir/` names the folder itself.
    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.writable(&req.input.bucket, &req.input.key)?;
        let Some(folder) = req.input.key.strip_suffix('/') else {
            return self.fs.delete_object(req).await;
        };
        if self.delete_removes_empty_folder {
            match tokio::fs::remove_dir(self.volume_dir.join(folder)).await {
                Ok(()) => {}
                // Missing, a file, or not empty: answered like any key DeleteObject leaves be.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound
                            | std::io::ErrorKind::NotADirectory
                            | std::io::ErrorKind::DirectoryNotEmpty
                    ) => {}
                Err(e) => return Err(uploads::internal(e)),
            }
        }
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        self.writable(&req.input.bucket, &req.input.key)?;
        match &req.input.copy_source {
            CopySource::Bucket { bucket, key, .. } => self.readable(bucket, key)?,
            _ => return Err(s3_error!(NotImplemented)),
        }
        self.fs.copy_object(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let input = req.input;
        self.writable(&input.bucket, &input.key)?;
        if input.key.ends_with('/') {
            return Err(s3_error!(
                InvalidArgument,
                "a folder cannot be uploaded in parts"
            ));
        }
        let record = UploadRecord {
            key: input.key.clone(),
            initiated_ms: uploads::now_ms(),
            content_type: input.content_type,
            content_encoding: input.content_encoding,
            content_disposition: input.content_disposition,
            content_language: input.content_language,
            cache_control: input.cache_control,
            metadata: input.metadata,
        };
        let upload_id = self
            .staging
            .create(&record)
            .await
            .map_err(uploads::internal)?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(upload_id),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let input = req.input;
        self.writable(&input.bucket, &input.key)?;
        if !PART_NUMBERS.contains(&input.part_number) {
            return Err(s3_error!(
                InvalidArgument,
                "Part number must be an integer between 1 and 10000, inclusive"
            ));
        }
        let (dir, _) = self.staging.open(&input.upload_id, &input.key).await?;
        let body = input.body.ok_or_else(|| s3_error!(IncompleteBody))?;
        let content_md5 = match input.content_md5.as_deref() {
            Some(b64) => {
                use base64::Engine;
                let digest = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| s3_error!(InvalidDigest))?;
                Some(uploads::hex(&digest))
            }
            None => None,
        };
        let md5 = uploads::write_part(&dir, input.part_number, body, content_md5).await?;
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(ETag::Strong(md5)),
            ..Default::default()
        }))
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let input = req.input;
        self.object(&input.bucket, &input.key)?;
        let (dir, _) = self.staging.open(&input.upload_id, &input.key).await?;
        let marker = input.part_number_marker.unwrap_or(0);
        let max_parts = input
            .max_parts
            .map_or(1000, |n| usize::try_from(n.clamp(1, 1000)).unwrap_or(1000));
        let mut stored: Vec<_> = uploads::parts(&dir)
            .map_err(uploads::internal)?
            .into_iter()
            .filter(|part| part.number > marker)
            .collect();
        let is_truncated = stored.len() > max_parts;
        stored.truncate(max_parts);
        let mut parts = Vec::with_capacity(stored.len());
        for part in &stored {
            // Computed on demand: ListParts is rare, and a part file is all the state a part has.
            let md5 = uploads::file_md5(&part.path)
                .await
                .map_err(uploads::internal)?;
            parts.push(Part {
                part_number: Some(part.number),
                size: Some(i64::try_from(part.size).unwrap_or(i64::MAX)),
                last_modified: part.modified.map(Timestamp::from),
                e_tag: Some(ETag::Strong(md5)),
                ..Default::default()
            });
        }
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(input.upload_id),
            part_number_marker: input.part_number_marker,
            next_part_number_marker: stored.last().filter(|_| is_truncated).map(|p| p.number),
            max_parts: Some(i32::try_from(max_parts).unwrap_or(1000)),
            is_truncated: Some(is_truncated),
            parts: Some(parts),
            ..Default::default()
        }))
    }

    /// The parts are streamed, in order, into s3s-fs's PutObject, which writes a temp file
    /// and renames it into place and keeps the object's attributes and ETag (the MD5 of the
    /// whole file) as for any other object. The staged parts go only once the object is there.
    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.writable(&req.input.bucket, &req.input.key)?;
        let (dir, record) = self
            .staging
            .open(&req.input.upload_id, &req.input.key)
            .await?;
        let requested = req
            .input
            .multipart_upload
            .as_ref()
            .and_then(|upload| upload.parts.as_deref())
            .filter(|parts| !parts.is_empty())
            .ok_or_else(|| s3_error!(InvalidPart, "You must specify at least one part"))?;
        let stored: std::collections::HashMap<i32, PathBuf> = uploads::parts(&dir)
            .map_err(uploads::internal)?
            .into_iter()
            .map(|part| (part.number, part.path))
            .collect();
        let mut wanted = Vec::with_capacity(requested.len());
        for part in requested {
            let number = part
                .part_number
                .ok_or_else(|| s3_error!(InvalidPart, "a part has no number"))?;
            if wanted
                .last()
                .is_some_and(|w: &WantedPart| w.number >= number)
            {
                return Err(s3_error!(InvalidPartOrder));
            }
            let path = stored
                .get(&number)
                .ok_or_else(|| s3_error!(InvalidPart, "part {number} was never uploaded"))?;
            wanted.push(WantedPart {
                number,
                path: path.clone(),
                e_tag: part.e_tag.as_ref().map(|e| e.value().to_owned()),
            });
        }
        let assembly = uploads::Assembly::new(wanted);
        let failure = assembly.failure();
        let put = req.map_input(|input| PutObjectInput {
            bucket: input.bucket,
            key: input.key,
            body: Some(StreamingBlob::wrap(assembly)),
            if_match: input.if_match,
            if_none_match: input.if_none_match,
            content_type: record.content_type,
            content_encoding: record.content_encoding,
            content_disposition: record.content_disposition,
            content_language: record.content_language,
            cache_control: record.cache_control,
            metadata: record.metadata,
            ..Default::default()
        });
        let (bucket, key) = (put.input.bucket.clone(), put.input.key.clone());
        let written = match self.fs.put_object(put).await {
            Ok(written) => written,
            Err(err) => {
                let reason = failure
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take();
                return Err(match reason {
                    Some(reason) => s3_error!(InvalidPart, "{reason}"),
                    None => err,
                });
            }
        };
        if let Err(err) = tokio::fs::remove_dir_all(&dir).await {
            tracing::warn!(%err, dir = %dir.display(), "completed upload's parts not removed");
        }
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(bucket),
            key: Some(key),
            e_tag: written.output.e_tag,
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let input = req.input;
        self.writable(&input.bucket, &input.key)?;
        let (dir, _) = self.staging.open(&input.upload_id, &input.key).await?;
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(uploads::internal(e)),
        }
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let input = req.input;
        self.bucket(&input.bucket)?;
        if input.delimiter.as_deref().is_some_and(|d| !d.is_empty()) {
            return Err(s3_error!(
                NotImplemented,
                "the emulator lists multipart uploads without a Delimiter"
            ));
        }
        let staging = self.staging.clone();
        let mut found = tokio::task::spawn_blocking(move || staging.uploads())
            .await
            .map_err(uploads::internal)?
            .map_err(uploads::internal)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        found.retain(|(upload, _)| upload.key.starts_with(&prefix));
        if let Some(key_marker) = input.key_marker.as_deref() {
            let resume = input.upload_id_marker.as_deref().and_then(|id| {
                found
                    .iter()
                    .position(|(u, _)| u.key == key_marker && u.upload_id == id)
            });
            match resume {
                Some(at) => drop(found.drain(..=at)),
                None => found.retain(|(upload, _)| upload.key.as_str() > key_marker),
            }
        }
        let max_uploads = input
            .max_uploads
            .map_or(1000, |n| usize::try_from(n.clamp(1, 1000)).unwrap_or(1000));
        let is_truncated = found.len() > max_uploads;
        found.truncate(max_uploads);
        let last = found
            .last()
            .map(|(u, _)| (u.key.clone(), u.upload_id.clone()));
        let uploads = found
            .into_iter()
            .map(|(upload, record)| MultipartUpload {
                key: Some(upload.key),
                upload_id: Some(upload.upload_id),
                initiated: Some(Timestamp::from(record.initiated())),
                ..Default::default()
            })
            .collect();
        let (next_key_marker, next_upload_id_marker) = match last.filter(|_| is_truncated) {
            Some((key, id)) => (Some(key), Some(id)),
            None => (None, None),
        };
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: input.prefix,
            key_marker: input.key_marker,
            upload_id_marker: input.upload_id_marker,
            max_uploads: Some(i32::try_from(max_uploads).unwrap_or(1000)),
            is_truncated: Some(is_truncated),
            next_key_marker,
            next_upload_id_marker,
            uploads: Some(uploads),
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presigned_queries_are_recognised() {
        assert!(is_presigned(
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=abc"
        ));
        assert!(is_presigned("AWSAccessKeyId=a&Signature=b&Expires=1"));
        assert!(!is_presigned("list-type=2&prefix=outputs%2F"));
        assert!(!is_presigned(""));
    }

    #[test]
    fn keys_must_stay_inside_the_volume() {
        assert!(check_key("inputs/job/input.jpg").is_ok());
        assert!(check_key("../x").is_err());
        assert!(check_key("a/../../x").is_err());
        assert!(check_key("/abs").is_err());
    }
}
