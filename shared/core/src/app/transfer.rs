//! Copying objects between stores (uploads → volume, volume → results) as a stream: the
//! reading side hands chunks to the writing side, which holds at most one upload part.
use crate::ports::{ObjectError, ObjectMeta, ObjectStore};

pub async fn copy(
    from: &dyn ObjectStore,
    from_key: &str,
    to: &dyn ObjectStore,
    to_key: &str,
    content_type: Option<&str>,
) -> Result<ObjectMeta, ObjectError> {
    let (mut meta, body) = from.open(from_key).await?;
    if let Some(content_type) = content_type {
        meta.content_type = Some(content_type.to_string());
    }
    to.put_stream(to_key, &meta, body).await?;
    Ok(meta)
}

/// Content type from a file name's extension; the worker's own claim is not trusted.
pub fn content_type_for(file_name: &str) -> &'static str {
    let ext = file_name
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_follow_the_extension_not_the_worker() {
        assert_eq!(content_type_for("a.PNG"), "image/png");
        assert_eq!(content_type_for("a.jpeg"), "image/jpeg");
        assert_eq!(content_type_for("noext"), "application/octet-stream");
        assert_eq!(content_type_for("evil.html"), "application/octet-stream");
    }
}
