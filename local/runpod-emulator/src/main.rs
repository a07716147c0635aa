//! `runpod-emulator`: runs the emulator until Ctrl-C. Every setting is a flag `--name value`
//! (or `--name=value`) or the env var `RUNPOD_EMULATOR_<NAME>`; the flag wins.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use runpod_emulator::{EmulatorConfig, Faults};

/// (flag/env name, description). The env var is `RUNPOD_EMULATOR_` + upper snake case.
const SETTINGS: &[(&str, &str)] = &[
    ("api-addr", "endpoint API listen address [127.0.0.1:8090]"),
    ("s3-addr", "volume S3 API listen address [127.0.0.1:8091]"),
    (
        "volume-dir",
        "network volume root directory [.local/volume]",
    ),
    ("endpoint-id", "endpoint id in /v2/{id}/ [local-endpoint]"),
    ("api-key", "API key [test-runpod-key]"),
    ("volume-id", "S3 bucket name of the volume [local-volume]"),
    ("volume-access-key", "S3 access key id [user_local]"),
    ("volume-secret-key", "S3 secret key [rps_local-secret]"),
    (
        "mount-prefix",
        "volume mount path inside the worker [/runpod-volume]",
    ),
    (
        "webhook-retry-delay-ms",
        "pause between webhook attempts [10000]",
    ),
    ("webhook-attempts", "webhook attempts in total [3]"),
    ("webhook-timeout-ms", "per-attempt webhook timeout [10000]"),
    (
        "result-retention-ms",
        "/run result retention after completion [1800000]",
    ),
    (
        "runsync-result-retention-ms",
        "/runsync result retention [60000]",
    ),
    (
        "min-execution-timeout-ms",
        "lowest accepted policy.executionTimeout [5000]",
    ),
    ("min-ttl-ms", "lowest accepted policy.ttl [10000]"),
    (
        "ttl-covers-results",
        "TTL also ends finished results early: true|false [false]",
    ),
    (
        "worker-concurrency",
        "built-in workers, always up, when --workers-min/max are unset [2]",
    ),
    (
        "workers-max",
        "RunPod max workers: most built-in workers up [worker-concurrency]",
    ),
    (
        "workers-min",
        "RunPod active workers: always up; others start for normal-priority jobs only [workers-max]",
    ),
    (
        "worker-idle-timeout-ms",
        "a worker above the minimum goes down after this long idle [5000]",
    ),
    (
        "low-priority-last",
        "UNCONFIRMED: free workers take normal-priority jobs before lowPriority ones: true|false [false]",
    ),
    (
        "builtin-worker",
        "run the built-in worker: true|false [true]",
    ),
    (
        "s3-reject-presigned",
        "refuse presigned S3 URLs like RunPod: true|false [true]",
    ),
    (
        "s3-list-staging-folder",
        "UNCONFIRMED: .s3compat_uploads/ shows in volume listings: true|false [false]",
    ),
    (
        "s3-list-empty-folders",
        "volume listings show an empty folder as key 'dir/': true|false [true]",
    ),
    (
        "s3-delete-removes-empty-folder",
        "UNCONFIRMED: DeleteObject 'dir/' removes an empty folder: true|false [true]",
    ),
    (
        "s3-repeat-token-above",
        "recursive ListObjectsV2 repeats its page and token past N keys; 'none' never [10000]",
    ),
    (
        "s3-repeat-token-delimited",
        "UNCONFIRMED: listings with a Delimiter repeat past N keys too: true|false [false]",
    ),
    (
        "worker-poll-hold-ms",
        "job-take/job-stop long-poll hold for external workers [55000]",
    ),
    (
        "job-done-max-bytes",
        "UNCONFIRMED: largest job-done body; above it 400 + COMPLETED without output [20971520]",
    ),
    (
        "s3-config-job-key",
        "UNCONFIRMED: job key carrying s3Config to workers; 'none' drops it [s3Config]",
    ),
    ("job-id-suffix", "UNCONFIRMED: suffix of job ids [-e1]"),
    (
        "faults",
        "initial faults as JSON, e.g. '{\"webhooks_enabled\":false}'",
    ),
    ("log", "tracing filter (also RUST_LOG) [info]"),
];

fn env_name(setting: &str) -> String {
    format!(
        "RUNPOD_EMULATOR_{}",
        setting.replace('-', "_").to_ascii_uppercase()
    )
}

fn usage() -> String {
    let mut text = String::from(
        "runpod-emulator: a local RunPod serverless endpoint and network-volume S3 API\n\nOptions (flag or env var):\n",
    );
    for (name, help) in SETTINGS {
        text.push_str(&format!("  --{name:<30} {:<45} {help}\n", env_name(name)));
    }
    text
}

struct Settings {
    flags: HashMap<String, String>,
}

impl Settings {
    fn parse(args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut flags = HashMap::new();
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(format!("unexpected argument '{arg}'"));
            };
            let (name, value) = match flag.split_once('=') {
                Some((name, value)) => (name.to_owned(), value.to_owned()),
                None => {
                    let value = args
                        .next()
                        .ok_or_else(|| format!("--{flag} needs a value"))?;
                    (flag.to_owned(), value)
                }
            };
            if !SETTINGS.iter().any(|(known, _)| *known == name) {
                return Err(format!("unknown option --{name}"));
            }
            flags.insert(name, value);
        }
        Ok(Self { flags })
    }

    fn raw(&self, name: &str) -> Option<String> {
        self.flags
            .get(name)
            .cloned()
            .or_else(|| std::env::var(env_name(name)).ok())
            .filter(|v| !v.is_empty())
    }

    fn get<T: FromStr>(&self, name: &str) -> Result<Option<T>, String>
    where
        T::Err: std::fmt::Display,
    {
        self.raw(name)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|e| format!("--{name} / {}: {e}", env_name(name)))
            })
            .transpose()
    }

    fn millis(&self, name: &str) -> Result<Option<Duration>, String> {
        Ok(self.get::<u64>(name)?.map(Duration::from_millis))
    }
}

fn build(settings: &Settings) -> Result<(EmulatorConfig, SocketAddr, SocketAddr), String> {
    let mut c = EmulatorConfig::default();
    let api_addr = settings
        .get("api-addr")?
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8090)));
    let s3_addr = settings
        .get("s3-addr")?
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8091)));
    if let Some(v) = settings.get::<PathBuf>("volume-dir")? {
        c.volume_dir = v;
    }
    for (name, field) in [
        ("endpoint-id", &mut c.endpoint_id),
        ("api-key", &mut c.api_key),
        ("volume-id", &mut c.volume_id),
        ("volume-access-key", &mut c.volume_access_key),
        ("volume-secret-key", &mut c.volume_secret_key),
        ("mount-prefix", &mut c.mount_prefix),
    ] {
        if let Some(v) = settings.raw(name) {
            *field = v;
        }
    }
    for (name, field) in [
        ("webhook-retry-delay-ms", &mut c.webhook_retry_delay),
        ("webhook-timeout-ms", &mut c.webhook_timeout),
        ("result-retention-ms", &mut c.result_retention),
        (
            "runsync-result-retention-ms",
            &mut c.runsync_result_retention,
        ),
        ("min-execution-timeout-ms", &mut c.min_execution_timeout),
        ("min-ttl-ms", &mut c.min_ttl),
        ("worker-poll-hold-ms", &mut c.worker_poll_hold),
        ("worker-idle-timeout-ms", &mut c.worker_idle_timeout),
    ] {
        if let Some(v) = settings.millis(name)? {
            *field = v;
        }
    }
    for (name, field) in [
        ("ttl-covers-results", &mut c.ttl_covers_results),
        ("builtin-worker", &mut c.builtin_worker),
        ("low-priority-last", &mut c.low_priority_last),
        ("s3-reject-presigned", &mut c.s3_reject_presigned),
        ("s3-list-staging-folder", &mut c.s3_list_staging_folder),
        ("s3-list-empty-folders", &mut c.s3_list_empty_folders),
        (
            "s3-delete-removes-empty-folder",
            &mut c.s3_delete_removes_empty_folder,
        ),
        (
            "s3-repeat-token-delimited",
            &mut c.s3_repeat_token_delimited,
        ),
    ] {
        if let Some(v) = settings.get(name)? {
            *field = v;
        }
    }
    if let Some(v) = settings.get("webhook-attempts")? {
        c.webhook_attempts = v;
    }
    if let Some(v) = settings.get("worker-concurrency")? {
        c.worker_concurrency = v;
    }
    if let Some(v) = settings.get("workers-max")? {
        c.workers_max = Some(v);
    }
    if let Some(v) = settings.get("workers-min")? {
        c.workers_min = Some(v);
    }
    if let Some(v) = settings.get("job-done-max-bytes")? {
        c.job_done_max_bytes = v;
    }
    if let Some(v) = settings.raw("s3-repeat-token-above") {
        c.s3_repeat_token_above = if v.eq_ignore_ascii_case("none") {
            None
        } else {
            Some(
                v.parse()
                    .map_err(|e| format!("--s3-repeat-token-above: {e}"))?,
            )
        };
    }
    if let Some(v) = settings.raw("s3-config-job-key") {
        c.s3_config_job_key = (!v.eq_ignore_ascii_case("none")).then_some(v);
    }
    if let Some(v) = settings.raw("job-id-suffix") {
        c.job_id_suffix = v;
    }
    if let Some(json) = settings.raw("faults") {
        c.faults = serde_json::from_str::<Faults>(&json).map_err(|e| format!("--faults: {e}"))?;
    }
    Ok((c, api_addr, s3_addr))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{}", usage());
        return ExitCode::SUCCESS;
    }
    let settings = match Settings::parse(args.into_iter()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}\n\n{}", usage());
            return ExitCode::from(2);
        }
    };
    let filter = settings
        .raw("log")
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let (config, api_addr, s3_addr) = match build(&settings) {
        Ok(built) => built,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let emulator = match runpod_emulator::spawn(config, api_addr, s3_addr).await {
        Ok(emulator) => emulator,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        endpoint = %emulator.endpoint_url(),
        s3 = %emulator.s3_url,
        bucket = %emulator.volume_id,
        volume_dir = %emulator.volume_dir.display(),
        "ready; Ctrl-C to stop"
    );
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::error!(error = %e, "cannot listen for Ctrl-C");
    }
    tracing::info!("shutting down");
    emulator.shutdown().await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_defaults() {
        let args = [
            "--api-addr",
            "127.0.0.1:9000",
            "--webhook-retry-delay-ms=100",
            "--builtin-worker",
            "false",
        ];
        let settings = Settings::parse(args.iter().map(|s| s.to_string())).unwrap();
        let (config, api, _) = build(&settings).unwrap();
        assert_eq!(api.port(), 9000);
        assert_eq!(config.webhook_retry_delay, Duration::from_millis(100));
        assert!(!config.builtin_worker);
    }

    #[test]
    fn volume_listing_switches_are_flags() {
        let args = [
            "--s3-list-staging-folder=true",
            "--s3-list-empty-folders=false",
            "--s3-delete-removes-empty-folder=false",
            "--s3-repeat-token-above=none",
            "--s3-repeat-token-delimited=true",
        ];
        let settings = Settings::parse(args.iter().map(|s| s.to_string())).unwrap();
        let (config, _, _) = build(&settings).unwrap();
        assert!(config.s3_list_staging_folder);
        assert!(!config.s3_list_empty_folders);
        assert!(!config.s3_delete_removes_empty_folder);
        assert_eq!(config.s3_repeat_token_above, None);
        assert!(config.s3_repeat_token_delimited);

        let settings = Settings::parse(
            ["--s3-repeat-token-above", "5"]
                .iter()
                .map(|s| s.to_string()),
        )
        .unwrap();
        assert_eq!(build(&settings).unwrap().0.s3_repeat_token_above, Some(5));
    }

    #[test]
    fn worker_scaling_settings_are_flags() {
        let args = [
            "--workers-min=0",
            "--workers-max=3",
            "--worker-idle-timeout-ms=250",
            "--low-priority-last=true",
        ];
        let settings = Settings::parse(args.iter().map(|s| s.to_string())).unwrap();
        let (config, _, _) = build(&settings).unwrap();
        assert_eq!(config.worker_bounds(), (0, 3));
        assert_eq!(config.worker_idle_timeout, Duration::from_millis(250));
        assert!(config.low_priority_last);
    }

    #[test]
    fn unset_worker_bounds_follow_worker_concurrency() {
        let settings =
            Settings::parse(["--worker-concurrency", "4"].iter().map(|s| s.to_string())).unwrap();
        let (config, _, _) = build(&settings).unwrap();
        assert_eq!(config.worker_bounds(), (4, 4));
        assert!(!config.low_priority_last);
    }

    #[test]
    fn unknown_flags_are_rejected() {
        assert!(Settings::parse(["--nope", "1"].iter().map(|s| s.to_string())).is_err());
    }
}
