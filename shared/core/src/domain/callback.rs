//! Client callbacks, the Standard Webhooks way: what is signed and how, which events a client
//! may ask for, and when a failed delivery is tried again.
//!
//! The spec (standard-webhooks/standard-webhooks, `spec/standard-webhooks.md`):
//! - headers `webhook-id` (the message's id, the same on every retry: the receiver's
//!   idempotency key), `webhook-timestamp` (Unix seconds of this attempt) and
//!   `webhook-signature` (space-separated `v1,<base64>` entries, several during a key
//!   rotation);
//! - `v1` is HMAC-SHA256 over `{id}.{timestamp}.{body}` with the secret, which is shown as
//!   `whsec_` followed by the base64 of its bytes;
//! - 2xx is delivered; anything else, redirects included, is a failure; 410 disables the
//!   endpoint; `Retry-After` is honoured; retries back off over about three days.
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::job::{JobState, Millis};

/// How a secret is written for its owner (and read back).
pub const SECRET_PREFIX: &str = "whsec_";
/// Random bytes in a new secret (the spec allows 24 to 64).
pub const SECRET_BYTES: usize = 32;

/// An owner's signing secret: its bytes, never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(Vec<u8>);

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

/// Why a secret was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a signing secret is `whsec_` followed by the base64 of 24 to 64 bytes")]
pub struct InvalidSecret;

impl SigningSecret {
    /// A new secret of [`SECRET_BYTES`] random bytes.
    pub fn generate(rng: &mut impl rand::Rng) -> Self {
        let mut bytes = vec![0u8; SECRET_BYTES];
        rng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// Reads `whsec_<base64>`.
    pub fn parse(text: &str) -> Result<Self, InvalidSecret> {
        let encoded = text.strip_prefix(SECRET_PREFIX).ok_or(InvalidSecret)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| InvalidSecret)?;
        if !(24..=64).contains(&bytes.len()) {
            return Err(InvalidSecret);
        }
        Ok(Self(bytes))
    }

    /// `whsec_<base64>`: what the owner is shown, and what their verifier takes.
    pub fn expose(&self) -> String {
        format!(
            "{SECRET_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(&self.0)
        )
    }

    /// The `v1` signature of one attempt: HMAC-SHA256 over `{id}.{timestamp}.{body}`.
    pub fn sign(&self, message_id: &str, timestamp_secs: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(message_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp_secs.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    }
}

/// The three headers of one attempt, signed at send time with that attempt's timestamp, by
/// every current secret (the new one first during a rotation, so receivers that know only
/// one of them still verify).
pub fn signature_headers(
    secrets: &[SigningSecret],
    message_id: &str,
    at: Millis,
    body: &[u8],
) -> [(&'static str, String); 3] {
    let timestamp = at.div_euclid(1000);
    let signatures: Vec<String> = secrets
        .iter()
        .map(|secret| secret.sign(message_id, timestamp, body))
        .collect();
    [
        ("webhook-id", message_id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signatures.join(" ")),
    ]
}

/// What a callback may be sent for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CallbackEvent {
    /// The job ended: succeeded, failed, cancelled or timed out. Always sent.
    Ended,
    /// A worker started on it. On request.
    Running,
    /// Its worker reported progress. On request, and rate-limited.
    Progress,
}

impl CallbackEvent {
    /// The `type` of the payload for this event about a job now in `state`.
    pub fn event_type(self, state: JobState) -> &'static str {
        match (self, state) {
            (Self::Running, _) => "job.running",
            (Self::Progress, _) => "job.progress",
            (Self::Ended, JobState::Succeeded) => "job.succeeded",
            (Self::Ended, JobState::Failed) => "job.failed",
            (Self::Ended, JobState::Cancelled) => "job.cancelled",
            (Self::Ended, JobState::TimedOut) => "job.timed_out",
            (Self::Ended, _) => "job.ended",
        }
    }

    /// Reads the names a client may list in `callback_events`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "job.ended" => Some(Self::Ended),
            "job.running" => Some(Self::Running),
            "job.progress" => Some(Self::Progress),
            _ => None,
        }
    }
}

/// The longest a progress callback waits behind the previous one: at most one a minute per
/// job, so a chatty worker cannot flood the client.
pub const PROGRESS_EVERY_MS: Millis = 60_000;

/// How long after the first attempt each retry comes, as the spec's example schedule: 5 s,
/// 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h and 24 h, about three days in all.
pub const RETRY_AFTER_SECS: [i64; 9] = [
    5,
    5 * 60,
    30 * 60,
    2 * 3_600,
    5 * 3_600,
    10 * 3_600,
    14 * 3_600,
    20 * 3_600,
    24 * 3_600,
];

/// How an attempt went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptResult {
    /// Any 2xx.
    Delivered(u16),
    /// 410: the endpoint is gone; no more attempts at this URL for this job.
    Gone,
    /// Any other answer, with the `Retry-After` it carried (seconds), if any.
    Refused {
        status: u16,
        retry_after_secs: Option<u64>,
    },
    /// No answer: a timeout, a refused connection, a URL the egress rules refuse now.
    NoAnswer(String),
}

/// When the attempt after attempt number `attempts` (1 for the first) should be made, or
/// `None` once the schedule is spent. `jitter` (0..1) spreads retries by up to 10 %, so that
/// the deliveries of a burst of jobs do not all come back at once; a longer `Retry-After`
/// than the schedule's wait is honoured, up to a day.
pub fn next_attempt_at(
    attempts: usize,
    last_at: Millis,
    retry_after_secs: Option<u64>,
    jitter: f64,
) -> Option<Millis> {
    let wait_secs = *RETRY_AFTER_SECS.get(attempts.checked_sub(1)?)?;
    let spread = (wait_secs as f64 * 0.1 * jitter.clamp(0.0, 1.0)) as i64;
    let asked = retry_after_secs.map_or(0, |s| s.min(86_400) as i64);
    Some(last_at + (wait_secs + spread).max(asked) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn secret() -> SigningSecret {
        SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()
    }

    #[test]
    fn a_secret_reads_back_as_written() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let secret = SigningSecret::generate(&mut rng);
        assert_eq!(SigningSecret::parse(&secret.expose()).unwrap(), secret);
        assert!(secret.expose().starts_with("whsec_"));
    }

    #[test]
    fn a_secret_is_never_printed() {
        assert!(!format!("{:?}", secret()).contains("MfKQ"));
    }

    #[test]
    fn only_a_whsec_secret_of_24_to_64_bytes_is_read() {
        for bad in [
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_!!",
            "whsec_AAAA",
            "",
        ] {
            assert_eq!(SigningSecret::parse(bad), Err(InvalidSecret), "{bad}");
        }
    }

    #[test]
    fn the_signature_is_the_specs_example() {
        // The spec's worked example: this id, timestamp, body and secret give this signature.
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secret().sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn each_attempt_is_signed_with_its_own_timestamp_by_every_current_secret() {
        let other = SigningSecret::parse("whsec_c2VjcmV0LXRoYXQtaXMtbG9uZy1lbm91Z2gtMDA=").unwrap();
        let headers = signature_headers(
            &[secret(), other.clone()],
            "msg_1",
            1_700_000_000_999,
            b"{}",
        );
        assert_eq!(headers[0], ("webhook-id", "msg_1".into()));
        assert_eq!(headers[1], ("webhook-timestamp", "1700000000".into()));
        let signatures: Vec<&str> = headers[2].1.split(' ').collect();
        assert_eq!(signatures.len(), 2);
        assert_eq!(signatures[1], other.sign("msg_1", 1_700_000_000, b"{}"));
        let later = signature_headers(&[secret()], "msg_1", 1_700_000_300_000, b"{}");
        assert_ne!(
            later[2].1, signatures[0],
            "a retry carries a fresh timestamp and signature"
        );
    }

    #[test]
    fn retries_follow_the_specs_schedule_over_about_three_days() {
        let mut at = 0;
        let mut total = 0;
        for attempts in 1..=9 {
            let next = next_attempt_at(attempts, at, None, 0.0).unwrap();
            total += next - at;
            at = next;
        }
        assert_eq!(
            total,
            (5 + 300 + 1_800 + 7_200 + 18_000 + 36_000 + 50_400 + 72_000 + 86_400) * 1000
        );
        assert!(total > 3 * 86_400_000 && total < 4 * 86_400_000);
        assert_eq!(next_attempt_at(10, at, None, 0.0), None, "then it gives up");
        assert_eq!(next_attempt_at(0, 0, None, 0.0), None);
    }

    #[test]
    fn jitter_spreads_a_retry_by_at_most_a_tenth() {
        let plain = next_attempt_at(3, 0, None, 0.0).unwrap();
        let spread = next_attempt_at(3, 0, None, 1.0).unwrap();
        assert_eq!(plain, 1_800_000);
        assert_eq!(spread, 1_980_000);
    }

    #[test]
    fn a_longer_retry_after_is_honoured_up_to_a_day() {
        assert_eq!(next_attempt_at(1, 0, Some(60), 0.0), Some(60_000));
        assert_eq!(
            next_attempt_at(1, 0, Some(1), 0.0),
            Some(5_000),
            "never sooner"
        );
        assert_eq!(
            next_attempt_at(1, 0, Some(10_000_000), 0.0),
            Some(86_400_000)
        );
    }

    #[test]
    fn event_names_round_trip_and_ended_names_the_state() {
        assert_eq!(
            CallbackEvent::parse("job.progress"),
            Some(CallbackEvent::Progress)
        );
        assert_eq!(CallbackEvent::parse("job.finished"), None);
        assert_eq!(
            CallbackEvent::Ended.event_type(JobState::TimedOut),
            "job.timed_out"
        );
    }
}
