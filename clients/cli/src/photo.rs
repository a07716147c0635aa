//! The photo to submit: its format from its first bytes, and how it travels.

/// The API's `max_inline_bytes`: an image sent as `input.image_base64` may be at most this
/// large decoded. It is not published by the API, so it is written here once.
pub const MAX_INLINE_BYTES: u64 = 4 * 1024 * 1024;

/// How many leading bytes [`content_type_of`] needs.
pub const MAGIC_LEN: usize = 12;

/// The content type `POST /uploads` is asked for, from the file's magic bytes (a name's
/// extension says nothing about what is inside). The API takes JPEG, PNG and WebP only.
pub fn content_type_of(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if head.len() >= 12 && head.starts_with(b"RIFF") && &head[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

/// How a photo of `len` bytes reaches the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// In the `POST /jobs` body, base64.
    Inline,
    /// `POST /uploads`, the presigned POST, then `POST /jobs` with the `upload_id`.
    Upload,
}

pub fn route_for(len: u64) -> Route {
    if len <= MAX_INLINE_BYTES {
        Route::Inline
    } else {
        Route::Upload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_png_and_webp_are_told_by_their_magic_bytes() {
        assert_eq!(
            content_type_of(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10]),
            Some("image/jpeg")
        );
        assert_eq!(
            content_type_of(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"),
            Some("image/png")
        );
        assert_eq!(
            content_type_of(b"RIFF\x24\0\0\0WEBPVP8 "),
            Some("image/webp")
        );
    }

    #[test]
    fn other_files_have_no_content_type() {
        assert_eq!(content_type_of(b"GIF89a\x01\0\x01\0"), None);
        assert_eq!(content_type_of(b"RIFF\x24\0\0\0WAVEfmt "), None);
        assert_eq!(content_type_of(b""), None);
        assert_eq!(content_type_of(b"RIFF"), None);
    }

    #[test]
    fn photos_up_to_the_inline_limit_go_inline_and_larger_ones_through_uploads() {
        assert_eq!(route_for(1), Route::Inline);
        assert_eq!(route_for(MAX_INLINE_BYTES), Route::Inline);
        assert_eq!(route_for(MAX_INLINE_BYTES + 1), Route::Upload);
        assert_eq!(route_for(10 * 1024 * 1024), Route::Upload);
    }
}
