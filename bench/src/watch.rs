//! Figure 8: cold start under `cargo lambda watch`, cargo-lambda's own Lambda emulator, as a
//! check on figure 1's stub. cargo-lambda runs with `--only-lambda-apis` (its Runtime API and
//! invoke API, without building or starting anything) and the benchmark starts each release
//! binary against it, sends the first event through cargo-lambda's invoke API at once, and
//! times spawn → answer: init and the first event together. A second event gives the warm time.
//!
//! cargo-lambda hands every instance that polls its bare Runtime API path the events of its
//! default function, `_`, so one instance runs at a time.
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::coldstart::Subject;
use crate::common::{die_with_parent, ms, repo_root, BoxError, Summary};
use crate::lambda::Launch;
use crate::template::MemorySizes;

/// cargo-lambda as `scripts/bench` installs it (the build tools' virtualenv).
pub fn cargo_lambda() -> PathBuf {
    repo_root().join(".venv-build/bin/cargo-lambda")
}

/// `cargo lambda --version`, for the report.
pub fn version() -> String {
    std::process::Command::new(cargo_lambda())
        .args(["lambda", "--version"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// A running `cargo lambda watch --only-lambda-apis`; stopped on drop.
struct Watch {
    child: std::process::Child,
    port: u16,
}

impl Watch {
    async fn start(log: &std::path::Path) -> Result<Self, BoxError> {
        let program = cargo_lambda();
        if !program.exists() {
            return Err(format!(
                "{} is missing (scripts/bench installs it into .venv-build)",
                program.display()
            )
            .into());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut command = std::process::Command::new(program);
        // It reads the workspace's metadata (the binaries it may invoke), so it runs at the root.
        command
            .args(["lambda", "watch", "--only-lambda-apis", "-A", "127.0.0.1"])
            .args(["-P", &port.to_string()])
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        die_with_parent(&mut command);
        let child = command.spawn()?;
        let watch = Self { child, port };
        let give_up = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > give_up {
                return Err("cargo lambda watch did not listen within 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(watch)
    }

    fn runtime_api(&self) -> String {
        format!("http://127.0.0.1:{}/.rt", self.port)
    }

    fn invoke_url(&self) -> String {
        format!(
            "http://127.0.0.1:{}/2015-03-31/functions/_/invocations",
            self.port
        )
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Debug, Default)]
pub struct Figure {
    pub name: String,
    /// Spawn → the first event's answer.
    pub cold: Summary,
    pub warm: Summary,
    pub errors: Vec<String>,
}

pub async fn measure(
    subjects: &[Subject],
    env: &[(String, String)],
    template: &MemorySizes,
    runs: usize,
) -> Result<Vec<Figure>, BoxError> {
    let log = std::env::temp_dir().join("gateway-bench-watch.log");
    let _ = std::fs::remove_file(&log);
    let watch = Watch::start(&log).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let mut cold: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut warm: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut errors: HashMap<&str, Vec<String>> = HashMap::new();
    // One untimed start each, then interleaved rounds, as figure 1 does.
    for round in 0..=runs {
        for subject in subjects {
            match run_once(&watch, &http, subject, env, template, &log).await {
                Ok(_) if round == 0 => {}
                Ok((c, w)) => {
                    cold.entry(subject.name).or_default().push(c);
                    warm.entry(subject.name).or_default().push(w);
                }
                Err(err) => {
                    crate::progress!("cargo lambda watch: {} failed: {err}", subject.name);
                    errors
                        .entry(subject.name)
                        .or_default()
                        .push(err.to_string());
                }
            }
        }
        crate::progress!("cargo lambda watch: round {round}/{runs} done");
    }
    Ok(subjects
        .iter()
        .map(|s| Figure {
            name: s.name.to_string(),
            cold: Summary::of(cold.get(s.name).map_or(&[][..], Vec::as_slice)),
            warm: Summary::of(warm.get(s.name).map_or(&[][..], Vec::as_slice)),
            errors: errors.remove(s.name).unwrap_or_default(),
        })
        .collect())
}

async fn run_once(
    watch: &Watch,
    http: &reqwest::Client,
    subject: &Subject,
    env: &[(String, String)],
    template: &MemorySizes,
    log: &std::path::Path,
) -> Result<(f64, f64), BoxError> {
    let launch = Launch {
        name: subject.name.to_string(),
        program: subject.program.clone(),
        args: subject.args.clone(),
        cwd: subject.cwd.clone(),
        env: crate::coldstart::subject_env(subject, env, template),
        memory_mb: template.of(subject.function),
        cpu_share: None,
    };
    let mut command = launch.command(&watch.runtime_api(), log)?;
    let spawned = Instant::now();
    let mut child = command.spawn()?;
    let result = async {
        invoke(http, watch, subject, &subject.first_event).await?;
        let cold = spawned.elapsed();
        let sent = Instant::now();
        invoke(http, watch, subject, &subject.second_event).await?;
        Ok::<_, BoxError>((ms(cold), ms(sent.elapsed())))
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

async fn invoke(
    http: &reqwest::Client,
    watch: &Watch,
    subject: &Subject,
    event: &Value,
) -> Result<(), BoxError> {
    let response = http.post(watch.invoke_url()).json(event).send().await?;
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() {
        return Err(format!(
            "cargo-lambda answered {status}: {}",
            body.chars().take(300).collect::<String>()
        )
        .into());
    }
    crate::coldstart::check_response(subject.name, &body)
}
