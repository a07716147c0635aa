//! What every input photo must be, however it came (inline, uploaded, or fetched from a URL):
//! one of the accepted formats by its own bytes, not the client's word, with a sane size.
use crate::domain::egress::{Destination, EgressPolicy, EgressRefusal};
use crate::ports::{ImageKind, ImageProbe, Resolver, JPEG, PNG, WEBP};

/// The formats a job's input may be.
pub const INPUT_KINDS: [ImageKind; 3] = [JPEG, PNG, WEBP];
/// Most pixels an input may have (its header's width × height).
pub const MAX_PIXELS: u64 = 100_000_000;
/// Longest input URL accepted.
pub const MAX_URL_BYTES: usize = 2_048;

/// Why an input is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputRefusal {
    #[error("the input is not a JPEG, PNG or WebP image")]
    NotAnImage,
    #[error("the image is {width}x{height}; at most {MAX_PIXELS} pixels are accepted")]
    TooManyPixels { width: u32, height: u32 },
}

/// The input's format, from its header, if it is an accepted image of sane dimensions.
pub fn check_image(images: &dyn ImageProbe, bytes: &[u8]) -> Result<ImageKind, InputRefusal> {
    let (kind, width, height) = images
        .dimensions(bytes)
        .filter(|(kind, width, height)| INPUT_KINDS.contains(kind) && *width > 0 && *height > 0)
        .ok_or(InputRefusal::NotAnImage)?;
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(InputRefusal::TooManyPixels { width, height });
    }
    Ok(kind)
}

/// Where `url` leads, if the egress rules let the gateway go there: the URL's own rules, then
/// every address its host resolves to.
pub async fn destination(
    policy: EgressPolicy,
    resolver: &dyn Resolver,
    url: &url::Url,
) -> Result<Destination, EgressRefusal> {
    let (host, port) = policy.check_url(url)?;
    let addresses = resolver
        .resolve(&host, port)
        .await
        .map_err(|_| EgressRefusal::Unresolved { host: host.clone() })?;
    policy.pick(url, &host, &addresses)
}

/// `text` as a URL the gateway may go to (an input to fetch, a callback to send), with the
/// address it leads to now; why not, in words for the client, otherwise. A URL kept for later
/// is checked again, and pinned, each time the gateway connects.
pub async fn checked_url(
    policy: EgressPolicy,
    resolver: &dyn Resolver,
    text: &str,
) -> Result<(url::Url, Destination), String> {
    if text.len() > MAX_URL_BYTES {
        return Err(format!("the URL is longer than {MAX_URL_BYTES} bytes"));
    }
    let url = url::Url::parse(text).map_err(|_| "the URL is not valid".to_string())?;
    let destination = destination(policy, resolver, &url)
        .await
        .map_err(|refusal| refusal.to_string())?;
    Ok((url, destination))
}
