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

use super::job::{Job, JobState, Millis};

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
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
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

/// The names a client may list in `callback_events`.
pub const EVENT_NAMES: [&str; 3] = ["job.ended", "job.running", "job.progress"];

/// The longest a progress callback waits behind the previous one: at most one every ten
/// seconds per job, so a chatty worker cannot flood the client (nor the job's delivery log).
pub const PROGRESS_EVERY_MS: Millis = 10_000;

impl Job {
    /// Whether the job's client is to be told of `event`: its end always, when it gave a
    /// callback URL; the rest when it asked for them too.
    pub fn wants_callback(&self, event: CallbackEvent) -> bool {
        self.callback_url.is_some()
            && (event == CallbackEvent::Ended
                || self
                    .callback_events
                    .iter()
                    .any(|name| CallbackEvent::parse(name) == Some(event)))
    }

    /// Whether progress reported at `now` is to be told the client, at most one every
    /// [`PROGRESS_EVERY_MS`]; if so, notes that it was.
    pub fn take_progress_turn(&mut self, now: Millis) -> bool {
        let due = self.wants_callback(CallbackEvent::Progress)
            && self
                .progress_told_at
                .is_none_or(|at| now - at >= PROGRESS_EVERY_MS);
        if due {
            self.progress_told_at = Some(now);
        }
        due
    }
}

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

/// Most messages one job's delivery log keeps: its events are few (running, the end, progress
/// at most once every ten seconds); the oldest delivered progress messages make room first.
pub const MAX_MESSAGES: usize = 50;
/// Largest callback body: links and the job's summary, never bytes.
pub const MAX_BODY_BYTES: usize = 20 * 1024;

/// Where one message stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageState {
    /// Waiting for its next attempt (`next_attempt_at`).
    Pending,
    Delivered,
    /// The schedule is spent without a 2xx.
    Failed,
    /// The endpoint answered 410: nothing more goes to that URL for this job.
    Disabled,
}

/// One attempt at sending a message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attempt {
    pub at: Millis,
    /// The endpoint's status, if it answered.
    pub status: Option<u16>,
    /// Why there was no answer (a timeout, a refused address), if there was none.
    pub error: Option<String>,
    /// Asked for by the owner (`redeliver`), not by the schedule.
    pub manual: bool,
}

/// One callback message: one event of one job, to one URL, with every attempt at it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `msg_…`: the `webhook-id` of every attempt.
    pub id: String,
    pub event_type: String,
    pub url: String,
    pub body: String,
    pub created_at: Millis,
    pub state: MessageState,
    pub next_attempt_at: Option<Millis>,
    pub attempts: Vec<Attempt>,
    /// Due because its owner asked again: the next attempt is a manual one.
    #[serde(default)]
    pub manual: bool,
}

/// Why the log refused a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryRefusal {
    #[error("the callback body is {0} bytes; at most {MAX_BODY_BYTES} are sent")]
    TooLarge(usize),
    #[error("{0} answered 410 for this job; nothing more is sent there")]
    Disabled(String),
    #[error("no message {0} in this job's log")]
    UnknownMessage(String),
}

/// A job's callbacks: every message, its attempts, and the URLs that answered 410. One record
/// per job, so that the job's delivery log is one read.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeliveryLog {
    pub job_id: String,
    pub owner: String,
    /// The job's trace id, for the delivery's log lines (the delivery does not read the job
    /// before it knows the message is due). Logs from before it have none.
    #[serde(default)]
    pub trace_id: Option<String>,
    pub messages: Vec<Message>,
    pub disabled_urls: Vec<String>,
}

impl DeliveryLog {
    pub fn new(job_id: &str, owner: &str) -> Self {
        Self {
            job_id: job_id.to_string(),
            owner: owner.to_string(),
            ..Self::default()
        }
    }

    /// Adds a message due at once. A URL that answered 410 for this job gets nothing more; when
    /// the log is full, the oldest message no longer pending makes room.
    pub fn add(
        &mut self,
        id: &str,
        event_type: &str,
        url: &str,
        body: String,
        now: Millis,
    ) -> Result<(), DeliveryRefusal> {
        if body.len() > MAX_BODY_BYTES {
            return Err(DeliveryRefusal::TooLarge(body.len()));
        }
        if self.disabled_urls.iter().any(|u| u == url) {
            return Err(DeliveryRefusal::Disabled(url.to_string()));
        }
        if self.messages.iter().any(|m| m.id == id) {
            // The same event queued twice (a retried write): one message.
            return Ok(());
        }
        while self.messages.len() >= MAX_MESSAGES {
            match self
                .messages
                .iter()
                .position(|m| m.state != MessageState::Pending)
            {
                Some(oldest) => drop(self.messages.remove(oldest)),
                None => break,
            }
        }
        self.messages.push(Message {
            id: id.to_string(),
            event_type: event_type.to_string(),
            url: url.to_string(),
            body,
            created_at: now,
            state: MessageState::Pending,
            next_attempt_at: Some(now),
            attempts: Vec::new(),
            manual: false,
        });
        Ok(())
    }

    pub fn message(&self, id: &str) -> Option<&Message> {
        self.messages.iter().find(|m| m.id == id)
    }

    /// Records how an attempt at `id` went, and when the next comes (the spec's schedule,
    /// counted from this attempt; attempts its owner asked for do not count against it).
    /// Returns that time, if there is one.
    pub fn record(
        &mut self,
        id: &str,
        result: &AttemptResult,
        at: Millis,
        jitter: f64,
    ) -> Result<Option<Millis>, DeliveryRefusal> {
        let message = self
            .messages
            .iter_mut()
            .find(|m| m.id == id)
            .ok_or_else(|| DeliveryRefusal::UnknownMessage(id.to_string()))?;
        let manual = std::mem::take(&mut message.manual);
        let (status, error) = match result {
            AttemptResult::Delivered(status) => (Some(*status), None),
            AttemptResult::Gone => (Some(410), None),
            AttemptResult::Refused { status, .. } => (Some(*status), None),
            AttemptResult::NoAnswer(reason) => (None, Some(reason.chars().take(200).collect())),
        };
        message.attempts.push(Attempt {
            at,
            status,
            error,
            manual,
        });
        let scheduled = message.attempts.iter().filter(|a| !a.manual).count();
        let (state, next) = match result {
            AttemptResult::Delivered(_) => (MessageState::Delivered, None),
            AttemptResult::Gone => (MessageState::Disabled, None),
            AttemptResult::Refused {
                retry_after_secs, ..
            } => match next_attempt_at(scheduled.max(1), at, *retry_after_secs, jitter) {
                Some(next) => (MessageState::Pending, Some(next)),
                None => (MessageState::Failed, None),
            },
            AttemptResult::NoAnswer(_) => match next_attempt_at(scheduled.max(1), at, None, jitter)
            {
                Some(next) => (MessageState::Pending, Some(next)),
                None => (MessageState::Failed, None),
            },
        };
        message.state = state;
        message.next_attempt_at = next;
        if state == MessageState::Disabled {
            let url = message.url.clone();
            if !self.disabled_urls.contains(&url) {
                self.disabled_urls.push(url.clone());
            }
            // Nothing more goes there: other messages to that URL stop too.
            for other in self.messages.iter_mut().filter(|m| m.url == url) {
                if other.state == MessageState::Pending {
                    other.state = MessageState::Disabled;
                    other.next_attempt_at = None;
                }
            }
        }
        Ok(next)
    }

    /// The owner asks for `id` again: due at once, whatever its state, unless its URL answered
    /// 410 (a redelivery is no way round an endpoint that said it is gone).
    pub fn redeliver(&mut self, id: &str, now: Millis) -> Result<(), DeliveryRefusal> {
        let disabled = self.disabled_urls.clone();
        let message = self
            .messages
            .iter_mut()
            .find(|m| m.id == id)
            .ok_or_else(|| DeliveryRefusal::UnknownMessage(id.to_string()))?;
        if disabled.contains(&message.url) {
            return Err(DeliveryRefusal::Disabled(message.url.clone()));
        }
        message.state = MessageState::Pending;
        message.next_attempt_at = Some(now);
        message.manual = true;
        Ok(())
    }

    /// The earliest attempt due, if any message is pending.
    pub fn next_due(&self) -> Option<Millis> {
        self.messages.iter().filter_map(|m| m.next_attempt_at).min()
    }
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

    fn log_with_one() -> DeliveryLog {
        let mut log = DeliveryLog::new("job-1", "alice");
        log.add(
            "msg_1",
            "job.succeeded",
            "https://client.example/hook",
            "{}".into(),
            1_000,
        )
        .unwrap();
        log
    }

    fn refused(status: u16) -> AttemptResult {
        AttemptResult::Refused {
            status,
            retry_after_secs: None,
        }
    }

    #[test]
    fn a_new_message_is_due_at_once() {
        let log = log_with_one();
        assert_eq!(log.next_due(), Some(1_000));
        assert_eq!(log.message("msg_1").unwrap().state, MessageState::Pending);
    }

    #[test]
    fn a_2xx_delivers_and_nothing_more_is_due() {
        let mut log = log_with_one();
        let next = log
            .record("msg_1", &AttemptResult::Delivered(204), 1_500, 0.0)
            .unwrap();
        assert_eq!(next, None);
        assert_eq!(log.message("msg_1").unwrap().state, MessageState::Delivered);
        assert_eq!(log.next_due(), None);
    }

    #[test]
    fn failures_follow_the_schedule_until_it_is_spent() {
        let mut log = log_with_one();
        let mut at = 1_000;
        for attempt in 0..10 {
            let next = log.record("msg_1", &refused(500), at, 0.0).unwrap();
            if attempt < 9 {
                at = next.expect("another attempt");
            } else {
                assert_eq!(next, None);
            }
        }
        let message = log.message("msg_1").unwrap();
        assert_eq!(message.state, MessageState::Failed);
        assert_eq!(message.attempts.len(), 10);
    }

    #[test]
    fn a_410_disables_the_url_for_the_job_and_stops_its_other_messages() {
        let mut log = log_with_one();
        log.add(
            "msg_2",
            "job.progress",
            "https://client.example/hook",
            "{}".into(),
            1_100,
        )
        .unwrap();
        log.record("msg_1", &AttemptResult::Gone, 1_200, 0.0)
            .unwrap();
        assert_eq!(log.message("msg_2").unwrap().state, MessageState::Disabled);
        assert_eq!(log.next_due(), None);
        assert_eq!(
            log.add(
                "msg_3",
                "job.running",
                "https://client.example/hook",
                "{}".into(),
                1_300
            ),
            Err(DeliveryRefusal::Disabled(
                "https://client.example/hook".into()
            ))
        );
        assert!(log.redeliver("msg_1", 2_000).is_err());
    }

    #[test]
    fn a_redelivery_is_due_at_once_and_does_not_spend_the_schedule() {
        let mut log = log_with_one();
        for at in [1_000, 10_000] {
            log.record("msg_1", &refused(500), at, 0.0).unwrap();
        }
        log.redeliver("msg_1", 20_000).unwrap();
        assert_eq!(log.next_due(), Some(20_000));
        let next = log.record("msg_1", &refused(502), 20_000, 0.0).unwrap();
        // Two scheduled attempts so far: the wait after the second (5 min) comes next.
        assert_eq!(next, Some(20_000 + 5 * 60 * 1000));
    }

    #[test]
    fn no_answer_is_retried_like_a_refusal() {
        let mut log = log_with_one();
        let next = log
            .record(
                "msg_1",
                &AttemptResult::NoAnswer("timed out".into()),
                1_000,
                0.0,
            )
            .unwrap();
        assert_eq!(next, Some(6_000));
        assert_eq!(log.message("msg_1").unwrap().attempts[0].status, None);
    }

    #[test]
    fn a_body_over_20_kb_is_never_queued() {
        let mut log = DeliveryLog::new("job-1", "alice");
        let big = "x".repeat(MAX_BODY_BYTES + 1);
        assert!(matches!(
            log.add("msg_1", "job.succeeded", "https://c.example/", big, 0),
            Err(DeliveryRefusal::TooLarge(_))
        ));
    }

    #[test]
    fn a_full_log_makes_room_from_its_oldest_settled_message() {
        let mut log = DeliveryLog::new("job-1", "alice");
        for n in 0..MAX_MESSAGES {
            let id = format!("msg_{n}");
            log.add(
                &id,
                "job.progress",
                "https://c.example/",
                "{}".into(),
                n as i64,
            )
            .unwrap();
            log.record(&id, &AttemptResult::Delivered(200), n as i64, 0.0)
                .unwrap();
        }
        log.add(
            "msg_last",
            "job.succeeded",
            "https://c.example/",
            "{}".into(),
            99,
        )
        .unwrap();
        assert_eq!(log.messages.len(), MAX_MESSAGES);
        assert!(log.message("msg_0").is_none());
        assert!(log.message("msg_last").is_some());
    }

    #[test]
    fn the_same_message_added_twice_is_one_message() {
        let mut log = log_with_one();
        log.add(
            "msg_1",
            "job.succeeded",
            "https://client.example/hook",
            "{}".into(),
            5_000,
        )
        .unwrap();
        assert_eq!(log.messages.len(), 1);
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
