//! The local stand-ins for AWS (feature `local-aws`): one `moto_server` process per service (DynamoDB, SQS, S3), each
//! optionally behind an [`aws_proxy`] that slows its answers down.
//!
//! moto is single-threaded Python: one process serving all three services is the local stack's
//! bottleneck under load, so each service gets its own, and the SDK is pointed at each through
//! its per-service endpoint setting (the `AWS_ENDPOINT_URL_<SERVICE>` mechanism). Any other
//! service (Secrets Manager) goes to the DynamoDB process.
//!
//! `LOCAL_AWS_DELAY` slows every answer for the whole run: `3x` makes each take three times as
//! long as moto took, `40ms` adds 40 ms (README, "A slow machine on demand").
//!
//! [`LocalAws::launch_faultable`] puts a proxy in front of every process whose faults
//! (throttling, 5xx, drops, lost answers, in each service's wire format) a test switches on and
//! off ([`LocalAws::set_faults`]). Only the gateway goes through the proxies
//! ([`LocalAws::sdk_config`]); a test's own checks go straight to moto
//! ([`LocalAws::direct_sdk_config`]).
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_proxy::{Delay, FaultCounts, FaultPlan, Faults, Options, Stats};
use aws_sdk_s3::config::Credentials;
use aws_types::service_config::{LoadServiceConfig, ServiceConfigKey};

/// The variable that slows the local AWS stand-ins down (see the module docs).
pub const DELAY_VAR: &str = "LOCAL_AWS_DELAY";

/// The services that get a moto process each, by the SDK's service id.
pub const SERVICES: [&str; 3] = ["DynamoDB", "SQS", "S3"];

/// The repository's root (this crate is `shared/testkit`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on loopback")
}

fn wait_for_port(addr: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A child process that dies with its owner: killed on drop, and sent `signal` by the kernel
/// if the test process dies first (`PR_SET_PDEATHSIG`).
pub struct TiedChild {
    pub pid: u32,
    waiter: Option<std::thread::JoinHandle<()>>,
}

impl TiedChild {
    pub fn spawn(mut command: Command, signal: libc::c_int) -> std::io::Result<Self> {
        {
            use std::os::unix::process::CommandExt;
            // Its own process group, so drop can kill whatever it forks too.
            command.process_group(0);
            unsafe {
                command.pre_exec(move || {
                    libc::prctl(libc::PR_SET_PDEATHSIG, signal);
                    Ok(())
                });
            }
        }
        // PR_SET_PDEATHSIG fires when the *thread* that forked exits, and each test runs on a
        // thread of its own: fork from a thread that lives exactly as long as the child.
        let (sender, receiver) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || match command.spawn() {
            Ok(mut child) => {
                let _ = sender.send(Ok(child.id()));
                let _ = child.wait();
            }
            Err(err) => {
                let _ = sender.send(Err(err));
            }
        });
        let pid = receiver
            .recv_timeout(Duration::from_secs(30))
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        Ok(Self {
            pid,
            waiter: Some(waiter),
        })
    }

    /// CPU time (user + system) the process has used so far, from `/proc/<pid>/stat`.
    pub fn cpu_time(&self) -> Duration {
        cpu_time_of(self.pid).unwrap_or_default()
    }
}

impl Drop for TiedChild {
    fn drop(&mut self) {
        unsafe {
            libc::kill(-(self.pid as i32), libc::SIGKILL);
            libc::kill(self.pid as i32, libc::SIGKILL);
        }
        if let Some(waiter) = self.waiter.take() {
            let _ = waiter.join();
        }
    }
}

fn cpu_time_of(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / per_second))
}

/// Starts one `moto_server` from the repo's `.venv` on a free loopback port, with `env` added;
/// it dies with its [`TiedChild`]. Returns before it listens (see [`wait_for_moto`]).
fn start_moto(env: &[(&str, &str)]) -> std::io::Result<(TiedChild, u16)> {
    let python = repo_root().join(".venv/bin/python");
    if !python.exists() {
        return Err(std::io::Error::other(format!(
            "{} is missing: run scripts/bootstrap (scripts/test does it for you)",
            python.display()
        )));
    }
    let port = free_port();
    // moto's server, with DynamoDB's atomic conditional writes (see the script).
    let mut command = Command::new(&python);
    command
        .arg(repo_root().join("local/python/moto_atomic.py"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok((TiedChild::spawn(command, libc::SIGTERM)?, port))
}

/// Waits until the moto server on `port` listens; its endpoint.
fn wait_for_moto(port: u16) -> std::io::Result<String> {
    let addr = format!("127.0.0.1:{port}");
    if !wait_for_port(&addr, Duration::from_secs(60)) {
        return Err(std::io::Error::other(format!(
            "moto_server on {addr} did not start within 60 s"
        )));
    }
    Ok(format!("http://{addr}"))
}

/// One `moto_server`, started and listening, with `env` added.
pub fn spawn_moto(env: &[(&str, &str)]) -> std::io::Result<(TiedChild, String)> {
    let (process, port) = start_moto(env)?;
    Ok((process, wait_for_moto(port)?))
}

/// One moto process and, when the run is slowed down, the proxy in front of it.
pub struct MotoServer {
    pub service: &'static str,
    /// Where clients send requests: the proxy when there is one, else moto itself.
    pub endpoint: String,
    /// moto itself.
    pub direct: String,
    process: TiedChild,
    proxy_stats: Option<Arc<Stats>>,
    faults: Option<Arc<Faults>>,
}

impl MotoServer {
    pub fn cpu_time(&self) -> Duration {
        self.process.cpu_time()
    }
}

/// The three moto processes (and their proxies) of one test process or one test.
pub struct LocalAws {
    pub servers: Vec<MotoServer>,
    pub delay: Delay,
    /// Keeps the proxies' runtime alive; dropping it stops them.
    _proxies: Option<ProxyRuntime>,
}

struct ProxyRuntime {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ProxyRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

static SHARED: OnceLock<LocalAws> = OnceLock::new();

/// The local AWS of this test process, started on first use.
pub fn local_aws() -> &'static LocalAws {
    SHARED.get_or_init(LocalAws::launch)
}

/// An SDK configuration for the shared local AWS.
pub async fn aws_sdk_config() -> SdkConfig {
    local_aws().sdk_config().await
}

fn delay_from_env() -> Delay {
    match std::env::var(DELAY_VAR) {
        Ok(text) if !text.trim().is_empty() => {
            Delay::parse(&text).unwrap_or_else(|e| panic!("{DELAY_VAR}={text}: {e}"))
        }
        _ => Delay::None,
    }
}

impl LocalAws {
    /// Starts a fresh set, slowed down as `LOCAL_AWS_DELAY` says. Its processes stop on drop.
    pub fn launch() -> Self {
        Self::launch_with(delay_from_env())
    }

    pub fn launch_with(delay: Delay) -> Self {
        Self::launch_with_options(delay, false)
    }

    /// Like [`LocalAws::launch`], with a proxy in front of every service whose faults
    /// [`LocalAws::set_faults`] switches; none until then.
    pub fn launch_faultable() -> Self {
        Self::launch_with_options(delay_from_env(), true)
    }

    fn launch_with_options(delay: Delay, faultable: bool) -> Self {
        // Started together, waited for together: each takes about a second to import moto.
        let started: Vec<(&'static str, TiedChild, u16)> = SERVICES
            .into_iter()
            .map(|service| {
                let (process, port) = start_moto(&[]).expect("start moto_server");
                (service, process, port)
            })
            .collect();
        let upstreams: Vec<String> = started
            .iter()
            .map(|(service, _, port)| {
                wait_for_moto(*port).unwrap_or_else(|e| panic!("{service}: {e}"))
            })
            .collect();
        let (proxies, runtime) = if delay == Delay::None && !faultable {
            (vec![None; SERVICES.len()], None)
        } else {
            let (proxies, runtime) = start_proxies(upstreams.clone(), delay);
            (proxies.into_iter().map(Some).collect(), Some(runtime))
        };
        let servers = started
            .into_iter()
            .zip(upstreams)
            .zip(proxies)
            .map(|(((service, process, _), direct), proxy)| {
                let (endpoint, proxy_stats, faults) = match proxy {
                    Some((url, stats, faults)) => (url, Some(stats), Some(faults)),
                    None => (direct.clone(), None, None),
                };
                MotoServer {
                    service,
                    endpoint,
                    direct,
                    process,
                    proxy_stats,
                    faults,
                }
            })
            .collect();
        Self {
            servers,
            delay,
            _proxies: runtime,
        }
    }

    pub fn endpoint(&self, service: &str) -> &str {
        &self
            .servers
            .iter()
            .find(|s| s.service == service)
            .unwrap_or_else(|| panic!("no local {service}"))
            .endpoint
    }

    pub fn dynamodb(&self) -> &str {
        self.endpoint("DynamoDB")
    }
    pub fn sqs(&self) -> &str {
        self.endpoint("SQS")
    }
    pub fn s3(&self) -> &str {
        self.endpoint("S3")
    }

    /// An SDK configuration that sends each service to its own process, through its proxy
    /// if it has one: what the gateway uses.
    pub async fn sdk_config(&self) -> SdkConfig {
        self.config_for(|s| &s.endpoint).await
    }

    /// An SDK configuration straight to the moto processes, past any proxy: a test's own
    /// setup and checks, which must not meet the faults meant for the gateway.
    pub async fn direct_sdk_config(&self) -> SdkConfig {
        self.config_for(|s| &s.direct).await
    }

    /// Switches every proxy's faults: `plan` for DynamoDB, and the same rates with another
    /// seed for each further service; `None` turns them off. Panics without proxies
    /// ([`LocalAws::launch_faultable`]).
    pub fn set_faults(&self, plan: Option<&FaultPlan>) {
        for (n, server) in self.servers.iter().enumerate() {
            let faults = server
                .faults
                .as_ref()
                .expect("faults need LocalAws::launch_faultable");
            let plan = plan.map(|p| FaultPlan {
                seed: p.seed.wrapping_add(n as u64),
                ..p.clone()
            });
            faults.set(plan).expect("a valid fault plan");
        }
    }

    /// Faults each proxy injected so far, by service.
    pub fn fault_counts(&self) -> BTreeMap<&'static str, FaultCounts> {
        self.servers
            .iter()
            .filter_map(|s| Some((s.service, s.proxy_stats.as_ref()?.faults())))
            .collect()
    }

    async fn config_for(&self, endpoint: impl Fn(&MotoServer) -> &String) -> SdkConfig {
        let of = |service: &str| {
            endpoint(
                self.servers
                    .iter()
                    .find(|s| s.service == service)
                    .unwrap_or_else(|| panic!("no local {service}")),
            )
            .clone()
        };
        // No `endpoint_url` on the loader: one set in code would override every per-service one.
        aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
            .load()
            .await
            .into_builder()
            .service_config(ServiceEndpoints {
                dynamodb: of("DynamoDB"),
                sqs: of("SQS"),
                s3: of("S3"),
            })
            .build()
    }

    /// CPU time each moto process has used so far, by service.
    pub fn cpu_times(&self) -> BTreeMap<&'static str, Duration> {
        self.servers
            .iter()
            .map(|s| (s.service, s.cpu_time()))
            .collect()
    }

    /// Requests each proxy forwarded and the time it added, by service (empty when not slowed).
    pub fn proxy_stats(&self) -> BTreeMap<&'static str, (u64, Duration, Duration)> {
        self.servers
            .iter()
            .filter_map(|s| {
                let stats = s.proxy_stats.as_ref()?;
                Some((
                    s.service,
                    (stats.requests(), stats.upstream_time(), stats.added_time()),
                ))
            })
            .collect()
    }
}

/// The SDK's per-service endpoints (what `AWS_ENDPOINT_URL_DYNAMODB`, `…_SQS` and `…_S3` set
/// from the environment), given in code so tests never touch the process environment. Any
/// other service (Secrets Manager) shares the DynamoDB process.
#[derive(Debug)]
struct ServiceEndpoints {
    dynamodb: String,
    sqs: String,
    s3: String,
}

impl LoadServiceConfig for ServiceEndpoints {
    fn load_config(&self, key: ServiceConfigKey<'_>) -> Option<String> {
        if key.env() != "AWS_ENDPOINT_URL" {
            return None;
        }
        Some(match key.service_id() {
            "SQS" => self.sqs.clone(),
            "S3" => self.s3.clone(),
            _ => self.dynamodb.clone(),
        })
    }
}

/// The proxies run on a runtime of their own: a test's runtime ends with the test, and the
/// proxies serve every test of the process.
type StartedProxy = (String, Arc<Stats>, Arc<Faults>);

fn start_proxies(upstreams: Vec<String>, delay: Delay) -> (Vec<StartedProxy>, ProxyRuntime) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("proxy runtime");
        runtime.block_on(async move {
            let mut proxies = Vec::new();
            for upstream in &upstreams {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind a proxy port");
                let options = Options {
                    delay,
                    faults: None,
                };
                let proxy = aws_proxy::spawn_with(listener, upstream, options)
                    .await
                    .expect("start the AWS proxy");
                proxies.push((proxy.url(), proxy.stats, proxy.faults));
            }
            let _ = ready_tx.send(proxies);
            let _ = stop_rx.await;
        });
    });
    let proxies = ready_rx.recv().expect("proxies started");
    (
        proxies,
        ProxyRuntime {
            stop: Some(stop_tx),
            thread: Some(thread),
        },
    )
}

/// Messages waiting or in flight on an SQS queue; `None` when SQS does not answer.
pub async fn queue_depth(sqs: &aws_sdk_sqs::Client, queue_url: &str) -> Option<usize> {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let out = sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(A::ApproximateNumberOfMessages)
        .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .ok()?;
    let attrs = out.attributes()?;
    Some(
        [
            A::ApproximateNumberOfMessages,
            A::ApproximateNumberOfMessagesNotVisible,
        ]
        .iter()
        .filter_map(|a| attrs.get(a).and_then(|v| v.parse::<usize>().ok()))
        .sum(),
    )
}

/// The whole body of an S3 object; panics if it cannot be read (a test's own check).
pub async fn read_object(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
    s3.get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("get {bucket}/{key}: {e:?}"))
        .body
        .collect()
        .await
        .unwrap_or_else(|e| panic!("read {bucket}/{key}: {e:?}"))
        .into_bytes()
        .to_vec()
}
