//! Per-job webhook tokens.
//!
//! RunPod's webhooks are unsigned, so the gateway puts `HMAC-SHA256(secret, job id)` in the
//! webhook URL it hands RunPod and checks it when the call comes back. Only the gateway knows the
//! secret, so only a URL it minted for that job passes.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A token is the hex of one SHA-256 output.
const TOKEN_LEN: usize = 64;

/// Mints and checks webhook tokens. Holds the current secret and, during a rotation, the
/// previous one, so webhooks for jobs dispatched before the rotation still verify.
#[derive(Clone)]
pub struct WebhookSigner {
    // Keyed MAC states rather than raw secrets: each use clones a ready state.
    current: HmacSha256,
    previous: Option<HmacSha256>,
}

impl WebhookSigner {
    /// The secret should be long and random (32 bytes or more); refusing weak secrets is the
    /// configuration's job, since this type cannot fail.
    pub fn new(current: impl AsRef<[u8]>, previous: Option<Vec<u8>>) -> Self {
        Self {
            current: keyed(current.as_ref()),
            previous: previous.as_deref().map(keyed),
        }
    }

    /// Lowercase hex of `HMAC-SHA256(current secret, job_id)`: URL-safe as it is.
    pub fn token(&self, job_id: &str) -> String {
        let mut mac = self.current.clone();
        mac.update(job_id.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// True when `token` is the token of `job_id` under the current or the previous secret.
    /// The comparison is constant-time; a malformed token is simply false.
    pub fn verify(&self, job_id: &str, token: &str) -> bool {
        // The length is public (every token has it), so checking it first leaks nothing and keeps
        // a huge token from being decoded.
        if token.len() != TOKEN_LEN {
            return false;
        }
        let Ok(tag) = hex::decode(token) else {
            return false;
        };
        let matches = |key: &HmacSha256| {
            let mut mac = key.clone();
            mac.update(job_id.as_bytes());
            mac.verify_slice(&tag).is_ok()
        };
        // Both are always computed, so timing does not tell which secret a token was made with.
        let current = matches(&self.current);
        let previous = self.previous.as_ref().is_some_and(matches);
        current | previous
    }
}

fn keyed(secret: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length (long ones are hashed), so this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC accepts keys of any length")
}

impl fmt::Debug for WebhookSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSigner")
            .field("current", &"<redacted>")
            .field("previous", &self.previous.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OTHER: &[u8] = b"fedcba9876543210fedcba9876543210";
    const JOB: &str = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";

    fn signer() -> WebhookSigner {
        WebhookSigner::new(SECRET, None)
    }

    #[test]
    fn token_round_trips() {
        let s = signer();
        assert!(s.verify(JOB, &s.token(JOB)));
    }

    #[test]
    fn token_is_lowercase_hex_of_hmac_sha256() {
        // RFC 4231 test case 2.
        let s = WebhookSigner::new(b"Jefe", None);
        assert_eq!(
            s.token("what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn token_is_deterministic_per_job() {
        assert_eq!(signer().token(JOB), signer().token(JOB));
        assert_ne!(signer().token(JOB), signer().token("another-job"));
    }

    #[test]
    fn verify_rejects_wrong_job_id() {
        let s = signer();
        assert!(!s.verify("another-job", &s.token(JOB)));
    }

    #[test]
    fn verify_rejects_token_from_another_secret() {
        let forged = WebhookSigner::new(OTHER, None).token(JOB);
        assert!(!signer().verify(JOB, &forged));
    }

    #[test]
    fn verify_accepts_previous_secret_after_rotation() {
        let old_token = signer().token(JOB);
        let rotated = WebhookSigner::new(OTHER, Some(SECRET.to_vec()));
        assert!(rotated.verify(JOB, &old_token));
        assert!(rotated.verify(JOB, &rotated.token(JOB)));
        assert_ne!(
            rotated.token(JOB),
            old_token,
            "new tokens use the current secret"
        );
    }

    #[test]
    fn verify_rejects_secret_dropped_after_rotation() {
        let old_token = signer().token(JOB);
        assert!(!WebhookSigner::new(OTHER, None).verify(JOB, &old_token));
    }

    #[test]
    fn verify_rejects_garbage_tokens() {
        let s = signer();
        let good = s.token(JOB);
        let long = "a".repeat(1 << 20);
        let truncated = &good[..62];
        let mut flipped = good.clone().into_bytes();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        let not_hex = "z".repeat(64);
        let padded = format!("{good}==");
        let multibyte = "é".repeat(32); // 64 bytes, not hex
        for bad in [
            "", "x", truncated, &flipped, &not_hex, &padded, &long, &multibyte,
        ] {
            assert!(!s.verify(JOB, bad), "accepted a {}-byte token", bad.len());
        }
    }

    #[test]
    fn debug_never_prints_secrets() {
        let s = WebhookSigner::new(b"super-secret-value", Some(b"old-secret-value".to_vec()));
        let shown = format!("{s:?}");
        assert!(!shown.contains("super-secret"), "{shown}");
        assert!(!shown.contains("old-secret"), "{shown}");
        assert!(
            !shown.contains(&hex::encode("super-secret-value")),
            "{shown}"
        );
        assert!(shown.contains("redacted"));
    }
}
