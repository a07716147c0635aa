//! What RunPod reports about a job (from `/status` or a webhook), read into the few cases the
//! gateway acts on. Everything here is untrusted input: odd shapes become `Unknown` or a coded
//! failure, never a panic.
use serde_json::Value;

use super::job::{ErrorCode, JobError};
use super::paths::{PathError, VolumeLayout};

/// Longest error message kept from a worker; the rest is noise (and possibly large).
const MAX_MESSAGE_CHARS: usize = 1_000;
/// More files than this from one job is not a restoration result; refuse rather than copy.
pub const MAX_OUTPUT_FILES: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub enum Reported {
    Queued,
    /// In progress, with what the worker last reported of its progress, if anything readable.
    Running(Option<ProgressReport>),
    Completed(Option<Value>),
    Failed(String),
    TimedOut,
    Cancelled,
    /// An empty, partial or unrecognised report: ask `/status` rather than act on it.
    Unknown,
}

impl Reported {
    pub fn from_status(
        status: Option<&str>,
        output: Option<&Value>,
        error: Option<&Value>,
    ) -> Self {
        match status.map(str::to_ascii_uppercase).as_deref() {
            Some("IN_QUEUE") => Self::Queued,
            // The docs list RUNNING too; treat it as IN_PROGRESS.
            Some("IN_PROGRESS" | "RUNNING") => Self::Running(progress_of(output)),
            Some("COMPLETED") => Self::Completed(output.filter(|v| !v.is_null()).cloned()),
            Some("FAILED") => Self::Failed(worker_error_message(error)),
            Some("TIMED_OUT") => Self::TimedOut,
            Some("CANCELLED") => Self::Cancelled,
            _ => Self::Unknown,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Completed(_) | Self::Failed(_) | Self::TimedOut | Self::Cancelled
        )
    }
}

/// Longest progress message kept; a worker's status line, not its log.
pub const MAX_PROGRESS_MESSAGE_CHARS: usize = 200;

/// What a worker's `progress_update` said, as far as it reads as progress: a fraction done
/// (0 to 1) and/or a message.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressReport {
    pub fraction: Option<f64>,
    pub message: Option<String>,
}

/// Reads the `output` RunPod shows for a run in progress: whatever the worker last passed to
/// `progress_update`, any JSON. Understood:
/// - a number: a fraction from 0 to 1, or a percentage above 1 up to 100;
/// - a string: a message;
/// - an object: a fraction from `fraction` or `progress` (read as a number is), or from
///   `percent` or `pct`; a message from `message`, `status`, `stage` or `text`.
///
/// Anything else, or values out of range, read as no progress: the worker's output is
/// untrusted, and a client must never see a fraction outside 0..=1 or a message of any size.
pub fn progress_of(output: Option<&Value>) -> Option<ProgressReport> {
    fn fraction(value: &Value, percent: bool) -> Option<f64> {
        let n = value.as_f64().filter(|n| n.is_finite() && *n >= 0.0)?;
        match (percent, n) {
            (false, n) if n <= 1.0 => Some(n),
            (_, n) if n <= 100.0 => Some(n / 100.0),
            _ => None,
        }
    }
    fn message(value: &Value) -> Option<String> {
        let text: String = value
            .as_str()?
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_PROGRESS_MESSAGE_CHARS)
            .collect();
        let text = text.trim();
        (!text.is_empty()).then(|| text.to_string())
    }
    let report = match output? {
        Value::Number(_) => ProgressReport {
            fraction: fraction(output?, false),
            message: None,
        },
        Value::String(_) => ProgressReport {
            fraction: None,
            message: message(output?),
        },
        Value::Object(fields) => ProgressReport {
            fraction: ["fraction", "progress"]
                .iter()
                .find_map(|k| fields.get(*k).and_then(|v| fraction(v, false)))
                .or_else(|| {
                    ["percent", "pct"]
                        .iter()
                        .find_map(|k| fields.get(*k).and_then(|v| fraction(v, true)))
                }),
            message: ["message", "status", "stage", "text"]
                .iter()
                .find_map(|k| fields.get(*k).and_then(message)),
        },
        _ => return None,
    };
    (report.fraction.is_some() || report.message.is_some()).then_some(report)
}

/// The message a client may see for a failed worker. The runpod SDK sends a raised exception as
/// a JSON string with `error_type`, `error_message` and `error_traceback`; only the message is
/// kept: tracebacks leak worker internals and help no client.
pub fn worker_error_message(error: Option<&Value>) -> String {
    let text = match error {
        None | Some(Value::Null) => {
            return "the worker reported a failure without a message".into()
        }
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(map)) => map
                .get("error_message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| s.clone()),
            _ => s.clone(),
        },
        Some(Value::Object(map)) => map
            .get("error_message")
            .or_else(|| map.get("message"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| Value::Object(map.clone()).to_string()),
        Some(other) => other.to_string(),
    };
    let cleaned: String = text
        .chars()
        .filter(|c| !c.is_control() || *c == '\n')
        .take(MAX_MESSAGE_CHARS)
        .collect();
    if cleaned.trim().is_empty() {
        "the worker reported a failure without a message".into()
    } else {
        cleaned.trim().to_string()
    }
}

/// Reads the seed handler's output contract `{"prompt_id", "files": [absolute paths], "file_count"}`
/// into volume keys, each checked to lie under the job's own output prefix. Any bad path fails
/// the whole job: nothing is copied from a worker that named a file it must not.
pub fn volume_output_keys(
    output: Option<&Value>,
    layout: &VolumeLayout,
    job_id: &str,
) -> Result<Vec<String>, JobError> {
    let Some(output) = output else {
        return Err(JobError::new(
            ErrorCode::EmptyOutput,
            "the worker completed without any output",
        ));
    };
    let files = output
        .get("files")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            JobError::new(
                ErrorCode::InvalidOutput,
                "the worker's output has no \"files\" list",
            )
        })?;
    if files.is_empty() {
        return Err(JobError::new(
            ErrorCode::EmptyOutput,
            "the worker completed without any output file",
        ));
    }
    if files.len() > MAX_OUTPUT_FILES {
        return Err(JobError::new(
            ErrorCode::InvalidOutput,
            format!(
                "the worker returned {} files; at most {MAX_OUTPUT_FILES} are accepted",
                files.len()
            ),
        ));
    }
    let allowed = layout.root().outputs(job_id);
    let mut keys = Vec::with_capacity(files.len());
    for file in files {
        let path = file.as_str().ok_or_else(|| {
            JobError::new(ErrorCode::InvalidOutput, "an output file is not a string")
        })?;
        let key = layout.output_key(path, &allowed).map_err(|e: PathError| {
            let shown: String = path.chars().filter(|c| !c.is_control()).take(200).collect();
            JobError::new(
                ErrorCode::InvalidOutputPath,
                format!("output path {shown:?} rejected: {e}"),
            )
        })?;
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// Hosts the gateway may fetch a worker's `s3_url` images from (`OUTPUT_URL_ALLOWED_HOSTS`).
///
/// Each entry is one of:
/// - `host` or `host:port`: that host over https (default port 443 unless given);
/// - `*.domain`: any subdomain of `domain`, over https, default port;
/// - `http://host:port` or `https://host[:port]`: exactly that origin (scheme, host and port).
///
/// Hosts compare case-insensitively. An empty list allows no URL at all. URLs with a user or
/// password part are never allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UrlAllowList {
    rules: Vec<HostRule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum HostRule {
    /// `scheme://host:port`, all three must match.
    Origin {
        scheme: String,
        host: String,
        port: u16,
    },
    /// Subdomains of `domain` (not the domain itself), https on 443.
    Subdomains { domain: String },
}

impl UrlAllowList {
    /// Parses a comma-separated list; blanks are skipped.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            rules.push(HostRule::parse(entry)?);
        }
        Ok(Self { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn allows(&self, url: &url::Url) -> bool {
        if !url.username().is_empty() || url.password().is_some() {
            return false;
        }
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        self.rules.iter().any(|rule| match rule {
            HostRule::Origin {
                scheme,
                host: allowed,
                port: allowed_port,
            } => url.scheme() == scheme && host == *allowed && port == *allowed_port,
            HostRule::Subdomains { domain } => {
                url.scheme() == "https"
                    && port == 443
                    && host
                        .strip_suffix(domain.as_str())
                        .is_some_and(|head| !head.is_empty())
            }
        })
    }
}

impl HostRule {
    fn parse(entry: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{entry:?}: {why}");
        if let Some(domain) = entry.strip_prefix("*.") {
            let domain = domain.to_ascii_lowercase();
            if domain.is_empty() || domain.contains(['/', ':', '*', '@']) || !domain.contains('.') {
                return Err(bad(
                    "a wildcard needs a domain with a dot, like *.example.com",
                ));
            }
            return Ok(Self::Subdomains {
                domain: format!(".{domain}"),
            });
        }
        let with_scheme = if entry.contains("://") {
            entry.to_owned()
        } else {
            format!("https://{entry}")
        };
        let url = url::Url::parse(&with_scheme).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("only http and https are allowed"));
        }
        if !url.username().is_empty()
            || url.password().is_some()
            || url.path() != "/"
            || url.query().is_some()
            || url.fragment().is_some()
            || entry.trim_end_matches('/').contains('*')
        {
            return Err(bad(
                "give a host, host:port or scheme://host:port, nothing more",
            ));
        }
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return Err(bad("no host"));
        };
        Ok(Self::Origin {
            scheme: url.scheme().to_owned(),
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// What the gateway accepts from a worker-comfyui output (untrusted input).
#[derive(Clone, Debug)]
pub struct InlineImagePolicy {
    /// At most this many images per job.
    pub max_images: usize,
    /// At most this many bytes per image, decoded (base64) or downloaded (URL).
    pub max_image_bytes: u64,
    /// At most this many bytes of base64 images per job, decoded. (Downloads are counted
    /// against it by their declared size, and as they arrive.)
    pub max_job_bytes: u64,
    /// Where `s3_url` images may be fetched from.
    pub allowed_hosts: UrlAllowList,
}

/// Where one worker-comfyui image comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageSource<'a> {
    /// `type: "base64"`, checked to decode within the size cap; decoded again when stored, so
    /// that a job's images are never all held decoded at once.
    Inline(Base64Image<'a>),
    /// `type: "s3_url"`, on an allowed host; the size cap applies while downloading.
    Url(url::Url),
}

/// A base64 image of the worker's output, as it stands in the output, with its decoded size.
#[derive(Clone, Debug, PartialEq)]
pub struct Base64Image<'a> {
    data: &'a str,
    /// Bytes once decoded.
    pub size: u64,
}

impl Base64Image<'_> {
    /// The image's bytes. It decoded once already, so it decodes again the same way.
    pub fn decode(&self) -> Result<bytes::Bytes, JobError> {
        decode_image(self.data, self.size)
            .map_err(|(code, why)| JobError::new(code, format!("decoding an image: {why}")))
    }
}

/// One image of a worker-comfyui output, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct InlineImage<'a> {
    /// A safe base name (`[A-Za-z0-9._-]`, no leading dot, unique within the job).
    pub file_name: String,
    pub source: ImageSource<'a>,
}

/// Reads worker-comfyui's output `{"images": [{"filename", "type": "base64" | "s3_url",
/// "data"}]}`. Every image is checked before anything is accepted: a bad one (undecodable,
/// oversized, a URL off the allow-list, an unknown type), or too many, fails the whole output.
/// File names are reduced to a safe base name, so `../../x.png` becomes `x.png`.
pub fn worker_comfyui_images<'a>(
    output: Option<&'a Value>,
    policy: &InlineImagePolicy,
) -> Result<Vec<InlineImage<'a>>, JobError> {
    let invalid = |message: String| JobError::new(ErrorCode::InvalidOutput, message);
    let Some(output) = output else {
        return Err(JobError::new(
            ErrorCode::EmptyOutput,
            "the worker completed without any output",
        ));
    };
    let images = output
        .get("images")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("the worker's output has no \"images\" list".into()))?;
    if images.is_empty() {
        return Err(JobError::new(
            ErrorCode::EmptyOutput,
            "the worker completed without any image",
        ));
    }
    if images.len() > policy.max_images {
        return Err(invalid(format!(
            "the worker returned {} images; at most {} are accepted",
            images.len(),
            policy.max_images
        )));
    }
    let mut accepted: Vec<InlineImage> = Vec::with_capacity(images.len());
    let mut inline_bytes: u64 = 0;
    for (index, image) in images.iter().enumerate() {
        let n = index + 1;
        let field = |name: &str| image.get(name).and_then(Value::as_str);
        let (Some(filename), Some(kind), Some(data)) =
            (field("filename"), field("type"), field("data"))
        else {
            return Err(invalid(format!(
                "image {n} needs string \"filename\", \"type\" and \"data\""
            )));
        };
        let source = match kind {
            "base64" => {
                // Decoded to check it, then let go: one image decoded at a time.
                let size = decode_image(data, policy.max_image_bytes)
                    .map_err(|(code, why)| {
                        JobError::new(code, format!("image {n} ({}): {why}", shown(filename)))
                    })?
                    .len() as u64;
                inline_bytes += size;
                if inline_bytes > policy.max_job_bytes {
                    return Err(JobError::new(
                        ErrorCode::OutputTooLarge,
                        format!(
                            "the worker's images are larger than the job's {}-byte limit together",
                            policy.max_job_bytes
                        ),
                    ));
                }
                ImageSource::Inline(Base64Image { data, size })
            }
            "s3_url" => {
                let url = url::Url::parse(data)
                    .map_err(|_| invalid(format!("image {n} ({}): not a URL", shown(filename))))?;
                if !policy.allowed_hosts.allows(&url) {
                    return Err(invalid(format!(
                        "image {n} ({}): host {:?} is not allowed",
                        shown(filename),
                        url.host_str().unwrap_or_default()
                    )));
                }
                ImageSource::Url(url)
            }
            other => {
                return Err(invalid(format!(
                    "image {n}: unknown type {:?}",
                    shown(other)
                )))
            }
        };
        let taken: Vec<&str> = accepted.iter().map(|i| i.file_name.as_str()).collect();
        let file_name = unique_name(&safe_file_name(filename, n), &taken);
        accepted.push(InlineImage { file_name, source });
    }
    Ok(accepted)
}

/// For messages: a worker's string, without control characters and cut short.
fn shown(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(100).collect()
}

/// Base64 (standard alphabet; padding optional; an optional `data:…;base64,` prefix), checked
/// against the cap before decoding so an oversized image costs no allocation.
fn decode_image(data: &str, max_bytes: u64) -> Result<bytes::Bytes, (ErrorCode, String)> {
    let invalid = |why: String| (ErrorCode::InvalidOutput, why);
    let too_large = || {
        (
            ErrorCode::OutputTooLarge,
            format!("larger than the {max_bytes}-byte limit"),
        )
    };
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine as _;
    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let data = match data.split_once(',') {
        Some((head, rest)) if head.starts_with("data:") && head.ends_with(";base64") => rest,
        _ => data,
    };
    let data = data.trim();
    if data.is_empty() {
        return Err(invalid("empty image data".into()));
    }
    // Exact for valid base64: every 4 characters carry 3 bytes, padding carries none.
    let decoded_len = data.trim_end_matches('=').len() as u64 * 3 / 4;
    if decoded_len > max_bytes {
        return Err(too_large());
    }
    let bytes = ENGINE
        .decode(data)
        .map_err(|e| invalid(format!("invalid base64: {e}")))?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large());
    }
    if bytes.is_empty() {
        return Err(invalid("empty image data".into()));
    }
    Ok(bytes.into())
}

/// The last segment of a worker's file name, reduced to `[A-Za-z0-9._-]` (anything else
/// becomes `_`), leading dots dropped, at most [`super::paths::MAX_FILE_NAME_BYTES`] bytes
/// (keeping the extension). An empty result becomes `image-<n>`.
pub fn safe_file_name(raw: &str, n: usize) -> String {
    let last = raw.rsplit(['/', '\\']).next().unwrap_or_default();
    let mut name: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    name = name.trim_start_matches('.').to_owned();
    let max = super::paths::MAX_FILE_NAME_BYTES;
    if name.len() > max {
        match name.rsplit_once('.') {
            Some((stem, ext)) if ext.len() < 16 => {
                name = format!("{}.{ext}", &stem[..max - ext.len() - 1]);
            }
            _ => name.truncate(max),
        }
    }
    if name.is_empty() || name.chars().all(|c| c == '_' || c == '.') {
        format!("image-{n}")
    } else {
        name
    }
}

/// `name`, or `stem-2.ext`, `stem-3.ext`… if an earlier output already took it.
pub fn unique_name(name: &str, taken: &[&str]) -> String {
    if !taken.contains(&name) {
        return name.to_owned();
    }
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem, format!(".{ext}")),
        _ => (name, String::new()),
    };
    (2..)
        .map(|i| format!("{stem}-{i}{ext}"))
        .find(|candidate| !taken.contains(&candidate.as_str()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn layout() -> VolumeLayout {
        VolumeLayout::new(
            vec!["/runpod-volume".into(), "/workspace".into()],
            crate::domain::keys::VolumeRoot::new("gw").unwrap(),
        )
    }

    fn progress(output: Value) -> Option<(Option<f64>, Option<String>)> {
        progress_of(Some(&output)).map(|p| (p.fraction, p.message))
    }

    #[test]
    fn a_running_report_carries_the_workers_progress() {
        assert_eq!(
            Reported::from_status(Some("IN_PROGRESS"), Some(&json!("step 2")), None),
            Reported::Running(Some(ProgressReport {
                fraction: None,
                message: Some("step 2".into())
            }))
        );
    }

    #[test]
    fn progress_reads_numbers_as_fractions_or_percentages() {
        assert_eq!(progress(json!(0.25)), Some((Some(0.25), None)));
        assert_eq!(progress(json!(40)), Some((Some(0.4), None)));
        assert_eq!(progress(json!(1)), Some((Some(1.0), None)));
        assert_eq!(progress(json!(-1)), None);
        assert_eq!(progress(json!(250)), None);
    }

    #[test]
    fn progress_reads_the_usual_fields_of_an_object() {
        assert_eq!(
            progress(json!({"percent": 50, "message": "restoring"})),
            Some((Some(0.5), Some("restoring".into())))
        );
        assert_eq!(
            progress(json!({"progress": 0.75, "stage": "upscale"})),
            Some((Some(0.75), Some("upscale".into())))
        );
        assert_eq!(progress(json!({"pct": 12.5})), Some((Some(0.125), None)));
        assert_eq!(progress(json!({"other": 1})), None);
    }

    #[test]
    fn a_progress_message_is_one_short_clean_line() {
        let long = "x".repeat(5_000);
        let (_, message) = progress(json!(long)).unwrap();
        assert_eq!(message.unwrap().len(), MAX_PROGRESS_MESSAGE_CHARS);
        assert_eq!(
            progress(json!(" a\u{7}b\n ")),
            Some((None, Some("ab".into())))
        );
        assert_eq!(progress(json!("   ")), None);
        assert_eq!(progress(json!([1, 2])), None);
        assert_eq!(progress(json!(null)), None);
    }

    #[test]
    fn statuses_map_to_reports() {
        assert_eq!(
            Reported::from_status(Some("IN_QUEUE"), None, None),
            Reported::Queued
        );
        assert_eq!(
            Reported::from_status(Some("RUNNING"), None, None),
            Reported::Running(None)
        );
        assert_eq!(
            Reported::from_status(Some("TIMED_OUT"), None, None),
            Reported::TimedOut
        );
        assert_eq!(Reported::from_status(None, None, None), Reported::Unknown);
        assert_eq!(
            Reported::from_status(Some("WEIRD"), None, None),
            Reported::Unknown
        );
    }

    #[test]
    fn a_raised_exception_shows_its_message_without_the_traceback() {
        let error = json!(
            "{\"error_type\": \"<class 'ValueError'>\", \"error_message\": \"boom\", \"error_traceback\": \"Traceback (most recent call last): secret/path.py\"}"
        );
        let message = worker_error_message(Some(&error));
        assert_eq!(message, "boom");
    }

    #[test]
    fn a_plain_error_string_is_kept_and_bounded() {
        let long = "x".repeat(5_000);
        assert_eq!(
            worker_error_message(Some(&json!(long))).len(),
            MAX_MESSAGE_CHARS
        );
        assert_eq!(worker_error_message(Some(&json!("bad input"))), "bad input");
    }

    #[test]
    fn files_under_the_jobs_prefix_become_volume_keys() {
        let output = json!({"prompt_id": "p", "files": ["/runpod-volume/gw/outputs/job-1/a_00001_.png"], "file_count": 1});
        let keys = volume_output_keys(Some(&output), &layout(), "job-1").unwrap();
        assert_eq!(keys, vec!["gw/outputs/job-1/a_00001_.png"]);
    }

    #[test]
    fn a_file_of_another_job_fails_the_whole_output() {
        let output = json!({"files": ["/runpod-volume/gw/outputs/job-1/a.png", "/runpod-volume/gw/outputs/job-2/b.png"]});
        let err = volume_output_keys(Some(&output), &layout(), "job-1").unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidOutputPath);
    }

    #[test]
    fn traversal_is_rejected() {
        let output = json!({"files": ["/runpod-volume/gw/outputs/job-1/../../etc/passwd"]});
        let err = volume_output_keys(Some(&output), &layout(), "job-1").unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidOutputPath);
    }

    #[test]
    fn missing_or_odd_outputs_are_coded() {
        assert_eq!(
            volume_output_keys(None, &layout(), "j").unwrap_err().code,
            ErrorCode::EmptyOutput
        );
        assert_eq!(
            volume_output_keys(Some(&json!({"files": []})), &layout(), "j")
                .unwrap_err()
                .code,
            ErrorCode::EmptyOutput
        );
        assert_eq!(
            volume_output_keys(Some(&json!({"images": []})), &layout(), "j")
                .unwrap_err()
                .code,
            ErrorCode::InvalidOutput
        );
        assert_eq!(
            volume_output_keys(Some(&json!({"files": [1]})), &layout(), "j")
                .unwrap_err()
                .code,
            ErrorCode::InvalidOutput
        );
    }

    // ---- worker-comfyui outputs -------------------------------------------------------------

    fn policy() -> InlineImagePolicy {
        InlineImagePolicy {
            max_images: 3,
            max_image_bytes: 16,
            max_job_bytes: 40,
            allowed_hosts: UrlAllowList::parse(
                "bucket.s3.eu-west-1.amazonaws.com, *.r2.example.com, http://127.0.0.1:9000",
            )
            .unwrap(),
        }
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn images(items: Value) -> Value {
        json!({ "images": items })
    }

    #[test]
    fn base64_and_allowed_urls_are_accepted() {
        let output = images(json!([
            {"filename": "ComfyUI_00001_.png", "type": "base64", "data": b64(b"png bytes")},
            {"filename": "b.png", "type": "s3_url", "data": "https://bucket.s3.eu-west-1.amazonaws.com/11-25/job/x.png?X-Amz-Signature=abc"},
            {"filename": "c.png", "type": "s3_url", "data": "http://127.0.0.1:9000/b/c.png"},
        ]));
        let got = worker_comfyui_images(Some(&output), &policy()).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].file_name, "ComfyUI_00001_.png");
        let ImageSource::Inline(image) = &got[0].source else {
            panic!("{:?}", got[0].source)
        };
        assert_eq!(image.size, 9);
        assert_eq!(image.decode().unwrap(), &b"png bytes"[..]);
        assert!(matches!(got[1].source, ImageSource::Url(_)));
        assert_eq!(got[2].file_name, "c.png");
    }

    #[test]
    fn a_data_uri_prefix_and_missing_padding_are_tolerated() {
        let data = format!("data:image/png;base64,{}", b64(b"ab").trim_end_matches('='));
        let output = images(json!([{"filename": "a.png", "type": "base64", "data": data}]));
        let got = worker_comfyui_images(Some(&output), &policy()).unwrap();
        let ImageSource::Inline(image) = &got[0].source else {
            panic!("{:?}", got[0].source)
        };
        assert_eq!(image.decode().unwrap(), &b"ab"[..]);
    }

    #[test]
    fn bad_base64_fails_the_whole_output() {
        let output = images(json!([
            {"filename": "a.png", "type": "base64", "data": b64(b"ok")},
            {"filename": "b.png", "type": "base64", "data": "not base64!!"},
        ]));
        let err = worker_comfyui_images(Some(&output), &policy()).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidOutput);
        assert!(err.message.contains("image 2"), "{}", err.message);
        let empty = images(json!([{"filename": "a.png", "type": "base64", "data": ""}]));
        assert_eq!(
            worker_comfyui_images(Some(&empty), &policy())
                .unwrap_err()
                .code,
            ErrorCode::InvalidOutput
        );
    }

    #[test]
    fn oversized_base64_is_refused_before_decoding() {
        let output =
            images(json!([{"filename": "a.png", "type": "base64", "data": b64(&[7; 17])}]));
        let err = worker_comfyui_images(Some(&output), &policy()).unwrap_err();
        assert_eq!(err.code, ErrorCode::OutputTooLarge);
        assert!(err.message.contains("16-byte limit"), "{}", err.message);
        let exactly =
            images(json!([{"filename": "a.png", "type": "base64", "data": b64(&[7; 16])}]));
        assert!(worker_comfyui_images(Some(&exactly), &policy()).is_ok());
        let huge =
            images(json!([{"filename": "a.png", "type": "base64", "data": "A".repeat(1 << 20)}]));
        assert!(worker_comfyui_images(Some(&huge), &policy()).is_err());
    }

    #[test]
    fn images_within_their_own_cap_but_over_the_jobs_together_are_refused() {
        let within =
            |name: &str| json!({"filename": name, "type": "base64", "data": b64(&[7; 16])});
        let two = images(json!([within("a.png"), within("b.png")]));
        assert!(worker_comfyui_images(Some(&two), &policy()).is_ok());
        let three = images(json!([within("a.png"), within("b.png"), within("c.png")]));
        let err = worker_comfyui_images(Some(&three), &policy()).unwrap_err();
        assert_eq!(err.code, ErrorCode::OutputTooLarge);
    }

    #[test]
    fn traversal_in_file_names_is_reduced_to_a_safe_base_name() {
        let output = images(json!([
            {"filename": "../../etc/passwd", "type": "base64", "data": b64(b"1")},
            {"filename": "..\\..\\win.ini", "type": "base64", "data": b64(b"2")},
            {"filename": "..", "type": "base64", "data": b64(b"3")},
        ]));
        let got = worker_comfyui_images(Some(&output), &policy()).unwrap();
        let names: Vec<&str> = got.iter().map(|i| i.file_name.as_str()).collect();
        assert_eq!(names, vec!["passwd", "win.ini", "image-3"]);
    }

    #[test]
    fn odd_file_names_are_sanitised_and_made_unique() {
        assert_eq!(safe_file_name(".hidden.png", 1), "hidden.png");
        assert_eq!(safe_file_name("a b%2f<c>.png", 1), "a_b_2f_c_.png");
        assert_eq!(safe_file_name("", 4), "image-4");
        assert_eq!(safe_file_name("x/", 5), "image-5");
        assert_eq!(safe_file_name("é\u{0}.png", 1), "__.png");
        let long = format!("{}.png", "a".repeat(400));
        let cut = safe_file_name(&long, 1);
        assert_eq!(cut.len(), crate::domain::paths::MAX_FILE_NAME_BYTES);
        assert!(cut.ends_with(".png"));
        let output = images(json!([
            {"filename": "dir1/a.png", "type": "base64", "data": b64(b"1")},
            {"filename": "dir2/a.png", "type": "base64", "data": b64(b"2")},
            {"filename": "a-2.png", "type": "base64", "data": b64(b"3")},
        ]));
        let got = worker_comfyui_images(Some(&output), &policy()).unwrap();
        let names: Vec<&str> = got.iter().map(|i| i.file_name.as_str()).collect();
        assert_eq!(names, vec!["a.png", "a-2.png", "a-2-2.png"]);
    }

    #[test]
    fn too_many_images_fail() {
        let one = json!({"filename": "a.png", "type": "base64", "data": b64(b"1")});
        let output = images(json!([one, one, one, one]));
        let err = worker_comfyui_images(Some(&output), &policy()).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidOutput);
        assert!(err.message.contains("at most 3"), "{}", err.message);
    }

    #[test]
    fn urls_off_the_allow_list_fail() {
        for url in [
            "https://evil.example.com/x.png",
            "http://bucket.s3.eu-west-1.amazonaws.com/x.png",
            "https://bucket.s3.eu-west-1.amazonaws.com:8443/x.png",
            "https://user:pw@bucket.s3.eu-west-1.amazonaws.com/x.png",
            "https://r2.example.com/x.png",
            "https://xr2.example.com/x.png",
            "http://127.0.0.1:9001/x.png",
            "http://localhost:9000/x.png",
            "file:///etc/passwd",
            "not a url",
        ] {
            let output = images(json!([{"filename": "a.png", "type": "s3_url", "data": url}]));
            let err = worker_comfyui_images(Some(&output), &policy()).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidOutput, "{url}");
        }
        let sub = images(
            json!([{"filename": "a.png", "type": "s3_url", "data": "https://acct.R2.example.com/a.png"}]),
        );
        assert!(worker_comfyui_images(Some(&sub), &policy()).is_ok());
        let none = InlineImagePolicy {
            allowed_hosts: UrlAllowList::default(),
            ..policy()
        };
        let output = images(
            json!([{"filename": "a.png", "type": "s3_url", "data": "https://bucket.s3.eu-west-1.amazonaws.com/x.png"}]),
        );
        assert!(worker_comfyui_images(Some(&output), &none).is_err());
    }

    #[test]
    fn allow_list_entries_are_checked() {
        assert!(UrlAllowList::parse("").unwrap().is_empty());
        assert!(UrlAllowList::parse("a.com, ,b.com:8443,http://127.0.0.1:9000").is_ok());
        for bad in [
            "*.com",
            "ftp://a.com",
            "https://a.com/path",
            "a.*.com",
            "user@a.com",
            "*.",
        ] {
            assert!(UrlAllowList::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn odd_worker_comfyui_outputs_are_coded() {
        let p = policy();
        assert_eq!(
            worker_comfyui_images(None, &p).unwrap_err().code,
            ErrorCode::EmptyOutput
        );
        assert_eq!(
            worker_comfyui_images(
                Some(&json!({"status": "success_no_images", "images": []})),
                &p
            )
            .unwrap_err()
            .code,
            ErrorCode::EmptyOutput
        );
        for output in [
            json!({"files": ["/runpod-volume/gw/outputs/j/a.png"]}),
            json!({"images": "x"}),
            json!({"images": [{"filename": "a.png", "type": "base64"}]}),
            json!({"images": [{"filename": "a.png", "type": "png", "data": "AA=="}]}),
            json!({"images": [{"filename": 1, "type": "base64", "data": "AA=="}]}),
        ] {
            assert_eq!(
                worker_comfyui_images(Some(&output), &p).unwrap_err().code,
                ErrorCode::InvalidOutput,
                "{output}"
            );
        }
    }
}
