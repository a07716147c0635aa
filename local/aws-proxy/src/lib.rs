//! A small HTTP proxy for the local stack's AWS stand-ins (moto): every request is forwarded to
//! one upstream unchanged (method, path, query, headers including `Host`, body), and its answer
//! is held back before it goes out, as a slower machine or a slower network would.
//!
//! Two ways to slow an answer:
//! - [`Delay::Fixed`]: a constant added to every answer, as a farther network would;
//! - [`Delay::Slowdown`]: the upstream's own time to answer, stretched by a factor, so a
//!   factor of 3 makes every answer take three times as long as moto took on this machine,
//!   whatever this machine's speed. A long poll (SQS `ReceiveMessage`) mostly waits rather
//!   than works, and a slower machine would not wait longer: it is held back by the stretch of
//!   an average answer instead of its own.
//!
//! `Host` is passed through because moto writes it into what it answers (SQS queue URLs), and
//! SigV4 signs it: clients keep talking to the proxy and never learn the upstream's address.
//!
//! It can also misbehave as AWS does, on a seeded schedule that can be switched at runtime
//! ([`faults`], [`spawn_with`]): throttling and 5xx errors in each service's own wire format,
//! slow answers, dropped connections and answers lost after the upstream acted.
//!
//! It serves HTTP/1.1 with hyper directly rather than through axum: a dropped or lost answer is
//! a connection closed with nothing written, which only a service that may fail can ask for
//! (axum's handlers cannot). HTTP/1.1 only, as with `axum::serve` before: the AWS SDKs speak
//! it to a plain `http://` endpoint.
pub mod faults;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use faults::{refusal, FaultCounters};
pub use faults::{Fault, FaultCounts, FaultKind, FaultPlan, Faults, Service};

/// How much longer than the upstream's own answer an answer takes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Delay {
    #[default]
    None,
    Fixed(Duration),
    /// The upstream's time to answer, times this factor (≥ 1).
    Slowdown(f64),
}

impl Delay {
    /// The extra wait after the upstream answered in `took`.
    pub fn extra(&self, took: Duration) -> Duration {
        match *self {
            Delay::None => Duration::ZERO,
            Delay::Fixed(extra) => extra,
            Delay::Slowdown(factor) => took.mul_f64((factor - 1.0).max(0.0)),
        }
    }

    /// Parses `3x` (a slowdown factor) or `40ms` / `40` (a fixed delay in milliseconds).
    pub fn parse(text: &str) -> Result<Self, ProxyError> {
        let text = text.trim();
        let bad = || ProxyError::BadDelay(text.to_string());
        if let Some(factor) = text.strip_suffix('x') {
            let factor: f64 = factor.trim().parse().map_err(|_| bad())?;
            if !(1.0..=100.0).contains(&factor) {
                return Err(bad());
            }
            return Ok(if factor == 1.0 {
                Delay::None
            } else {
                Delay::Slowdown(factor)
            });
        }
        let ms: u64 = text
            .strip_suffix("ms")
            .unwrap_or(text)
            .trim()
            .parse()
            .map_err(|_| bad())?;
        Ok(if ms == 0 {
            Delay::None
        } else {
            Delay::Fixed(Duration::from_millis(ms))
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("delay {0:?}: expected a factor such as 3x (1 to 100) or milliseconds such as 40ms")]
    BadDelay(String),
    #[error("faults {text:?}: {why}; expected e.g. {}", faults::EXAMPLE)]
    BadFaults { text: String, why: String },
    #[error("HTTP client: {0}")]
    Client(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What the proxy has done so far.
#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    upstream_micros: AtomicU64,
    added_micros: AtomicU64,
    /// Requests that did not long-poll, and their upstream time: the average answer.
    worked: AtomicU64,
    worked_micros: AtomicU64,
    faults: FaultCounters,
}

impl Stats {
    /// The upstream's average time to answer a request that did not long-poll.
    pub fn average_answer(&self) -> Duration {
        let n = self.worked.load(Ordering::Relaxed).max(1);
        Duration::from_micros(self.worked_micros.load(Ordering::Relaxed) / n)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// Time the upstream took to answer, summed over all requests.
    pub fn upstream_time(&self) -> Duration {
        Duration::from_micros(self.upstream_micros.load(Ordering::Relaxed))
    }
    /// Time the proxy added, summed over all requests.
    pub fn added_time(&self) -> Duration {
        Duration::from_micros(self.added_micros.load(Ordering::Relaxed))
    }
    /// Faults injected so far, by kind.
    pub fn faults(&self) -> FaultCounts {
        self.faults.snapshot()
    }
}

struct Shared {
    upstream: String,
    delay: Delay,
    client: reqwest::Client,
    stats: Arc<Stats>,
    faults: Arc<Faults>,
    /// Isolates DynamoDB transactions from every other DynamoDB call ([`transaction_gate`]).
    dynamodb_gate: tokio::sync::RwLock<()>,
}

/// A running proxy; it stops when its task does (with the runtime it was spawned on).
pub struct Proxy {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    /// The fault switch: `proxy.faults.set(Some(plan))` turns faults on, `set(None)` off.
    pub faults: Arc<Faults>,
}

impl Proxy {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// How a proxy misbehaves.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub delay: Delay,
    /// Faults from the start; they can be switched later through [`Proxy::faults`].
    pub faults: Option<FaultPlan>,
}

/// Starts a proxy on `listener` forwarding to `upstream` (`http://host:port`), on the current
/// tokio runtime.
pub async fn spawn(
    listener: tokio::net::TcpListener,
    upstream: &str,
    delay: Delay,
) -> Result<Proxy, ProxyError> {
    spawn_with(
        listener,
        upstream,
        Options {
            delay,
            faults: None,
        },
    )
    .await
}

/// [`spawn`], with faults.
pub async fn spawn_with(
    listener: tokio::net::TcpListener,
    upstream: &str,
    options: Options,
) -> Result<Proxy, ProxyError> {
    let client = reqwest::Client::builder()
        // The answer goes back exactly as the upstream gave it; the caller follows redirects.
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(|e| ProxyError::Client(e.to_string()))?;
    let faults = Arc::new(Faults::default());
    faults.set(options.faults)?;
    let stats = Arc::new(Stats::default());
    let shared = Arc::new(Shared {
        upstream: upstream.trim_end_matches('/').to_string(),
        delay: options.delay,
        client,
        stats: stats.clone(),
        faults: faults.clone(),
        dynamodb_gate: tokio::sync::RwLock::new(()),
    });
    let addr = listener.local_addr()?;
    tokio::spawn(serve(listener, shared));
    Ok(Proxy {
        addr,
        stats,
        faults,
    })
}

async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors and the like: the next accept may work once some
                // connection has closed, and spinning on the error would only burn the CPU.
                tracing::error!(error = %err, "aws-proxy cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let shared = shared.clone();
                async move { forward(shared, request).await }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %err, "aws-proxy connection ended");
            }
        });
    }
}

/// The service's way to close its connection without answering: hyper writes nothing for a
/// request whose service failed, and drops the connection.
#[derive(Debug)]
struct HangUp(&'static str);

impl std::fmt::Display for HangUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for HangUp {}

/// What a DynamoDB call holds while moto serves it.
enum Gate<'a> {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
    None,
}

/// moto is not DynamoDB here: its `TransactWriteItems` copies every table it names before
/// applying the transaction and, when a condition fails, puts the whole copy back
/// (`moto/dynamodb/models/__init__.py`, `transact_write_items`). Its server is threaded, so a
/// failed transaction would undo every write other requests made in between (a concurrent
/// job's committed create, a versioned save). DynamoDB's transactions cancel only their own
/// writes. So a transaction runs alone, and other DynamoDB calls share the gate.
async fn transaction_gate<'a>(gate: &'a tokio::sync::RwLock<()>, headers: &HeaderMap) -> Gate<'a> {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !target.starts_with("DynamoDB_") {
        Gate::None
    } else if target.ends_with(".TransactWriteItems") {
        Gate::Exclusive(gate.write().await)
    } else {
        Gate::Shared(gate.read().await)
    }
}

/// Headers that belong to one hop, not to the request or answer (RFC 9110 section 7.6.1).
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// An SQS `ReceiveMessage`, in the JSON protocol (the `X-Amz-Target` header) or the query
/// protocol (`Action=ReceiveMessage`): a call that may wait for messages before it answers.
fn long_poll(headers: &HeaderMap, body: &[u8]) -> bool {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    target.ends_with(".ReceiveMessage")
        || body
            .windows(b"Action=ReceiveMessage".len())
            .any(|w| w == b"Action=ReceiveMessage")
}

fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    headers
        .iter()
        .filter(|(name, _)| !hop_by_hop(name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

async fn forward(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, HangUp> {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let url = format!("{}{}", shared.upstream, path);
    let stats = &shared.stats;
    let body = match axum::body::to_bytes(Body::new(body), usize::MAX).await {
        Ok(body) => body,
        // The caller went away mid-request: there is no one left to answer.
        Err(_) => return Err(HangUp("the request body did not arrive")),
    };
    let waits = long_poll(&parts.headers, &body);
    let fault = shared.faults.decide(waits);
    if let Some(fault) = fault {
        tracing::debug!(?fault, %url, "aws-proxy injects a fault");
    }
    match fault {
        Some(
            fault @ Fault {
                kind: FaultKind::Throttle | FaultKind::Error5xx,
                ..
            },
        ) => {
            stats.faults.count(fault.kind);
            let service = Service::detect(&parts.method, &parts.uri, &parts.headers, &body);
            let response = refusal(service, fault, &shared.faults.next_request_id());
            // Even a refusal crosses the slower network or comes from the slower machine.
            let extra = shared.delay.extra(started.elapsed());
            tokio::time::sleep(extra).await;
            stats.requests.fetch_add(1, Ordering::Relaxed);
            stats
                .added_micros
                .fetch_add(extra.as_micros() as u64, Ordering::Relaxed);
            return Ok(response);
        }
        Some(Fault {
            kind: FaultKind::Drop,
            ..
        }) => {
            stats.faults.count(FaultKind::Drop);
            stats.requests.fetch_add(1, Ordering::Relaxed);
            return Err(HangUp("fault: dropped"));
        }
        _ => {}
    }
    let gate = transaction_gate(&shared.dynamodb_gate, &parts.headers).await;
    let answer = async {
        let upstream = shared
            .client
            .request(parts.method.clone(), &url)
            .headers(end_to_end(&parts.headers))
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = upstream.status();
        let headers = end_to_end(upstream.headers());
        let bytes = upstream.bytes().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((status, headers, bytes))
    }
    .await;
    drop(gate);
    let took = started.elapsed();
    let mut extra = if waits {
        shared.delay.extra(stats.average_answer())
    } else {
        stats.worked.fetch_add(1, Ordering::Relaxed);
        stats
            .worked_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        shared.delay.extra(took)
    };
    if fault.is_some_and(|f| f.kind == FaultKind::Slow) {
        stats.faults.count(FaultKind::Slow);
        extra += shared.faults.slow_by();
    }
    tokio::time::sleep(extra).await;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    stats
        .upstream_micros
        .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    stats
        .added_micros
        .fetch_add(extra.as_micros() as u64, Ordering::Relaxed);
    match answer {
        // The upstream has acted on the request and its caller never learns how. Only an answer
        // that exists can be lost: an unreachable upstream stays a 502.
        Ok(_) if fault.is_some_and(|f| f.kind == FaultKind::LostResponse) => {
            stats.faults.count(FaultKind::LostResponse);
            Err(HangUp("fault: response lost"))
        }
        Ok((status, headers, bytes)) => {
            let mut response = Response::new(Body::from(bytes));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            Ok(response)
        }
        Err(err) => {
            tracing::warn!(%url, error = %err, "upstream unreachable");
            let mut response = Response::new(Body::from(format!("aws-proxy: upstream: {err}")));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            Ok(response)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_factor_or_milliseconds_parse_into_a_delay() {
        assert_eq!(Delay::parse("3x").unwrap(), Delay::Slowdown(3.0));
        assert_eq!(Delay::parse(" 2.5x ").unwrap(), Delay::Slowdown(2.5));
        assert_eq!(Delay::parse("1x").unwrap(), Delay::None);
        assert_eq!(
            Delay::parse("40ms").unwrap(),
            Delay::Fixed(Duration::from_millis(40))
        );
        assert_eq!(
            Delay::parse("40").unwrap(),
            Delay::Fixed(Duration::from_millis(40))
        );
        assert_eq!(Delay::parse("0").unwrap(), Delay::None);
    }

    #[test]
    fn nonsense_and_speedups_are_refused() {
        for text in ["", "fast", "0.5x", "-3x", "101x", "x", "-40ms", "3xx"] {
            assert!(Delay::parse(text).is_err(), "{text:?} parsed");
        }
    }

    #[test]
    fn a_slowdown_adds_its_factor_less_one_times_the_upstreams_time() {
        let took = Duration::from_millis(10);
        assert_eq!(Delay::Slowdown(3.0).extra(took), Duration::from_millis(20));
        assert_eq!(
            Delay::Fixed(Duration::from_millis(7)).extra(took),
            Duration::from_millis(7)
        );
        assert_eq!(Delay::None.extra(took), Duration::ZERO);
    }

    fn target(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-amz-target", value.parse().unwrap());
        headers
    }

    #[tokio::test]
    async fn a_dynamodb_transaction_waits_for_other_dynamodb_calls_and_they_for_it() {
        let gate = tokio::sync::RwLock::new(());
        let get = transaction_gate(&gate, &target("DynamoDB_20120810.GetItem")).await;
        let put = transaction_gate(&gate, &target("DynamoDB_20120810.PutItem")).await;
        let transact = target("DynamoDB_20120810.TransactWriteItems");
        let transaction = transaction_gate(&gate, &transact);
        let waited = tokio::time::timeout(Duration::from_millis(50), transaction).await;
        assert!(waited.is_err(), "the transaction ran beside other calls");
        drop((get, put));
        let alone = transaction_gate(&gate, &target("DynamoDB_20120810.TransactWriteItems")).await;
        let get_item = target("DynamoDB_20120810.GetItem");
        let beside = transaction_gate(&gate, &get_item);
        assert!(tokio::time::timeout(Duration::from_millis(50), beside)
            .await
            .is_err());
        drop(alone);
        // Other services never wait.
        let _sqs = transaction_gate(&gate, &target("AmazonSQS.SendMessage")).await;
    }

    #[test]
    fn only_sqs_receives_count_as_long_polls() {
        let mut headers = HeaderMap::new();
        assert!(!long_poll(&headers, b"{}"));
        assert!(long_poll(
            &headers,
            b"Action=ReceiveMessage&WaitTimeSeconds=20"
        ));
        headers.insert("x-amz-target", "AmazonSQS.ReceiveMessage".parse().unwrap());
        assert!(long_poll(&headers, b"{}"));
        headers.insert("x-amz-target", "AmazonSQS.SendMessage".parse().unwrap());
        assert!(!long_poll(&headers, b"{}"));
    }
}
