//! Seeded fault injection: the proxy misbehaves as AWS does, and answers each refusal in the
//! wire format of the service that was called, so the AWS SDK's own error parsing and retry
//! classification see a real DynamoDB, SQS or S3 error rather than a generic HTTP failure.
//!
//! # The text form of a [`FaultPlan`]
//!
//! `seed=7,throttle=0.02,5xx=0.01,slow=0.02,slow_by=300ms,drop=0.01,lost=0.01`
//!
//! Comma-separated `key=value` pairs, in any order, each at most once:
//! - `seed` (required): the RNG seed; the same seed and the same sequence of requests give the
//!   same sequence of faults, so a failing chaos run can be replayed;
//! - `throttle`, `5xx` (or `error5xx`), `slow`, `drop`, `lost` (or `lost_response`): the
//!   probability of that fault per request, each in 0..=1, together at most 1 (default 0);
//! - `slow_by` (required when `slow` > 0): how much longer a slow answer takes, `300ms`, `2s`,
//!   `1.5s`, or bare milliseconds.
//!
//! # Which requests are eligible
//!
//! Every request is, except that an SQS `ReceiveMessage` is never given `lost`: on the local
//! stack the receives come from the runner's stand-in for Lambda's event source mapping, AWS's
//! own poller rather than the gateway's code. A receive whose answer is lost hides its batch for
//! the queue's whole visibility timeout (minutes, see template.yaml) and counts one receive
//! towards the dead-letter queue's `maxReceiveCount`: real AWS behaviour, but one the gateway can
//! neither see nor handle, and it would turn a chaos run into a wait or into jobs lost to the
//! DLQ. The draw still happens (the request goes through unharmed), so the sequence of decisions
//! stays that of the requests. A receive may still be throttled, refused, slowed or dropped:
//! none of those takes messages off the queue.
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use axum::body::Body;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::ProxyError;

/// The example in the error message for a plan that does not parse.
pub(crate) const EXAMPLE: &str =
    "seed=7,throttle=0.02,5xx=0.01,slow=0.02,slow_by=300ms,drop=0.01,lost=0.01";

/// What can go wrong with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// Not forwarded; answered with the service's throttling error.
    Throttle,
    /// Not forwarded; answered with the service's 500 or 503.
    Error5xx,
    /// Forwarded; the answer is held back by [`FaultPlan::slow_by`].
    Slow,
    /// Not forwarded; the connection is closed without an answer.
    Drop,
    /// Forwarded and answered by the upstream (the write committed), then the connection is
    /// closed without an answer: an ambiguous call.
    LostResponse,
}

/// One decision: the fault, and which of its two forms (`alternate`) where it has two:
/// DynamoDB's `ProvisionedThroughputExceededException` rather than `ThrottlingException`, a 503
/// rather than a 500.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub alternate: bool,
}

/// How often each fault happens; see the module docs for the text form.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FaultPlan {
    pub seed: u64,
    pub throttle: f64,
    pub error5xx: f64,
    pub slow: f64,
    pub slow_by: Duration,
    pub drop: f64,
    pub lost_response: f64,
    /// Faults for the first requests, in order, before the probabilities apply: a test's way to
    /// say exactly which call fails. Not part of the text form. Scripted faults take the first
    /// form (`ThrottlingException`, 500).
    pub first: Vec<FaultKind>,
}

impl FaultPlan {
    /// A plan that gives the first `n` requests `kind` and leaves every later one alone.
    pub fn first_n(n: usize, kind: FaultKind) -> Self {
        Self {
            first: vec![kind; n],
            ..Self::default()
        }
    }

    /// Parses the text form (module docs); the plan is validated.
    pub fn parse(text: &str) -> Result<Self, ProxyError> {
        let bad = |why: String| ProxyError::BadFaults {
            text: text.trim().to_string(),
            why,
        };
        let mut plan = FaultPlan::default();
        let mut seen: Vec<&str> = Vec::new();
        for pair in text.split(',').map(str::trim) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad(format!("{pair:?} is not key=value")))?;
            let (key, value) = (key.trim(), value.trim());
            let canonical = match key {
                "seed" => "seed",
                "throttle" => "throttle",
                "5xx" | "error5xx" => "5xx",
                "slow" => "slow",
                "slow_by" => "slow_by",
                "drop" => "drop",
                "lost" | "lost_response" => "lost",
                _ => return Err(bad(format!("unknown key {key:?}"))),
            };
            if seen.contains(&canonical) {
                return Err(bad(format!("{canonical} given twice")));
            }
            seen.push(canonical);
            let probability = || {
                value
                    .parse::<f64>()
                    .map_err(|_| bad(format!("{key}={value:?} is not a number")))
            };
            match canonical {
                "seed" => {
                    plan.seed = value
                        .parse()
                        .map_err(|_| bad(format!("seed={value:?} is not a whole number")))?
                }
                "throttle" => plan.throttle = probability()?,
                "5xx" => plan.error5xx = probability()?,
                "slow" => plan.slow = probability()?,
                "drop" => plan.drop = probability()?,
                "lost" => plan.lost_response = probability()?,
                _ => {
                    plan.slow_by = parse_duration(value)
                        .ok_or_else(|| bad(format!("slow_by={value:?} is not a duration")))?
                }
            }
        }
        if !seen.contains(&"seed") {
            return Err(bad(
                "seed is required, so a run says how to replay it".into()
            ));
        }
        plan.check().map_err(bad)?;
        Ok(plan)
    }

    /// Refuses a plan that cannot mean anything.
    pub fn validate(&self) -> Result<(), ProxyError> {
        self.check().map_err(|why| ProxyError::BadFaults {
            text: self.to_string(),
            why,
        })
    }

    fn check(&self) -> Result<(), String> {
        let mut sum = 0.0;
        for (name, p) in self.probabilities() {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name}={p} is not a probability (0 to 1)"));
            }
            sum += p;
        }
        // Decimal fractions do not add up exactly in binary: 0.7 + 0.2 + 0.1 is 1.0000000000000002.
        if sum > 1.0 + 1e-9 {
            return Err(format!("the probabilities add up to {sum}, more than 1"));
        }
        let slows = self.slow > 0.0 || self.first.contains(&FaultKind::Slow);
        if slows && self.slow_by.is_zero() {
            return Err("slow > 0 needs slow_by, the time a slow answer is held back".into());
        }
        Ok(())
    }

    fn probabilities(&self) -> [(&'static str, f64); 5] {
        [
            ("throttle", self.throttle),
            ("5xx", self.error5xx),
            ("slow", self.slow),
            ("drop", self.drop),
            ("lost", self.lost_response),
        ]
    }

    /// The fault for a draw `r` in 0..1: the probabilities cut 0..1 into consecutive ranges,
    /// and the half of its range `r` falls in picks the fault's form, so one draw decides both.
    fn fault_for(&self, r: f64) -> Option<Fault> {
        let kinds = [
            FaultKind::Throttle,
            FaultKind::Error5xx,
            FaultKind::Slow,
            FaultKind::Drop,
            FaultKind::LostResponse,
        ];
        let mut low = 0.0;
        for (kind, (_, p)) in kinds.into_iter().zip(self.probabilities()) {
            if p > 0.0 && r < low + p {
                return Some(Fault {
                    kind,
                    alternate: (r - low) / p >= 0.5,
                });
            }
            low += p;
        }
        None
    }
}

impl fmt::Display for FaultPlan {
    /// The text form; `first` has none and is left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed={},throttle={},5xx={},slow={},slow_by={}ms,drop={},lost={}",
            self.seed,
            self.throttle,
            self.error5xx,
            self.slow,
            self.slow_by.as_millis(),
            self.drop,
            self.lost_response
        )
    }
}

/// `300ms`, `2s`, `1.5s`, or bare milliseconds.
fn parse_duration(text: &str) -> Option<Duration> {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.trim().parse().ok().map(Duration::from_millis);
    }
    if let Some(secs) = text.strip_suffix('s') {
        let secs: f64 = secs.trim().parse().ok()?;
        return Duration::try_from_secs_f64(secs).ok();
    }
    text.parse().ok().map(Duration::from_millis)
}

struct Active {
    plan: FaultPlan,
    rng: StdRng,
    decided: usize,
}

/// The runtime switch: a test sets its queues and tables up fault-free, turns faults on for
/// the chaos phase and off again for its final checks.
#[derive(Default)]
pub struct Faults {
    active: Mutex<Option<Active>>,
    request_ids: AtomicU64,
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faults")
            .field("plan", &self.plan())
            .finish()
    }
}

impl Faults {
    /// Turns faults on with `plan` (validated; refused without a change if it is nonsense), or
    /// off with `None`. Each plan starts its sequence afresh from its seed, so turning the same
    /// plan on again replays the same decisions.
    pub fn set(&self, plan: Option<FaultPlan>) -> Result<(), ProxyError> {
        if let Some(plan) = &plan {
            plan.validate()?;
        }
        *self.lock() = plan.map(|plan| Active {
            rng: StdRng::seed_from_u64(plan.seed),
            plan,
            decided: 0,
        });
        Ok(())
    }

    /// The plan in force, if any.
    pub fn plan(&self) -> Option<FaultPlan> {
        self.lock().as_ref().map(|active| active.plan.clone())
    }

    /// The fault for the next request: one draw per request while a plan is on.
    pub(crate) fn decide(&self, long_poll: bool) -> Option<Fault> {
        let mut guard = self.lock();
        let active = guard.as_mut()?;
        let r: f64 = active.rng.random();
        let index = active.decided;
        active.decided += 1;
        let fault = match active.plan.first.get(index) {
            Some(&kind) => Some(Fault {
                kind,
                alternate: false,
            }),
            None => active.plan.fault_for(r),
        };
        fault.filter(|f| !(long_poll && f.kind == FaultKind::LostResponse))
    }

    pub(crate) fn slow_by(&self) -> Duration {
        self.lock()
            .as_ref()
            .map(|a| a.plan.slow_by)
            .unwrap_or_default()
    }

    pub(crate) fn next_request_id(&self) -> String {
        let n = self.request_ids.fetch_add(1, Ordering::Relaxed);
        format!("AWSPROXY{n:016X}")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Active>> {
        // The state is one assignment or one draw at a time: a panic cannot leave it half-made.
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Injected faults so far, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub throttle: u64,
    pub error5xx: u64,
    pub slow: u64,
    pub drop: u64,
    pub lost_response: u64,
}

impl FaultCounts {
    pub fn total(&self) -> u64 {
        self.throttle + self.error5xx + self.slow + self.drop + self.lost_response
    }
}

#[derive(Debug, Default)]
pub(crate) struct FaultCounters([AtomicU64; 5]);

impl FaultCounters {
    fn index(kind: FaultKind) -> usize {
        match kind {
            FaultKind::Throttle => 0,
            FaultKind::Error5xx => 1,
            FaultKind::Slow => 2,
            FaultKind::Drop => 3,
            FaultKind::LostResponse => 4,
        }
    }

    pub(crate) fn count(&self, kind: FaultKind) {
        self.0[Self::index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> FaultCounts {
        let get = |kind| self.0[Self::index(kind)].load(Ordering::Relaxed);
        FaultCounts {
            throttle: get(FaultKind::Throttle),
            error5xx: get(FaultKind::Error5xx),
            slow: get(FaultKind::Slow),
            drop: get(FaultKind::Drop),
            lost_response: get(FaultKind::LostResponse),
        }
    }
}

/// Which wire format a request expects its errors in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// `X-Amz-Target: DynamoDB_20120810.<Op>`, AWS JSON 1.0.
    DynamoDb,
    /// `X-Amz-Target: AmazonSQS.<Op>`: today's SQS clients, AWS JSON 1.0, query-compatible.
    SqsJson,
    /// A form-encoded `Action=<Op>` body: older SQS clients, the AWS query protocol.
    SqsQuery,
    /// Any other `X-Amz-Target`: another AWS JSON service, such as Secrets Manager, which the
    /// local stack serves from the DynamoDB process and so sends through the DynamoDB proxy.
    OtherJson,
    /// Everything else: S3's REST-XML.
    S3,
}

impl Service {
    pub fn detect(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Self {
        if let Some(target) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
            return if target.starts_with("DynamoDB") {
                Service::DynamoDb
            } else if target.starts_with("AmazonSQS.") {
                Service::SqsJson
            } else {
                Service::OtherJson
            };
        }
        let form = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        let action = |params: &[u8]| {
            params
                .split(|&b| b == b'&')
                .any(|p| p.starts_with(b"Action="))
        };
        let query = uri.query().is_some_and(|q| action(q.as_bytes()));
        if (*method == Method::POST && form && action(body)) || (*method == Method::GET && query) {
            Service::SqsQuery
        } else {
            Service::S3
        }
    }
}

/// A refusal in `service`'s wire format: its throttling error (`fault.kind` Throttle) or its
/// 500 / 503 (Error5xx; `alternate` picks the 503).
///
/// Sources, per service:
/// - DynamoDB: Developer Guide, "Error handling with DynamoDB"
///   (<https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/Programming.Errors.html>):
///   a 400 with `Content-Type: application/x-amz-json-1.0`, `x-amzn-RequestId` and
///   `{"__type":"com.amazonaws.dynamodb.v20120810#<Exception>","message":…}`; the same page lists
///   `ProvisionedThroughputExceededException` and `ThrottlingException` (400),
///   `InternalServerError` (500) and `ServiceUnavailable` (503).
/// - S3: API Reference, "Error responses"
///   (<https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html>): an XML
///   `<Error><Code/><Message/><RequestId/></Error>` body and `x-amz-request-id`; `SlowDown` (503,
///   "Please reduce your request rate."), `InternalError` (500), `ServiceUnavailable` (503).
/// - SQS, JSON protocol: the SQS Smithy model (api-models-aws,
///   `models/sqs/service/2012-11-05/sqs-2012-11-05.json`) marks the service
///   `awsJson1_0` + `awsQueryCompatible` and models throttling as `RequestThrottled`, HTTP 403,
///   query code `RequestThrottled`. The `awsQueryCompatible` trait (Smithy AWS protocol docs,
///   and smithy-rs issue #1872) adds `x-amzn-query-error: <Code>;<Sender|Receiver>`, which the
///   SDKs read in preference to `__type`. The 5xx are the SQS API Reference's "Common Errors"
///   (<https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/CommonErrors.html>):
///   `InternalFailure` (500) and `ServiceUnavailable` (503); the header value
///   `InternalFailure;Receiver` is the example in aws-sdk-js-v3 pull request #3972.
/// - SQS, query protocol: the Smithy "AWS query protocol" spec's error form,
///   `<ErrorResponse><Error><Type/><Code/><Message/><Detail/></Error><RequestId/></ErrorResponse>`,
///   with the codes and statuses above; a real throttled answer in that form (403,
///   `RequestThrottled`, `Sender`) is quoted in erlcloud pull request #686.
/// - Another JSON service: the common errors every AWS API reference lists,
///   `ThrottlingException` (400), `InternalFailure` (500), `ServiceUnavailable` (503).
pub fn refusal(service: Service, fault: Fault, request_id: &str) -> Response<Body> {
    let throttle = fault.kind == FaultKind::Throttle;
    let unavailable = fault.alternate;
    let (status, content_type, body, extra): (u16, &str, String, Option<(&str, String)>) =
        match service {
            Service::DynamoDb => {
                let (status, name, message) = match (throttle, fault.alternate) {
                    (true, false) => (
                        400,
                        "ThrottlingException",
                        "Rate of requests exceeds the allowed throughput.",
                    ),
                    (true, true) => (
                        400,
                        "ProvisionedThroughputExceededException",
                        "The level of configured provisioned throughput for the table was \
                         exceeded. Consider increasing your provisioning level with the \
                         UpdateTable API.",
                    ),
                    (false, false) => (500, "InternalServerError", "Internal server error"),
                    (false, true) => (
                        503,
                        "ServiceUnavailable",
                        "The service is currently unavailable or busy.",
                    ),
                };
                let body = json_error(&format!("com.amazonaws.dynamodb.v20120810#{name}"), message);
                (status, "application/x-amz-json-1.0", body, None)
            }
            Service::SqsJson => {
                let (status, code, fault_by, message) = sqs_error(throttle, unavailable);
                let type_name = if throttle {
                    format!("com.amazonaws.sqs#{code}")
                } else {
                    code.to_string()
                };
                (
                    status,
                    "application/x-amz-json-1.0",
                    json_error(&type_name, message),
                    Some(("x-amzn-query-error", format!("{code};{fault_by}"))),
                )
            }
            Service::SqsQuery => {
                let (status, code, fault_by, message) = sqs_error(throttle, unavailable);
                let body = format!(
                    "<?xml version=\"1.0\"?><ErrorResponse \
                     xmlns=\"http://queue.amazonaws.com/doc/2012-11-05/\"><Error>\
                     <Type>{fault_by}</Type><Code>{code}</Code><Message>{message}</Message>\
                     <Detail/></Error><RequestId>{request_id}</RequestId></ErrorResponse>"
                );
                (status, "text/xml", body, None)
            }
            Service::OtherJson => {
                let (status, code, message) = match (throttle, unavailable) {
                    (true, _) => (400, "ThrottlingException", "Rate exceeded"),
                    (false, false) => (
                        500,
                        "InternalFailure",
                        "The request processing has failed because of an unknown error.",
                    ),
                    (false, true) => (503, "ServiceUnavailable", "The service is unavailable."),
                };
                (
                    status,
                    "application/x-amz-json-1.1",
                    json_error(code, message),
                    None,
                )
            }
            Service::S3 => {
                let (status, code, message) = match (throttle, unavailable) {
                    (true, _) => (503, "SlowDown", "Please reduce your request rate."),
                    (false, false) => (
                        500,
                        "InternalError",
                        "We encountered an internal error. Please try again.",
                    ),
                    (false, true) => (
                        503,
                        "ServiceUnavailable",
                        "Service is unable to handle request.",
                    ),
                };
                let body = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
                     <Message>{message}</Message><RequestId>{request_id}</RequestId></Error>"
                );
                (status, "application/xml", body, None)
            }
        };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).expect("a valid status");
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    let id = HeaderValue::from_str(request_id).expect("a request id is ASCII");
    let id_header = if service == Service::S3 {
        "x-amz-request-id"
    } else {
        "x-amzn-requestid"
    };
    headers.insert(id_header, id);
    if let Some((name, value)) = extra {
        headers.insert(
            name,
            HeaderValue::from_str(&value).expect("an ASCII header"),
        );
    }
    response
}

/// SQS's code, fault side and message for a throttle or a 500 / 503 (`unavailable`).
fn sqs_error(throttle: bool, unavailable: bool) -> (u16, &'static str, &'static str, &'static str) {
    match (throttle, unavailable) {
        (true, _) => (403, "RequestThrottled", "Sender", "Request is throttled."),
        (false, false) => (
            500,
            "InternalFailure",
            "Receiver",
            "The request processing has failed because of an unknown error, exception or failure.",
        ),
        (false, true) => (
            503,
            "ServiceUnavailable",
            "Receiver",
            "The request has failed due to a temporary failure of the server.",
        ),
    }
}

fn json_error(type_name: &str, message: &str) -> String {
    format!(r#"{{"__type":"{type_name}","message":"{message}"}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> FaultPlan {
        FaultPlan::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn the_documented_text_form_parses_into_every_field() {
        let p = plan(EXAMPLE);
        assert_eq!(
            p,
            FaultPlan {
                seed: 7,
                throttle: 0.02,
                error5xx: 0.01,
                slow: 0.02,
                slow_by: Duration::from_millis(300),
                drop: 0.01,
                lost_response: 0.01,
                first: Vec::new(),
            }
        );
        assert_eq!(plan(&p.to_string()), p, "Display is the text form");
    }

    #[test]
    fn long_key_names_spaces_and_duration_units_are_accepted() {
        let p = plan(" seed = 1 , error5xx=0.5, lost_response=0.25 ,slow=0.25,slow_by=1.5s");
        assert_eq!((p.error5xx, p.lost_response), (0.5, 0.25));
        assert_eq!(p.slow_by, Duration::from_millis(1500));
        assert_eq!(plan("seed=1,slow_by=40").slow_by, Duration::from_millis(40));
        assert_eq!(plan("seed=1,slow_by=2s").slow_by, Duration::from_secs(2));
        assert_eq!(
            plan("seed=3"),
            FaultPlan {
                seed: 3,
                ..FaultPlan::default()
            }
        );
        // Decimal fractions that add up to exactly 1 on paper.
        plan("seed=1,throttle=0.7,5xx=0.2,drop=0.1");
    }

    #[test]
    fn nonsense_plans_are_refused_with_the_reason() {
        for (text, why) in [
            ("", "not key=value"),
            ("throttle=0.1", "seed is required"),
            ("seed=1,throttle", "not key=value"),
            ("seed=1,flaky=0.1", "unknown key"),
            ("seed=1,throttle=0.1,throttle=0.2", "twice"),
            ("seed=1,5xx=0.1,error5xx=0.1", "twice"),
            ("seed=-1", "whole number"),
            ("seed=1,throttle=lots", "not a number"),
            ("seed=1,drop=1.5", "not a probability"),
            ("seed=1,drop=-0.1", "not a probability"),
            ("seed=1,drop=NaN", "not a probability"),
            ("seed=1,throttle=0.6,lost=0.5", "more than 1"),
            ("seed=1,slow=0.1", "needs slow_by"),
            ("seed=1,slow=0.1,slow_by=soon", "not a duration"),
            ("seed=1,slow=0.1,slow_by=-2s", "not a duration"),
        ] {
            match FaultPlan::parse(text) {
                Ok(p) => panic!("{text:?} parsed into {p:?}"),
                Err(e) => assert!(e.to_string().contains(why), "{text:?}: {e}"),
            }
        }
        let faults = Faults::default();
        let nonsense = FaultPlan {
            throttle: 2.0,
            ..FaultPlan::default()
        };
        assert!(faults.set(Some(nonsense)).is_err());
        let instant_slowness = FaultPlan::first_n(1, FaultKind::Slow);
        assert!(faults.set(Some(instant_slowness)).is_err());
        assert_eq!(faults.plan(), None, "a refused plan changes nothing");
    }

    fn detect(method: Method, uri: &str, headers: &[(&str, &str)], body: &str) -> Service {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        Service::detect(&method, &uri.parse().unwrap(), &map, body.as_bytes())
    }

    #[test]
    fn each_service_is_told_apart_by_its_protocol() {
        let json = ("content-type", "application/x-amz-json-1.0");
        let form = (
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        );
        let post = Method::POST;
        assert_eq!(
            detect(
                post.clone(),
                "/",
                &[json, ("x-amz-target", "DynamoDB_20120810.PutItem")],
                "{}"
            ),
            Service::DynamoDb
        );
        assert_eq!(
            detect(
                post.clone(),
                "/",
                &[json, ("x-amz-target", "AmazonSQS.SendMessage")],
                "{}"
            ),
            Service::SqsJson
        );
        assert_eq!(
            detect(
                post.clone(),
                "/",
                &[form],
                "Action=SendMessage&Version=2012-11-05&MessageBody=x"
            ),
            Service::SqsQuery
        );
        assert_eq!(
            detect(
                post.clone(),
                "/",
                &[form],
                "Version=2012-11-05&Action=ReceiveMessage"
            ),
            Service::SqsQuery
        );
        assert_eq!(
            detect(
                Method::GET,
                "/?Action=ListQueues&Version=2012-11-05",
                &[],
                ""
            ),
            Service::SqsQuery
        );
        assert_eq!(
            detect(
                post.clone(),
                "/",
                &[("x-amz-target", "secretsmanager.GetSecretValue")],
                "{}"
            ),
            Service::OtherJson
        );
        assert_eq!(
            detect(Method::PUT, "/bucket/key", &[], "Action=x"),
            Service::S3
        );
        // An object whose bytes merely look like a query call is still S3.
        assert_eq!(
            detect(Method::PUT, "/b/k", &[form], "Action=SendMessage"),
            Service::S3
        );
        assert_eq!(
            detect(post, "/b/k?uploads", &[form], "NoAction=1"),
            Service::S3
        );
    }

    async fn answer(
        service: Service,
        kind: FaultKind,
        alternate: bool,
    ) -> (u16, HeaderMap, String) {
        let response = refusal(service, Fault { kind, alternate }, "RID1");
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (
            parts.status.as_u16(),
            parts.headers,
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }

    fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[tokio::test]
    async fn dynamodb_refusals_are_aws_json_with_the_dynamodb_type() {
        let (status, headers, body) = answer(Service::DynamoDb, FaultKind::Throttle, false).await;
        assert_eq!(status, 400);
        assert_eq!(
            header(&headers, "content-type"),
            "application/x-amz-json-1.0"
        );
        assert_eq!(header(&headers, "x-amzn-requestid"), "RID1");
        assert_eq!(
            body,
            r#"{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException","message":"Rate of requests exceeds the allowed throughput."}"#
        );
        let (status, _, body) = answer(Service::DynamoDb, FaultKind::Throttle, true).await;
        assert_eq!(status, 400);
        assert!(body.starts_with(
            r#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"The level"#
        ));
        let (status, _, body) = answer(Service::DynamoDb, FaultKind::Error5xx, false).await;
        assert_eq!(status, 500);
        assert_eq!(
            body,
            r#"{"__type":"com.amazonaws.dynamodb.v20120810#InternalServerError","message":"Internal server error"}"#
        );
        let (status, _, body) = answer(Service::DynamoDb, FaultKind::Error5xx, true).await;
        assert_eq!(status, 503);
        assert!(body.contains("v20120810#ServiceUnavailable"), "{body}");
    }

    #[tokio::test]
    async fn s3_refusals_are_its_xml_error_document() {
        let (status, headers, body) = answer(Service::S3, FaultKind::Throttle, false).await;
        assert_eq!(status, 503);
        assert_eq!(header(&headers, "content-type"), "application/xml");
        assert_eq!(header(&headers, "x-amz-request-id"), "RID1");
        assert_eq!(
            body,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
             <Message>Please reduce your request rate.</Message><RequestId>RID1</RequestId></Error>"
        );
        // Both forms of a throttle are SlowDown: S3 has one.
        assert_eq!(answer(Service::S3, FaultKind::Throttle, true).await.2, body);
        let (status, _, body) = answer(Service::S3, FaultKind::Error5xx, false).await;
        assert_eq!(status, 500);
        assert!(body.contains("<Code>InternalError</Code>"), "{body}");
        let (status, _, body) = answer(Service::S3, FaultKind::Error5xx, true).await;
        assert_eq!(status, 503);
        assert!(body.contains("<Code>ServiceUnavailable</Code>"), "{body}");
    }

    #[tokio::test]
    async fn sqs_json_refusals_carry_the_query_compatible_code_header() {
        let (status, headers, body) = answer(Service::SqsJson, FaultKind::Throttle, false).await;
        assert_eq!(status, 403);
        assert_eq!(
            header(&headers, "content-type"),
            "application/x-amz-json-1.0"
        );
        assert_eq!(
            header(&headers, "x-amzn-query-error"),
            "RequestThrottled;Sender"
        );
        assert_eq!(
            body,
            r#"{"__type":"com.amazonaws.sqs#RequestThrottled","message":"Request is throttled."}"#
        );
        let (status, headers, _) = answer(Service::SqsJson, FaultKind::Error5xx, false).await;
        assert_eq!(status, 500);
        assert_eq!(
            header(&headers, "x-amzn-query-error"),
            "InternalFailure;Receiver"
        );
        let (status, headers, _) = answer(Service::SqsJson, FaultKind::Error5xx, true).await;
        assert_eq!(status, 503);
        assert_eq!(
            header(&headers, "x-amzn-query-error"),
            "ServiceUnavailable;Receiver"
        );
    }

    #[tokio::test]
    async fn sqs_query_refusals_are_an_error_response_document() {
        let (status, headers, body) = answer(Service::SqsQuery, FaultKind::Throttle, false).await;
        assert_eq!(status, 403);
        assert_eq!(header(&headers, "content-type"), "text/xml");
        assert_eq!(
            body,
            "<?xml version=\"1.0\"?><ErrorResponse xmlns=\"http://queue.amazonaws.com/doc/2012-11-05/\">\
             <Error><Type>Sender</Type><Code>RequestThrottled</Code><Message>Request is throttled.</Message>\
             <Detail/></Error><RequestId>RID1</RequestId></ErrorResponse>"
        );
        let (status, _, body) = answer(Service::SqsQuery, FaultKind::Error5xx, true).await;
        assert_eq!(status, 503);
        assert!(
            body.contains("<Type>Receiver</Type><Code>ServiceUnavailable</Code>"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn other_json_services_get_the_common_errors() {
        let (status, headers, body) = answer(Service::OtherJson, FaultKind::Throttle, false).await;
        assert_eq!(status, 400);
        assert_eq!(
            header(&headers, "content-type"),
            "application/x-amz-json-1.1"
        );
        assert!(body.contains(r#""__type":"ThrottlingException""#), "{body}");
        assert_eq!(
            answer(Service::OtherJson, FaultKind::Error5xx, false)
                .await
                .0,
            500
        );
    }

    fn decisions(faults: &Faults, n: usize) -> Vec<Option<Fault>> {
        (0..n).map(|_| faults.decide(false)).collect()
    }

    fn on(plan: FaultPlan) -> Faults {
        let faults = Faults::default();
        faults.set(Some(plan)).unwrap();
        faults
    }

    #[test]
    fn the_same_seed_gives_the_same_decisions_and_another_seed_others() {
        let busy = "throttle=0.2,5xx=0.2,slow=0.2,slow_by=1ms,drop=0.2,lost=0.1";
        let a = decisions(&on(plan(&format!("seed=42,{busy}"))), 200);
        let b = decisions(&on(plan(&format!("seed=42,{busy}"))), 200);
        let c = decisions(&on(plan(&format!("seed=43,{busy}"))), 200);
        assert_eq!(a, b);
        assert_ne!(a, c);
        for kind in [
            FaultKind::Throttle,
            FaultKind::Error5xx,
            FaultKind::Slow,
            FaultKind::Drop,
            FaultKind::LostResponse,
        ] {
            for alternate in [false, true] {
                assert!(
                    a.contains(&Some(Fault { kind, alternate })),
                    "{kind:?} alternate={alternate} never drawn"
                );
            }
        }
        assert!(a.contains(&None));
    }

    #[test]
    fn each_fault_happens_about_as_often_as_planned() {
        let faults = on(plan("seed=5,throttle=0.2,drop=0.05"));
        let all = decisions(&faults, 20_000);
        let share = |kind| {
            all.iter()
                .filter(|d| d.is_some_and(|f| f.kind == kind))
                .count() as f64
                / 20_000.0
        };
        assert!((0.18..0.22).contains(&share(FaultKind::Throttle)));
        assert!((0.04..0.06).contains(&share(FaultKind::Drop)));
        assert_eq!(share(FaultKind::Slow), 0.0);
    }

    #[test]
    fn switching_off_stops_faults_and_switching_on_replays_the_sequence() {
        let p = plan("seed=9,throttle=0.5,drop=0.5");
        let faults = on(p.clone());
        let first = decisions(&faults, 50);
        assert!(first.iter().all(Option::is_some));
        faults.set(None).unwrap();
        assert_eq!(faults.plan(), None);
        assert!(decisions(&faults, 1000).iter().all(Option::is_none));
        faults.set(Some(p)).unwrap();
        assert_eq!(decisions(&faults, 50), first);
    }

    #[test]
    fn a_script_faults_exactly_the_first_requests() {
        let faults = on(FaultPlan::first_n(2, FaultKind::Drop));
        let drop = Some(Fault {
            kind: FaultKind::Drop,
            alternate: false,
        });
        assert_eq!(decisions(&faults, 5), vec![drop, drop, None, None, None]);
    }

    #[test]
    fn a_long_poll_is_never_given_a_lost_response() {
        let faults = on(plan("seed=1,lost=1"));
        assert_eq!(faults.decide(true), None);
        assert_eq!(
            faults.decide(false).map(|f| f.kind),
            Some(FaultKind::LostResponse)
        );
        let faults = on(plan("seed=1,drop=1"));
        assert_eq!(faults.decide(true).map(|f| f.kind), Some(FaultKind::Drop));
    }
}
