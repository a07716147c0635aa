//! `/view` and `/upload/image`: ComfyUI's folder types and its path checks (`server.py`).

use std::path::{Component, Path, PathBuf};

use axum::body::Body;
use axum::extract::multipart::MultipartError;
use axum::extract::{Multipart, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::api::Shared;
use crate::App;

impl App {
    /// ComfyUI's `folder_paths.get_directory_by_type`.
    fn dir_of_type(&self, kind: &str) -> Option<&Path> {
        match kind {
            "output" => Some(&self.config.output_dir),
            "input" => Some(&self.config.input_dir),
            "temp" => Some(&self.config.temp_dir),
            _ => None,
        }
    }
}

/// `os.path.abspath` without touching the file system: `..` pops, an absolute part restarts.
fn lexical_normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// `name [output]` style names carry their folder type (`folder_paths.annotated_filepath`).
fn annotated(name: &str) -> (&str, Option<&str>) {
    for kind in ["output", "input", "temp"] {
        if let Some(stripped) = name.strip_suffix(&format!(" [{kind}]")) {
            return (stripped, Some(kind));
        }
    }
    (name, None)
}

fn content_type(name: &str) -> &'static str {
    let ext = Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        _ => "application/octet-stream",
    }
}

pub(crate) async fn view(
    State(app): Shared,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    if app.faults().view_not_found {
        return StatusCode::NOT_FOUND.into_response();
    }
    let Some(requested) = query.get("filename") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (filename, annotated_type) = annotated(requested);
    if filename.is_empty() || filename.starts_with('/') || filename.contains("..") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let kind = annotated_type.unwrap_or_else(|| query.get("type").map_or("output", String::as_str));
    let Some(base) = app.dir_of_type(kind) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut dir = base.to_path_buf();
    if let Some(subfolder) = query.get("subfolder") {
        let full = lexical_normalize(&base.join(subfolder));
        if !full.starts_with(base) {
            return StatusCode::FORBIDDEN.into_response();
        }
        dir = full;
    }
    let Some(name) = Path::new(filename).file_name() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let path = dir.join(name);
    let Ok(file) = tokio::fs::File::open(&path).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match file.metadata().await {
        Ok(meta) if meta.is_file() => {}
        _ => return StatusCode::NOT_FOUND.into_response(),
    }
    let name = name.to_string_lossy().into_owned();
    let stream = futures::stream::try_unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt as _;
        let mut chunk = vec![0; 64 * 1024];
        let read = file.read(&mut chunk).await?;
        if read == 0 {
            return Ok::<_, std::io::Error>(None);
        }
        chunk.truncate(read);
        Ok(Some((chunk, file)))
    });
    (
        [
            (header::CONTENT_TYPE, content_type(&name).to_owned()),
            (header::CONTENT_DISPOSITION, format!("filename=\"{name}\"")),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

fn multipart_failure(err: &MultipartError) -> Response {
    (err.status(), err.body_text()).into_response()
}

pub(crate) async fn upload_image(
    State(app): Shared,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    let mut multipart = match multipart {
        Ok(m) => m,
        Err(rejection) => return rejection.into_response(),
    };
    let mut image: Option<(String, Vec<u8>)> = None;
    let mut overwrite = None;
    let mut subfolder = String::new();
    let mut kind = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(err) => return multipart_failure(&err),
        };
        let name = field.name().unwrap_or("").to_owned();
        let file_name = field.file_name().map(str::to_owned);
        let bytes = match field.bytes().await {
            Ok(bytes) => bytes,
            Err(err) => return multipart_failure(&err),
        };
        let text = || String::from_utf8_lossy(&bytes).into_owned();
        match name.as_str() {
            "image" => image = file_name.map(|f| (f, bytes.to_vec())),
            "overwrite" => overwrite = Some(text()),
            "subfolder" => subfolder = text(),
            "type" => kind = Some(text()),
            _ => {}
        }
    }
    let Some((mut filename, bytes)) = image.filter(|(name, _)| !name.is_empty()) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let kind = kind.unwrap_or_else(|| "input".to_owned());
    let Some(base) = app.dir_of_type(&kind) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let folder = lexical_normalize(&base.join(&subfolder));
    let mut path = lexical_normalize(&folder.join(&filename));
    if !folder.starts_with(base) || !path.starts_with(base) || path == base {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let overwrite = matches!(overwrite.as_deref(), Some("true" | "1"));
    let mut duplicate = false;
    if !overwrite {
        let stem = Path::new(&filename)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ext = Path::new(&filename)
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let prefix = filename
            .rfind('/')
            .map(|i| filename[..=i].to_owned())
            .unwrap_or_default();
        let mut n = 1;
        while tokio::fs::try_exists(&path).await.unwrap_or(false) {
            // Same bytes under the same name: ComfyUI keeps the file and answers its name.
            if tokio::fs::read(&path).await.is_ok_and(|old| old == bytes) {
                duplicate = true;
                break;
            }
            filename = format!("{prefix}{stem} ({n}){ext}");
            path = parent.join(format!("{stem} ({n}){ext}"));
            n += 1;
        }
    }
    if !duplicate {
        if let Some(parent) = path.parent() {
            if let Err(err) = tokio::fs::create_dir_all(parent).await {
                return (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response();
            }
        }
        if let Err(err) = tokio::fs::write(&path, &bytes).await {
            return (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response();
        }
    }
    Json(json!({"name": filename, "subfolder": subfolder, "type": kind})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalising_resolves_parent_parts_and_absolute_joins() {
        assert_eq!(
            lexical_normalize(Path::new("/out/a/../b")),
            PathBuf::from("/out/b")
        );
        // A subfolder like `/etc` replaces the base, as os.path.join does.
        let absolute = PathBuf::from("/etc");
        assert_eq!(
            lexical_normalize(&Path::new("/out").join(absolute)),
            PathBuf::from("/etc")
        );
        assert!(!lexical_normalize(Path::new("/out/../x")).starts_with("/out"));
    }

    #[test]
    fn annotated_names_carry_their_folder_type() {
        assert_eq!(annotated("a.png [input]"), ("a.png", Some("input")));
        assert_eq!(annotated("a.png"), ("a.png", None));
    }
}
