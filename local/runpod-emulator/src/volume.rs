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
//! bucket: no CreateBucket/DeleteBucket, no DeleteObjects, no presigned URLs.

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

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        self.bucket(&req.input.bucket)?;
        self.fs.list_objects(req).await
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.bucket(&req.input.bucket)?;
        self.fs.list_objects_v2(req).await
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        self.object(&req.input.bucket, &req.input.key)?;
        self.fs.get_object(req).await
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        self.object(&req.input.bucket, &req.input.key)?;
        self.fs.head_object(req).await
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        self.object(&req.input.bucket, &req.input.key)?;
        self.fs.put_object(req).await
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.object(&req.input.bucket, &req.input.key)?;
        self.fs.delete_object(req).await
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        self.object(&req.input.bucket, &req.input.key)?;
        match &req.input.copy_source {
            CopySource::Bucket { bucket, key, .. } => self.object(bucket, key)?,
            _ => return Err(s3_error!(NotImplemented)),
        }
        self.fs.copy_object(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.object(&req.input.bucket, &req.input.key)?;
        self.fs.create_multipart_upload(req).await
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        self.object(&req.input.bucket, &req.input.key)?;
        self.fs.upload_part(req).await
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        self.object(&req.input.bucket, &req.input.key)?;
        self.fs.list_parts(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.object(&req.input.bucket, &req.input.key)?;
        self.fs.complete_multipart_upload(req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.object(&req.input.bucket, &req.input.key)?;
        self.fs.abort_multipart_upload(req).await
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
