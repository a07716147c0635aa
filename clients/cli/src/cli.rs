//! The command line, as clap reads it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use url::Url;

use crate::failure::EXIT_CODES_HELP;
use crate::params::parse_param;

#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about = "Command-line client of the RunPod job gateway: submit photos, follow jobs, fetch results.",
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// The gateway's base URL.
    #[arg(
        long,
        global = true,
        env = "GATEWAY_URL",
        default_value = "http://127.0.0.1:3000",
        value_parser = parse_base_url
    )]
    pub url: Url,

    /// The bearer token (`dev-token` is the local stack's owner `dev`).
    #[arg(
        long,
        global = true,
        env = "GATEWAY_TOKEN",
        default_value = "dev-token",
        hide_env_values = true
    )]
    pub token: String,

    /// Print the API's JSON body instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a photo as a job; with --wait, follow it to its end and fetch the results.
    Submit(SubmitArgs),
    /// Show a job: state, progress, GPU time, cost, error, outputs.
    Status { id: String },
    /// List your jobs, newest first.
    List(ListArgs),
    /// Cancel a job that has not ended.
    Cancel { id: String },
    /// Delete a job and everything it left (cancelling it first if it is in flight).
    Delete { id: String },
    /// Totals per UTC day over a range of days (both ends included).
    Usage {
        /// First day, YYYY-MM-DD.
        #[arg(long)]
        from: String,
        /// Last day, YYYY-MM-DD.
        #[arg(long)]
        to: String,
    },
    /// The workflows a job may run, and each one's parameters.
    Workflows,
    /// A job's callbacks: each delivery, its attempts and when the next is due.
    Deliveries { id: String },
    /// Send one of a job's callbacks again, now (DELIVERY: a `msg_…` id from `deliveries`).
    Redeliver { id: String, delivery: String },
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The photo: JPEG, PNG or WebP. Up to 4 MB it goes inline; larger ones through
    /// POST /uploads.
    pub photo: PathBuf,

    #[arg(long, default_value = "restore")]
    pub workflow: String,

    /// A workflow parameter (repeatable). VALUE is JSON when it parses (0.25, true),
    /// otherwise text. `gateway workflows` lists the parameters.
    #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
    pub params: Vec<(String, Value)>,

    /// Where to run the job: serverless or pod (a ComfyUI server on a pod). The gateway's
    /// default when left out.
    #[arg(long, value_name = "BACKEND", value_parser = ["serverless", "pod"])]
    pub backend: Option<String>,

    /// Where the gateway POSTs the job's signed callbacks (its end always).
    #[arg(long, value_name = "URL")]
    pub callback_url: Option<String>,

    /// With --callback-url: an event beyond the end to be told of (repeatable):
    /// job.running, job.progress.
    #[arg(
        long = "callback-event",
        value_name = "EVENT",
        requires = "callback_url"
    )]
    pub callback_events: Vec<String>,

    /// How long the gateway keeps the job's input and outputs.
    #[arg(long, value_name = "SECONDS")]
    pub retention_secs: Option<u64>,

    /// Sent as the Idempotency-Key header: the same key and request within the gateway's
    /// window answers the first job instead of creating another.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,

    /// Wait until the job ends, showing its progress on stderr.
    #[arg(long)]
    pub wait: bool,

    /// With --wait: download every output into DIR once the job succeeded.
    #[arg(long, value_name = "DIR", requires = "wait")]
    pub out: Option<PathBuf>,

    /// With --wait: seconds between two looks at the job.
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = parse_interval)]
    pub poll_interval: Duration,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only jobs in this state (queued, submitted, running, succeeded, failed, cancelled,
    /// timed_out).
    #[arg(long)]
    pub status: Option<String>,
    /// Jobs per page.
    #[arg(long)]
    pub limit: Option<u32>,
    /// Go on from a previous page's next_cursor.
    #[arg(long, conflicts_with = "all")]
    pub cursor: Option<String>,
    /// Follow next_cursor to the end and list every job.
    #[arg(long)]
    pub all: bool,
}

fn parse_base_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("`{text}` is not an http(s) URL"));
    }
    if url.cannot_be_a_base() || url.query().is_some() {
        return Err(format!("`{text}` cannot be a base URL"));
    }
    Ok(url)
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !(0.05..=3600.0).contains(&seconds) {
        return Err("the poll interval is 0.05 to 3600 seconds".into());
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("gateway").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_takes_repeated_params_typed_as_json_when_they_parse() {
        let cli = parse(&[
            "--url",
            "http://gw.test:8080",
            "submit",
            "old.jpg",
            "--param",
            "megapixels=0.05",
            "--param",
            "style=sepia",
            "--wait",
            "--out",
            "restored",
            "--poll-interval",
            "0.2",
        ])
        .unwrap();
        assert_eq!(cli.url.as_str(), "http://gw.test:8080/");
        let Command::Submit(submit) = cli.command else {
            panic!("not submit")
        };
        assert_eq!(
            submit.params,
            vec![
                ("megapixels".to_string(), serde_json::json!(0.05)),
                ("style".to_string(), serde_json::json!("sepia"))
            ]
        );
        assert_eq!(submit.workflow, "restore");
        assert_eq!(submit.poll_interval, Duration::from_millis(200));
    }

    #[test]
    fn global_options_may_follow_the_subcommand() {
        let cli = parse(&["status", "j1", "--json", "--token", "t"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.token, "t");
    }

    #[test]
    fn out_without_wait_is_a_usage_error() {
        let error = parse(&["submit", "old.jpg", "--out", "dir"]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::MissingRequiredArgument);
        assert_eq!(error.exit_code(), 2);
    }

    #[test]
    fn a_malformed_param_url_or_interval_is_a_usage_error() {
        for args in [
            &["submit", "old.jpg", "--param", "megapixels"][..],
            &["--url", "not a url", "workflows"][..],
            &["--url", "ftp://host", "workflows"][..],
            &["submit", "old.jpg", "--wait", "--poll-interval", "0"][..],
            &["submit", "old.jpg", "--wait", "--poll-interval", "soon"][..],
            &["list", "--all", "--cursor", "c"][..],
            &["usage", "--from", "2026-01-01"][..],
        ] {
            let error = parse(args).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{args:?}: {error}");
        }
    }
}
