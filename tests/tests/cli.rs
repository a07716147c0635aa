//! The command-line client (`clients/cli`, the `gateway` binary) run as a person runs it, in a
//! child process against the local stack: its output, its files and its exit codes.
//!
//! Deadlines here are upper bounds against a hang, never a verdict on speed: each test waits
//! for what it expects to see (a line, an exit), however long the machine takes, up to them.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use gateway_tests::{jpeg, Stack, StackOptions, StatusCode, ALICE};
use runpod_emulator::Faults;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The longest any one run of the CLI may take before the test calls it hung.
const HANG: Duration = Duration::from_secs(300);

/// The `gateway` binary, built if it is missing or older than the client's sources. A
/// workspace build (`cargo test --workspace`) builds it next to the test binaries, for
/// `clients/cli/tests`; a run of this test alone (`-p gateway-tests`) does not, so the test
/// builds it itself, once.
/// The built-in worker holds each job an hour: jobs stay running until the test ends them.
fn worker_holds_jobs() -> Faults {
    Faults {
        worker_delay_ms: 3_600_000,
        ..Faults::default()
    }
}

fn gateway_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's own path");
        // <target>/<profile>/deps/<test binary> → <target>/<profile>/gateway
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary lies in <target>/<profile>/deps");
        let bin = profile_dir.join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
        if is_stale(&bin) {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = std::process::Command::new(cargo);
            build
                .args(["build", "-q", "-p", "gateway-cli", "--bin", "gateway"])
                .current_dir(repo_root());
            if profile_dir.file_name().is_some_and(|p| p == "release") {
                build.arg("--release");
            }
            let status = build.status().expect("run cargo build -p gateway-cli");
            assert!(status.success(), "cargo build -p gateway-cli failed");
        }
        assert!(
            bin.exists(),
            "{} is missing after building gateway-cli",
            bin.display()
        );
        bin
    })
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lies in the repository")
        .to_path_buf()
}

/// Missing, or older than any file of `clients/cli` (a binary left from an earlier build).
fn is_stale(bin: &Path) -> bool {
    fn newest(dir: &Path, newest_so_far: &mut SystemTime) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                newest(&path, newest_so_far);
            } else if let Ok(modified) = entry.metadata().and_then(|m| m.modified()) {
                *newest_so_far = (*newest_so_far).max(modified);
            }
        }
    }
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return true;
    };
    let mut sources = SystemTime::UNIX_EPOCH;
    newest(&repo_root().join("clients/cli"), &mut sources);
    sources > built
}

/// A fresh temporary folder, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("gateway-cli-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("create a temporary folder");
        Self(dir)
    }

    fn file(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("write a test file");
        path.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// `gateway ARGS` as Alice, against `url`.
fn command(url: &str, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(gateway_bin());
    command
        .args(args)
        .env("GATEWAY_URL", url)
        .env("GATEWAY_TOKEN", ALICE);
    gateway_tests::loopback_child(&mut command);
    command
}

async fn run_at(url: &str, args: &[&str]) -> Run {
    let child = command(url, args).spawn().expect("start the gateway CLI");
    let output = tokio::time::timeout(HANG, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("gateway {args:?} still running after {HANG:?}"))
        .expect("the CLI's output");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn gateway(stack: &Stack, args: &[&str]) -> Run {
    run_at(&stack.url(""), args).await
}

/// A PNG of random noise (which does not compress) of at least `min_bytes`.
fn noisy_png(min_bytes: usize) -> Vec<u8> {
    use rand::Rng as _;
    let side = ((min_bytes / 3) as f64).sqrt().ceil() as u32 + 8;
    let mut pixels = vec![0u8; (side * side * 3) as usize];
    rand::rng().fill(&mut pixels[..]);
    let image = image::RgbImage::from_raw(side, side, pixels).expect("a whole image");
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(image)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("encode the PNG");
    assert!(png.len() >= min_bytes, "{} bytes", png.len());
    png
}

/// The id in the `job <id> <state>` line `submit --wait` writes to stderr first.
fn job_id_in(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|line| line.strip_prefix("job ")?.split_whitespace().next())
        .unwrap_or_else(|| panic!("no job line in:\n{stderr}"))
        .to_string()
}

#[tokio::test]
async fn a_photo_over_the_inline_limit_is_uploaded_restored_and_saved() {
    let stack = Stack::start().await;
    let dir = TempDir::new();
    let photo = noisy_png(10 * 1024 * 1024);
    assert!(photo.len() as u64 > gateway_cli::photo::MAX_INLINE_BYTES);
    let photo = dir.file("big.png", &photo);
    let out = dir.0.join("restored");

    let run = gateway(
        &stack,
        &[
            "submit",
            &photo,
            "--param",
            "megapixels=0.05",
            "--wait",
            "--poll-interval",
            "0.2",
            "--out",
            &out.display().to_string(),
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    let job_id = job_id_in(&run.stderr);

    let (status, job) = stack.get(ALICE, &format!("/jobs/{job_id}")).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["params"]["megapixels"], 0.05, "{job}");
    let outputs = job["outputs"].as_array().unwrap();
    assert!(!outputs.is_empty(), "{job}");
    for output in outputs {
        let name = output["file_name"].as_str().unwrap();
        let saved = std::fs::read(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(saved.len() as u64, output["size"].as_u64().unwrap());
        let image = image::load_from_memory(&saved).expect("the output is an image");
        assert!(
            u64::from(image.width()) * u64::from(image.height()) < 200_000,
            "{}x{} is not a 0.05 MP restoration",
            image.width(),
            image.height()
        );
        assert!(
            run.stdout
                .contains(&format!("saved {}", out.join(name).display())),
            "{run:#?}"
        );
    }
    // It went through POST /uploads: Alice's upload is in the bucket, and the job's input is
    // that upload pinned (`input`), not an inline image (`input.png`).
    assert_eq!(
        stack
            .keys(&stack.uploads_bucket, "uploads/alice/")
            .await
            .len(),
        1
    );
    assert_eq!(
        stack
            .keys(&stack.uploads_bucket, &format!("inputs/alice/{job_id}/"))
            .await,
        vec![format!("inputs/alice/{job_id}/input")]
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_small_photo_goes_inline_and_json_prints_the_apis_body() {
    let stack = Stack::start().await;
    let dir = TempDir::new();
    let photo = dir.file("old.jpg", &jpeg(200, 150));

    let run = gateway(
        &stack,
        &["submit", &photo, "--json", "--param", "megapixels=0.05"],
    )
    .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    let accepted: Value = serde_json::from_str(&run.stdout).expect("stdout is JSON");
    assert_eq!(accepted["status"], "queued");
    let job_id = accepted["job_id"].as_str().unwrap();
    assert_eq!(
        stack
            .keys(&stack.uploads_bucket, &format!("inputs/alice/{job_id}/"))
            .await,
        vec![format!("inputs/alice/{job_id}/input.jpg")]
    );
    assert!(stack
        .keys(&stack.uploads_bucket, "uploads/")
        .await
        .is_empty());

    // Without --json the same command prints the id alone, for `id=$(gateway submit …)`.
    let run = gateway(&stack, &["submit", &photo]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.stdout.trim().len(), job_id.len(), "{run:#?}");
    stack.stop().await;
}

#[tokio::test]
async fn backend_pod_runs_the_job_on_the_comfyui_server_and_saves_its_output() {
    let stack = Stack::start().await;
    let dir = TempDir::new();
    let photo = dir.file("old.jpg", &jpeg(200, 150));
    let out = dir.0.join("out");

    let run = gateway(
        &stack,
        &[
            "submit",
            &photo,
            "--backend",
            "pod",
            "--param",
            "megapixels=0.05",
            "--wait",
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .await;

    assert_eq!(run.code, Some(0), "{run:#?}");
    let job_id = job_id_in(&run.stderr);
    let (_, job) = stack.get(ALICE, &format!("/jobs/{job_id}")).await;
    assert_eq!(job["backend"], "pod", "{job}");
    let saved: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().collect();
    assert_eq!(saved.len(), 1, "{run:#?}");
    image::open(saved[0].path()).expect("the saved output is an image");
    stack.stop().await;
}

#[tokio::test]
async fn wait_shows_the_workers_progress_and_exits_3_when_the_job_is_cancelled() {
    // The built-in worker reports 0.1 "loading workflow", then holds the job far longer than
    // the test lasts; the sweeper's polls (every 200 ms, each job every second) carry the
    // progress to the job. The test ends the job itself, by cancelling it.
    let stack = Stack::start_with(StackOptions {
        faults: worker_holds_jobs(),
        sweep_every: Duration::from_millis(200),
        extra_env: vec![
            ("STATUS_POLL_AFTER_SECS", "1".into()),
            ("STATUS_POLL_INTERVAL_SECS", "1".into()),
        ],
        ..StackOptions::default()
    })
    .await;
    let dir = TempDir::new();
    let photo = dir.file("old.jpg", &jpeg(200, 150));
    let mut child = command(
        &stack.url(""),
        &["submit", &photo, "--wait", "--poll-interval", "0.2"],
    )
    .spawn()
    .expect("start the gateway CLI");
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = tokio::time::Instant::now() + HANG;
    let mut seen: Vec<String> = Vec::new();
    while !seen.iter().any(|l| l.contains("loading workflow")) {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) => seen.push(line),
            Ok(None) => panic!("the CLI ended before showing progress: {seen:#?}"),
            Err(_) => panic!("no progress shown within {HANG:?}: {seen:#?}"),
        }
    }
    assert!(
        seen.contains(&"running 10% loading workflow".to_string()),
        "{seen:#?}"
    );
    let job_id = job_id_in(&seen.join("\n"));

    let (status, body) = stack
        .post_json(ALICE, &format!("/jobs/{job_id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let exit = tokio::time::timeout_at(deadline, child.wait())
        .await
        .expect("the CLI ends once the job has")
        .unwrap();
    while let Ok(Some(line)) = tokio::time::timeout_at(deadline, lines.recv()).await {
        seen.push(line);
    }
    assert_eq!(exit.code(), Some(3), "{seen:#?}");
    assert!(
        seen.iter().any(|l| l.starts_with(&format!(
            "error: job {job_id} cancelled: cancelled_by_client: "
        ))),
        "{seen:#?}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_job_that_fails_makes_submit_wait_exit_3_with_the_jobs_error() {
    let stack = Stack::start_with(StackOptions {
        faults: Faults {
            worker_fail_message: Some("CUDA error: out of memory (injected)".into()),
            ..Faults::default()
        },
        ..StackOptions::default()
    })
    .await;
    let dir = TempDir::new();
    let photo = dir.file("old.jpg", &jpeg(200, 150));
    let out = dir.0.join("never");

    let run = gateway(
        &stack,
        &[
            "submit",
            &photo,
            "--wait",
            "--poll-interval",
            "0.2",
            "--out",
            &out.display().to_string(),
        ],
    )
    .await;
    assert_eq!(run.code, Some(3), "{run:#?}");
    let job_id = job_id_in(&run.stderr);
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("error: job {job_id} failed: worker_failed: ")),
        "{run:#?}"
    );
    assert!(
        last.contains("CUDA error: out of memory (injected)"),
        "{run:#?}"
    );
    assert!(!out.exists(), "nothing to save from a failed job");
    stack.stop().await;
}

#[tokio::test]
async fn api_refusals_print_their_code_and_message_and_exit_1() {
    let stack = Stack::start().await;
    let unknown = uuid::Uuid::now_v7().to_string();

    let run = gateway(&stack, &["status", &unknown]).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert_eq!(
        run.stderr.trim(),
        "error: not_found: no such job",
        "{run:#?}"
    );
    assert!(run.stdout.is_empty(), "{run:#?}");

    let run = gateway(&stack, &["deliveries", &unknown]).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert_eq!(
        run.stderr.trim(),
        "error: not_found: no such job",
        "{run:#?}"
    );

    let run = gateway(&stack, &["list", "--status", "lost"]).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(
        run.stderr.starts_with("error: invalid_status: "),
        "{run:#?}"
    );

    let run = gateway(&stack, &["--token", "not-a-token", "list"]).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(run.stderr.starts_with("error: "), "{run:#?}");
    stack.stop().await;
}

#[tokio::test]
async fn workflows_prints_each_parameter_with_its_type_bounds_and_default() {
    let stack = Stack::start().await;
    let run = gateway(&stack, &["workflows"]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(
        run.stdout.lines().any(|l| l == "restore (version 1)"),
        "{}",
        run.stdout
    );
    let megapixels: Vec<&str> = run
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("megapixels "))
        .unwrap_or_else(|| panic!("no megapixels line:\n{}", run.stdout))
        .split_whitespace()
        .collect();
    assert_eq!(
        megapixels[..5],
        ["megapixels", "number", "[0.01,", "4.0]", "1.0"],
        "{}",
        run.stdout
    );

    let run = gateway(&stack, &["workflows", "--json"]).await;
    let body: Value = serde_json::from_str(&run.stdout).expect("stdout is JSON");
    let (_, api) = stack.get(ALICE, "/workflows").await;
    assert_eq!(body, api);
    stack.stop().await;
}

#[tokio::test]
async fn list_cancel_delete_and_usage_act_on_the_callers_jobs() {
    // Jobs stay running (the worker holds them) until the test cancels them.
    let stack = Stack::start_with(StackOptions {
        faults: worker_holds_jobs(),
        ..StackOptions::default()
    })
    .await;
    let dir = TempDir::new();
    let photo = dir.file("old.jpg", &jpeg(200, 150));
    let mut ids = Vec::new();
    for _ in 0..3 {
        let run = gateway(&stack, &["submit", &photo]).await;
        assert_eq!(run.code, Some(0), "{run:#?}");
        ids.push(run.stdout.trim().to_string());
    }

    // Pages of one, followed to the end: every job, newest first.
    let run = gateway(&stack, &["list", "--limit", "1", "--all", "--json"]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    let listed: Value = serde_json::from_str(&run.stdout).unwrap();
    let listed: Vec<&str> = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(listed, newest_first);
    let run = gateway(&stack, &["list", "--limit", "1"]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stdout.contains(&ids[2]), "{run:#?}");
    assert!(
        run.stderr.contains("more: gateway list --cursor"),
        "{run:#?}"
    );

    let run = gateway(&stack, &["cancel", &ids[0]]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.stdout.trim(), format!("{} cancelled", ids[0]));
    let run = gateway(&stack, &["cancel", &ids[0]]).await;
    assert_eq!(run.code, Some(1), "{run:#?}");

    let run = gateway(&stack, &["status", &ids[0], "--json"]).await;
    let job: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(job["status"], "cancelled");
    let day = &job["finished_at"].as_str().unwrap()[..10];
    let run = gateway(&stack, &["usage", "--from", day, "--to", day, "--json"]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    let usage: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(usage["total"]["cancelled"], 1, "{usage}");
    let run = gateway(&stack, &["usage", "--from", day, "--to", day]).await;
    assert!(
        run.stdout.lines().any(|l| l.starts_with("total")),
        "{run:#?}"
    );

    let run = gateway(&stack, &["delete", &ids[1]]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.stdout.trim(), format!("{} deleted", ids[1]));
    let run = gateway(&stack, &["status", &ids[1]]).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(run.stderr.starts_with("error: job_deleted: "), "{run:#?}");

    let run = gateway(&stack, &["status", &ids[2]]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stdout.starts_with("job "), "{run:#?}");
    assert!(run.stdout.contains(&ids[2]), "{run:#?}");
    for id in &ids[2..] {
        stack
            .post_json(ALICE, &format!("/jobs/{id}/cancel"), &json!({}))
            .await;
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_callback_asked_for_at_submit_shows_in_deliveries_and_redelivers() {
    let stack = Stack::start_with(StackOptions {
        extra_env: vec![("OUTBOUND_ALLOW_LOOPBACK", "true".into())],
        ..StackOptions::default()
    })
    .await;
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { StatusCode::NO_CONTENT }
        }),
    );
    let hook = format!(
        "http://{}/hook",
        gateway_tests::serve_on_loopback(app).await
    );
    let dir = TempDir::new();
    let photo = dir.file("old.jpg", &jpeg(200, 150));

    let run = gateway(
        &stack,
        &["submit", &photo, "--wait", "--callback-url", &hook],
    )
    .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    let job_id = job_id_in(&run.stderr);
    let deadline = std::time::Instant::now() + HANG;
    let delivery = loop {
        let run = gateway(&stack, &["deliveries", &job_id, "--json"]).await;
        assert_eq!(run.code, Some(0), "{run:#?}");
        let log: Value = serde_json::from_str(&run.stdout).unwrap();
        if log["deliveries"][0]["status"] == "delivered" {
            break log["deliveries"][0]["delivery_id"]
                .as_str()
                .unwrap()
                .to_string();
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let table = gateway(&stack, &["deliveries", &job_id]).await;
    assert!(
        table.stdout.contains(&delivery) && table.stdout.contains("job.succeeded"),
        "{table:#?}"
    );
    assert!(table.stdout.contains("delivered"), "{table:#?}");

    let run = gateway(&stack, &["redeliver", &job_id, &delivery]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stdout.contains("queued again"), "{run:#?}");
    while hits.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(std::time::Instant::now() < deadline, "never redelivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.stop().await;
}
