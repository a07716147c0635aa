//! Object stores on S3: the uploads and results buckets in AWS, and the RunPod network volume
//! through its S3-compatible API (bucket = volume id, path-style, no presigned URLs).
use crate::adapters::declared::DeclaredOperations;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use aws_types::sdk_config::SharedCredentialsProvider;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use gateway::config::VolumeConfig;
use gateway::ports::{
    ByteChunks, FolderPage, ObjectError, ObjectMeta, ObjectStore, PresignedPost, PresignedRequest,
    StagedPage, StagedUpload, StagedUploads,
};

/// Objects up to this size go up in one PutObject; larger ones as multipart uploads of parts
/// this size. It bounds the memory a copy holds, whatever the file's size.
pub const PART_SIZE: usize = 8 * 1024 * 1024;

#[derive(Clone)]
pub struct S3ObjectStore {
    client: Client,
    bucket: String,
    part_size: usize,
    /// Entries per listing page asked for; the store's own default (1,000) when `None`.
    list_page: Option<i32>,
    /// What POST policies are signed with (the SDK's own credentials chain and region); only
    /// the uploads bucket needs it.
    signing: Option<(SharedCredentialsProvider, String)>,
}

impl S3ObjectStore {
    /// The files under `prefix`, and the folders met, one folder level at a time
    /// (`Delimiter=/`), as RunPod's own example lists its volume: a recursive listing of a
    /// large volume repeats continuation tokens. A token seen again ends that folder's listing
    /// rather than looping on it.
    async fn walk(&self, prefix: &str, max: usize) -> Result<gateway::ports::Tree, ObjectError> {
        let mut keys = Vec::new();
        let mut found = Vec::new();
        let mut bytes = 0;
        let mut folders = std::collections::VecDeque::from([prefix.to_string()]);
        let mut seen = std::collections::HashSet::new();
        while let Some(folder) = folders.pop_front() {
            if !seen.insert(folder.clone()) {
                continue;
            }
            let mut token: Option<String> = None;
            let mut exists = false;
            loop {
                let (page, own_entry) = self.folder_page(&folder, token.as_deref()).await?;
                exists |= own_entry || !page.files.is_empty() || !page.folders.is_empty();
                keys.extend(page.files);
                folders.extend(page.folders);
                bytes += page.bytes;
                if keys.len() >= max || page.next.is_none() || page.next == token {
                    break;
                }
                token = page.next;
            }
            if exists && folder.ends_with('/') {
                found.push(folder);
            }
            if keys.len() >= max {
                break;
            }
        }
        keys.sort();
        keys.dedup();
        keys.truncate(max);
        found.sort();
        found.dedup();
        Ok(gateway::ports::Tree {
            files: keys,
            folders: found,
            bytes,
        })
    }

    /// One page of `folder`'s listing, and whether it held the folder's own entry (RunPod
    /// lists a folder as a key `folder/` of its own).
    async fn folder_page(
        &self,
        folder: &str,
        token: Option<&str>,
    ) -> Result<(FolderPage, bool), ObjectError> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(folder)
            .delimiter("/")
            .set_max_keys(self.list_page)
            .set_continuation_token(token.map(str::to_string))
            .send()
            .await
            .map_err(|e| classify(folder, e))?;
        let mut page = FolderPage::default();
        let mut own_entry = false;
        for object in out.contents() {
            let Some(key) = object.key() else { continue };
            if key == folder {
                own_entry = true;
            } else if key.ends_with('/') {
                // An empty folder's own entry, which RunPod's listing includes.
                page.folders.push(key.to_string());
            } else {
                page.files.push(key.to_string());
                page.bytes += object.size().unwrap_or(0).max(0) as u64;
            }
        }
        for sub in out.common_prefixes().iter().filter_map(|p| p.prefix()) {
            if !page.folders.iter().any(|f| f == sub) {
                page.folders.push(sub.to_string());
            }
        }
        page.folders.sort();
        page.next = out.next_continuation_token().map(str::to_string);
        Ok((page, own_entry))
    }

    pub fn new(client: Client, bucket: impl Into<String>) -> Self {
        Self {
            client,
            bucket: bucket.into(),
            part_size: PART_SIZE,
            signing: None,
            list_page: None,
        }
    }

    /// Asks for at most `entries` per listing page: short pages let a test reach a store's
    /// paging behaviour with a handful of keys.
    pub fn listing_pages_of(mut self, entries: i32) -> Self {
        self.list_page = Some(entries);
        self
    }

    /// Signs POST upload policies with the credentials and region of `sdk`.
    pub fn signing_with(mut self, sdk: &aws_config::SdkConfig) -> Self {
        self.signing = sdk.credentials_provider().map(|provider| {
            let region = sdk
                .region()
                .map(|r| r.to_string())
                .unwrap_or_else(|| "us-east-1".into());
            (provider, region)
        });
        self
    }

    /// Smaller parts for tests that want to see multipart uploads without large files.
    pub fn with_part_size(mut self, part_size: usize) -> Self {
        // S3 (unlike RunPod's volume) rejects parts under 5 MiB except the last; callers that
        // go lower know their server accepts it.
        self.part_size = part_size.max(1);
        self
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// An S3 client for AWS buckets, from the shared SDK config.
/// The S3 operations [`S3ObjectStore`] calls, on the AWS buckets and on the volume.
pub const AWS_OPERATIONS: &[&str] = &[
    "PutObject",
    "GetObject",
    "HeadObject",
    "CreateMultipartUpload",
    "UploadPart",
    "CompleteMultipartUpload",
    "AbortMultipartUpload",
    "DeleteObject",
    "ListObjectsV2",
    "ListMultipartUploads",
];

fn declared() -> DeclaredOperations {
    DeclaredOperations::new("S3 object store", AWS_OPERATIONS)
}

pub fn aws_client(sdk: &aws_config::SdkConfig, force_path_style: bool) -> Client {
    let config = aws_sdk_s3::config::Builder::from(sdk)
        .force_path_style(force_path_style)
        .interceptor(declared())
        .build();
    Client::from_conf(config)
}

/// The volume's retries: the SDK's standard mode (exponential backoff with full jitter, retry
/// quota) with more attempts than the AWS default of 3, because RunPod's S3 API is reported to
/// answer 502 now and then, and shorter waits (0.2 s doubling up to 5 s instead of 1 s up to
/// 20 s) so that six attempts stay within a webhook's time. What still fails surfaces as
/// `ObjectError::Transient`: the dispatch or finalize is retried later, never failed.
pub fn volume_retry_config() -> aws_sdk_s3::config::retry::RetryConfig {
    aws_sdk_s3::config::retry::RetryConfig::standard()
        .with_max_attempts(6)
        .with_initial_backoff(Duration::from_millis(200))
        .with_max_backoff(Duration::from_secs(5))
}

/// An S3 client for the RunPod network volume. Its own endpoint, region and keys; path-style;
/// checksums only when required, because the new SDK default (CRC32 trailers with aws-chunked
/// bodies) is unconfirmed on RunPod's S3 API; and generous retries for its reported 502s.
pub fn volume_client(config: &VolumeConfig) -> Client {
    let credentials = Credentials::new(
        &config.access_key_id,
        &config.secret_access_key,
        None,
        None,
        "runpod-volume",
    );
    let s3 = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .endpoint_url(&config.endpoint)
        .region(Region::new(config.region.clone()))
        .credentials_provider(credentials)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .retry_config(volume_retry_config())
        .interceptor(declared())
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .read_timeout(Duration::from_secs(60))
                .build(),
        )
        .build();
    Client::from_conf(s3)
}

fn classify<E: ProvideErrorMetadata + std::fmt::Debug>(key: &str, err: SdkError<E>) -> ObjectError {
    match &err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code().unwrap_or_default();
            if status == 404 || code == "NoSuchKey" || code == "NotFound" {
                ObjectError::NotFound(key.to_string())
            } else if status == 429 || status >= 500 || code == "SlowDown" {
                ObjectError::Transient(format!("{status} {code}"))
            } else {
                ObjectError::Permanent(format!(
                    "{status} {code}: {}",
                    service.err().message().unwrap_or_default()
                ))
            }
        }
        SdkError::ConstructionFailure(_) => ObjectError::Permanent(format!("{err:?}")),
        _ => ObjectError::Transient(format!("{err:?}")),
    }
}

fn presigned(request: aws_sdk_s3::presigning::PresignedRequest) -> PresignedRequest {
    PresignedRequest {
        method: request.method().to_string(),
        url: request.uri().to_string(),
        headers: request
            .headers()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

impl S3ObjectStore {
    /// The URL a POST upload goes to: the bucket's own, as the SDK resolves it (virtual-hosted
    /// in AWS, path-style locally), read off a presigned request for `key`.
    async fn bucket_url(&self, key: &str) -> Result<String, ObjectError> {
        let config = PresigningConfig::expires_in(Duration::from_secs(60))
            .map_err(|e| ObjectError::Permanent(e.to_string()))?;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(|e| classify(key, e))?;
        let mut url = url::Url::parse(request.uri())
            .map_err(|e| ObjectError::Permanent(format!("presigned URL: {e}")))?;
        url.set_query(None);
        let first = key.split('/').next().unwrap_or(key);
        let path = url.path().to_string();
        let bucket_path = path
            .rfind(&format!("/{first}/"))
            .map(|at| &path[..at])
            .unwrap_or("");
        url.set_path(&format!("{bucket_path}/"));
        Ok(url.to_string())
    }

    async fn put_multipart(
        &self,
        key: &str,
        content_type: &str,
        mut body: ByteChunks,
    ) -> Result<(), ObjectError> {
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .send()
            .await
            .map_err(|e| classify(key, e))?;
        let upload_id = upload
            .upload_id()
            .ok_or_else(|| ObjectError::Permanent("no upload id".into()))?
            .to_string();
        let result = async {
            let mut parts = Vec::new();
            // Exactly one part is filled at a time, in one reused allocation: a chunk that would
            // overflow it is split and its rest starts the next part, so memory stays at one
            // part whatever the file size.
            let mut buffer = BytesMut::with_capacity(self.part_size);
            loop {
                let next = body.next().await.transpose()?;
                let finished = next.is_none();
                let mut chunk = next.unwrap_or_default();
                loop {
                    let take = (self.part_size - buffer.len()).min(chunk.len());
                    buffer.extend_from_slice(&chunk.split_to(take));
                    let last = finished && chunk.is_empty() && !buffer.is_empty();
                    if buffer.len() == self.part_size || last {
                        let part = buffer.split().freeze();
                        let number = parts.len() as i32 + 1;
                        let out = self
                            .client
                            .upload_part()
                            .bucket(&self.bucket)
                            .key(key)
                            .upload_id(&upload_id)
                            .part_number(number)
                            .body(ByteStream::from(part))
                            .send()
                            .await
                            .map_err(|e| classify(key, e))?;
                        parts.push(
                            CompletedPart::builder()
                                .part_number(number)
                                .set_e_tag(out.e_tag().map(str::to_string))
                                .build(),
                        );
                        // The part is gone with its request: take its allocation back rather
                        // than allocating anew, which the allocator may not return to the OS.
                        buffer.reserve(self.part_size);
                    }
                    if chunk.is_empty() {
                        break;
                    }
                }
                if finished {
                    break;
                }
            }
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| classify(key, e))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            // Staged parts cost storage (on the volume, in a hidden folder) until aborted.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }
}

#[async_trait]
impl ObjectStore for S3ObjectStore {
    async fn put_bytes(
        &self,
        key: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<(), ObjectError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify(key, e))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, ObjectError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectMeta {
                size: out.content_length().unwrap_or_default().max(0) as u64,
                content_type: out.content_type().map(str::to_string),
            })),
            Err(err) => match classify(key, err) {
                ObjectError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn read_prefix(&self, key: &str, len: u64) -> Result<Bytes, ObjectError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes=0-{}", len.saturating_sub(1)))
            .send()
            .await
            .map_err(|e| classify(key, e))?;
        let data = out
            .body
            .collect()
            .await
            .map_err(|e| ObjectError::Transient(e.to_string()))?;
        let mut bytes = data.into_bytes();
        // Servers that ignore Range send the whole object; keep only what was asked for.
        bytes.truncate(len as usize);
        Ok(bytes)
    }

    async fn open(&self, key: &str) -> Result<(ObjectMeta, ByteChunks), ObjectError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(key, e))?;
        let meta = ObjectMeta {
            size: out.content_length().unwrap_or_default().max(0) as u64,
            content_type: out.content_type().map(str::to_string),
        };
        let stream = futures::stream::unfold(Some(out.body), |body| async move {
            let mut body = body?;
            match body.try_next().await {
                Ok(Some(chunk)) => Some((Ok(chunk), Some(body))),
                Ok(None) => None,
                Err(e) => Some((Err(ObjectError::Transient(e.to_string())), None)),
            }
        });
        Ok((meta, stream.boxed()))
    }

    async fn put_stream(
        &self,
        key: &str,
        meta: &ObjectMeta,
        mut body: ByteChunks,
    ) -> Result<(), ObjectError> {
        let content_type = meta
            .content_type
            .as_deref()
            .unwrap_or("application/octet-stream");
        if meta.size as usize > self.part_size {
            return self.put_multipart(key, content_type, body).await;
        }
        let mut buffer = BytesMut::with_capacity(meta.size as usize);
        while let Some(chunk) = body.next().await {
            buffer.extend_from_slice(&chunk?);
            if buffer.len() > self.part_size {
                return Err(ObjectError::Permanent(format!(
                    "{key} is larger than its declared {} bytes",
                    meta.size
                )));
            }
        }
        self.put_bytes(key, buffer.freeze(), content_type).await
    }

    async fn presign_get(
        &self,
        key: &str,
        expires_in: Duration,
        download_name: Option<&str>,
    ) -> Result<PresignedRequest, ObjectError> {
        let config = PresigningConfig::expires_in(expires_in)
            .map_err(|e| ObjectError::Permanent(e.to_string()))?;
        let mut request = self.client.get_object().bucket(&self.bucket).key(key);
        if let Some(name) = download_name {
            let safe: String = name
                .chars()
                .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\')
                .collect();
            request =
                request.response_content_disposition(format!("attachment; filename=\"{safe}\""));
        }
        request
            .presigned(config)
            .await
            .map(presigned)
            .map_err(|e| classify(key, e))
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(key, e))
        {
            Ok(_) | Err(ObjectError::NotFound(_)) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// One folder level at a time (`Delimiter=/`), as RunPod's own volume example lists: its
    /// listings are reported to repeat continuation tokens on long recursive walks, and a
    /// level-by-level walk never reads folders outside `prefix`.
    async fn list(&self, prefix: &str, max: usize) -> Result<Vec<String>, ObjectError> {
        Ok(self.walk(prefix, max).await?.files)
    }

    async fn list_tree(
        &self,
        prefix: &str,
        max: usize,
    ) -> Result<gateway::ports::Tree, ObjectError> {
        self.walk(prefix, max).await
    }

    async fn list_folder(
        &self,
        folder: &str,
        token: Option<&str>,
    ) -> Result<FolderPage, ObjectError> {
        Ok(self.folder_page(folder, token).await?.0)
    }

    async fn presign_post(
        &self,
        key: &str,
        content_type: &str,
        max_bytes: u64,
        expires_in: Duration,
    ) -> Result<PresignedPost, ObjectError> {
        use aws_sdk_s3::config::ProvideCredentials;
        let (provider, region) = self
            .signing
            .as_ref()
            .ok_or_else(|| ObjectError::Permanent("no credentials to sign with".into()))?;
        let credentials = provider
            .provide_credentials()
            .await
            .map_err(|e| ObjectError::Transient(format!("credentials: {e}")))?;
        let post = crate::adapters::s3_post::sign(
            &crate::adapters::s3_post::Signer {
                access_key_id: credentials.access_key_id(),
                secret_access_key: credentials.secret_access_key(),
                session_token: credentials.session_token(),
                region,
            },
            &self.bucket,
            key,
            content_type,
            max_bytes,
            std::time::SystemTime::now(),
            expires_in,
        );
        Ok(PresignedPost {
            url: self.bucket_url(key).await?,
            fields: post.fields,
        })
    }
}

#[async_trait]
impl StagedUploads for S3ObjectStore {
    async fn staged_uploads(
        &self,
        prefix: &str,
        after: Option<&(String, String)>,
    ) -> Result<StagedPage, ObjectError> {
        let out = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_key_marker(after.map(|(key, _)| key.clone()))
            .set_upload_id_marker(after.map(|(_, id)| id.clone()))
            .send()
            .await
            .map_err(|e| classify(prefix, e))?;
        let uploads = out
            .uploads()
            .iter()
            .filter_map(|upload| {
                Some(StagedUpload {
                    key: upload.key()?.to_string(),
                    upload_id: upload.upload_id()?.to_string(),
                    initiated: upload.initiated().and_then(|at| at.to_millis().ok()),
                })
            })
            .collect();
        let next = match (
            out.is_truncated(),
            out.next_key_marker(),
            out.next_upload_id_marker(),
        ) {
            (Some(true), Some(key), Some(id)) => Some((key.to_string(), id.to_string())),
            _ => None,
        };
        Ok(StagedPage { uploads, next })
    }

    async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), ObjectError> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| classify(key, e))
        {
            // NoSuchUpload: completed or aborted meanwhile.
            Ok(_) | Err(ObjectError::NotFound(_)) => Ok(()),
            Err(err) => Err(err),
        }
    }
}
