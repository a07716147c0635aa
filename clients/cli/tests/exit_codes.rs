//! The binary's exit codes where no gateway is needed: refused before any request, or nobody
//! listening. (The codes of API refusals and jobs are tested against the local stack in
//! `tests/tests/cli.rs`.)
use std::process::{Command, Output};

fn gateway(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .env("GATEWAY_URL", url)
        .env_remove("GATEWAY_TOKEN")
        .output()
        .expect("run the gateway binary")
}

/// A loopback URL nobody listens on.
fn nobody() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn help_names_every_subcommand_and_the_exit_codes() {
    let output = gateway(&nobody(), &["--help"]);
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8_lossy(&output.stdout);
    for command in [
        "submit",
        "status",
        "list",
        "cancel",
        "delete",
        "usage",
        "workflows",
        "deliveries",
    ] {
        assert!(help.contains(command), "{command} missing:\n{help}");
    }
    assert!(help.contains("Exit codes:"), "{help}");
    assert!(
        help.contains("GATEWAY_URL") && help.contains("GATEWAY_TOKEN"),
        "{help}"
    );
}

#[test]
fn bad_arguments_and_unusable_photos_exit_2_before_any_request() {
    let dir = std::env::temp_dir().join(format!("gateway-cli-exit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, b"not an image at all").unwrap();
    let notes = notes.to_str().unwrap();
    let url = nobody();
    for args in [
        &["submit", "/nonexistent/photo.jpg"][..],
        &["submit", notes][..],
        &["submit", notes, "--out", "restored"][..],
        &["submit", notes, "--param", "megapixels"][..],
        &["submit", notes, "--param", "seed=1", "--param", "seed=2"][..],
        &["status"][..],
        &["frobnicate"][..],
    ] {
        let output = gateway(&url, args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
    }
    let output = gateway(&url, &["submit", notes]);
    assert_eq!(
        stderr(&output).trim(),
        format!("error: {notes} is not a JPEG, PNG or WebP image")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_gateway_nobody_answers_for_exits_1_with_a_message_not_a_panic() {
    let output = gateway(&nobody(), &["status", "some-job"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr(&output);
    assert!(
        stderr.starts_with("error: cannot reach the gateway: "),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_gateway_url_that_is_not_one_is_a_usage_error() {
    let output = gateway("not a url", &["workflows"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}
