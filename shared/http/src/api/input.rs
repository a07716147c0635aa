//! Checks on a client's input image before anything is stored: it must be a real JPEG, PNG or
//! WebP, within the size limits. A bad job never reaches a GPU.
use std::io::Cursor;

use image::{ImageFormat, ImageReader};

use crate::error::ApiError;

/// Larger pictures are not photos to restore; they would only exhaust a worker.
pub const MAX_PIXELS: u64 = 100_000_000;

#[derive(Debug, Clone, PartialEq)]
pub struct ImageKind {
    pub content_type: &'static str,
    pub extension: &'static str,
}

fn kind(format: ImageFormat) -> Option<ImageKind> {
    match format {
        ImageFormat::Jpeg => Some(ImageKind {
            content_type: "image/jpeg",
            extension: "jpg",
        }),
        ImageFormat::Png => Some(ImageKind {
            content_type: "image/png",
            extension: "png",
        }),
        ImageFormat::WebP => Some(ImageKind {
            content_type: "image/webp",
            extension: "webp",
        }),
        _ => None,
    }
}

fn not_an_image() -> ApiError {
    ApiError::bad_request(
        "invalid_input_image",
        "the input is not a JPEG, PNG or WebP image",
    )
}

/// The format from the first bytes alone (for uploads, where only a prefix is read).
pub fn sniff(prefix: &[u8]) -> Result<ImageKind, ApiError> {
    image::guess_format(prefix)
        .ok()
        .and_then(kind)
        .ok_or_else(not_an_image)
}

/// The format, and that the header decodes to sane dimensions (for inline images, held whole).
pub fn check_image(bytes: &[u8]) -> Result<ImageKind, ApiError> {
    let kind = sniff(bytes)?;
    let (width, height) = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| not_an_image())?
        .into_dimensions()
        .map_err(|_| not_an_image())?;
    if width == 0 || height == 0 {
        return Err(not_an_image());
    }
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(ApiError::bad_request(
            "input_too_large",
            format!("the image is {width}x{height}; at most {MAX_PIXELS} pixels are accepted"),
        ));
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::new(width, height)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn a_png_is_accepted_with_its_type() {
        let kind = check_image(&png(4, 3)).unwrap();
        assert_eq!(kind.content_type, "image/png");
        assert_eq!(kind.extension, "png");
    }

    #[test]
    fn text_is_not_an_image() {
        assert_eq!(
            check_image(b"hello world").unwrap_err().code,
            "invalid_input_image"
        );
    }

    #[test]
    fn a_truncated_header_is_not_an_image() {
        let bytes = png(4, 3);
        assert!(check_image(&bytes[..12]).is_err());
    }

    #[test]
    fn a_gif_is_not_accepted() {
        assert!(sniff(b"GIF89a\x01\x00\x01\x00").is_err());
    }
}
