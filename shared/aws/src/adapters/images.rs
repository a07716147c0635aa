//! The input-image probe on the `image` crate: the format from the magic bytes, the dimensions
//! from the header alone (nothing is decoded beyond it).
use std::io::Cursor;

use image::{ImageFormat, ImageReader};

use gateway::ports::{ImageKind, ImageProbe, JPEG, PNG, WEBP};

pub struct ImageHeaders;

fn kind(format: ImageFormat) -> Option<ImageKind> {
    match format {
        ImageFormat::Jpeg => Some(JPEG),
        ImageFormat::Png => Some(PNG),
        ImageFormat::WebP => Some(WEBP),
        _ => None,
    }
}

impl ImageProbe for ImageHeaders {
    fn sniff(&self, prefix: &[u8]) -> Option<ImageKind> {
        image::guess_format(prefix).ok().and_then(kind)
    }

    fn dimensions(&self, bytes: &[u8]) -> Option<(ImageKind, u32, u32)> {
        let kind = self.sniff(bytes)?;
        let (width, height) = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .ok()?
            .into_dimensions()
            .ok()?;
        Some((kind, width, height))
    }
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
    fn a_png_is_read_with_its_type_and_size() {
        assert_eq!(ImageHeaders.dimensions(&png(4, 3)), Some((PNG, 4, 3)));
    }

    #[test]
    fn text_is_not_an_image() {
        assert_eq!(ImageHeaders.dimensions(b"hello world"), None);
    }

    #[test]
    fn a_truncated_header_is_not_an_image() {
        assert_eq!(ImageHeaders.dimensions(&png(4, 3)[..12]), None);
    }

    #[test]
    fn a_gif_is_not_an_accepted_kind() {
        assert_eq!(ImageHeaders.sniff(b"GIF89a\x01\x00\x01\x00"), None);
    }
}
