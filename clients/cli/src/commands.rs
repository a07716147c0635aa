//! Each subcommand: the API calls it makes and what it prints (data on stdout, progress and
//! notes on stderr, so `--json` output stays parseable).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use crate::api::Client;
use crate::cli::{Cli, Command, ListArgs, SubmitArgs};
use crate::failure::Failure;
use crate::output::{err, out};
use crate::params::params_object;
use crate::photo::{self, Route};
use crate::progress::Reporter;
use crate::render;

/// Consecutive failed looks at a job, each a network blip or a 5xx, before `--wait` gives up.
const WAIT_TRANSIENT_TRIES: u32 = 10;

pub async fn run(cli: Cli) -> Result<(), Failure> {
    let client = Client::new(cli.url, cli.token)?;
    let json = cli.json;
    match cli.command {
        Command::Submit(args) => submit(&client, args, json).await,
        Command::Status { id } => {
            let job = client.job(&id).await?;
            print(json, &job, || render::job_details(&job));
            Ok(())
        }
        Command::List(args) => list(&client, args, json).await,
        Command::Cancel { id } => {
            let job = client.cancel(&id).await?;
            print(json, &job, || summary(&job));
            Ok(())
        }
        Command::Delete { id } => {
            let job = client.delete(&id).await?;
            print(json, &job, || summary(&job));
            Ok(())
        }
        Command::Usage { from, to } => {
            let usage = client.usage(&from, &to).await?;
            let table = render::usage_table(&usage).ok_or_else(|| no_field("days"))?;
            print(json, &usage, || table);
            Ok(())
        }
        Command::Workflows => {
            let workflows = client.workflows().await?;
            let text = render::workflows(&workflows).ok_or_else(|| no_field("workflows"))?;
            print(json, &workflows, || text);
            Ok(())
        }
        Command::Deliveries { id } => {
            let log = client.deliveries(&id).await?;
            let table = render::deliveries_table(&log).ok_or_else(|| no_field("deliveries"))?;
            print(json, &log, || table);
            Ok(())
        }
        Command::Redeliver { id, delivery } => {
            let again = client.redeliver(&id, &delivery).await?;
            print(json, &again, || {
                format!(
                    "{} {} queued again",
                    render::text(&again["delivery_id"]),
                    render::text(&again["type"])
                )
            });
            Ok(())
        }
    }
}

fn print(json: bool, body: &Value, text: impl FnOnce() -> String) {
    if json {
        crate::output::json(body);
    } else {
        out(text().trim_end());
    }
}

fn summary(job: &Value) -> String {
    format!(
        "{} {}",
        job["job_id"].as_str().unwrap_or("-"),
        job["status"].as_str().unwrap_or("-")
    )
}

fn no_field(field: &str) -> Failure {
    Failure::BadAnswer {
        status: None,
        detail: format!("no `{field}` in the answer"),
    }
}

async fn list(client: &Client, args: ListArgs, json: bool) -> Result<(), Failure> {
    let status = args.status.as_deref();
    let mut page = client
        .jobs(status, args.limit, args.cursor.as_deref())
        .await?;
    if !args.all {
        let jobs = page["jobs"].as_array().ok_or_else(|| no_field("jobs"))?;
        print(json, &page, || render::jobs_table(jobs));
        if !json {
            if let Some(cursor) = page["next_cursor"].as_str() {
                err(&format!("more: gateway list --cursor '{cursor}'"));
            }
        }
        return Ok(());
    }
    let mut jobs = Vec::new();
    let mut seen = HashSet::new();
    loop {
        jobs.extend(
            page["jobs"]
                .as_array()
                .ok_or_else(|| no_field("jobs"))?
                .iter()
                .cloned(),
        );
        let Some(cursor) = page["next_cursor"].as_str().map(str::to_string) else {
            break;
        };
        // A cursor seen before would page forever.
        if !seen.insert(cursor.clone()) {
            return Err(Failure::BadAnswer {
                status: None,
                detail: "the listing handed out the same cursor twice".into(),
            });
        }
        page = client.jobs(status, args.limit, Some(&cursor)).await?;
    }
    let all = json!({ "jobs": jobs });
    print(json, &all, || render::jobs_table(&jobs));
    Ok(())
}

/// The photo as it will travel: its size, content type and route.
struct Photo {
    path: PathBuf,
    len: u64,
    content_type: &'static str,
}

async fn open_photo(path: &Path) -> Result<Photo, Failure> {
    let unreadable =
        |e: std::io::Error| Failure::Usage(format!("cannot read {}: {e}", path.display()));
    let mut file = tokio::fs::File::open(path).await.map_err(unreadable)?;
    let metadata = file.metadata().await.map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(Failure::Usage(format!("{} is not a file", path.display())));
    }
    let mut head = Vec::with_capacity(photo::MAGIC_LEN);
    (&mut file)
        .take(photo::MAGIC_LEN as u64)
        .read_to_end(&mut head)
        .await
        .map_err(unreadable)?;
    let content_type = photo::content_type_of(&head).ok_or_else(|| {
        Failure::Usage(format!(
            "{} is not a JPEG, PNG or WebP image",
            path.display()
        ))
    })?;
    Ok(Photo {
        path: path.to_path_buf(),
        len: metadata.len(),
        content_type,
    })
}

async fn job_input(client: &Client, photo: &Photo, json: bool) -> Result<Value, Failure> {
    match photo::route_for(photo.len) {
        Route::Inline => {
            let bytes = tokio::fs::read(&photo.path).await.map_err(|e| {
                Failure::Usage(format!("cannot read {}: {e}", photo.path.display()))
            })?;
            let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
            Ok(json!({ "image_base64": encoded }))
        }
        Route::Upload => {
            let upload = client.create_upload(photo.content_type).await?;
            let upload_id = upload["upload_id"]
                .as_str()
                .ok_or_else(|| no_field("upload_id"))?
                .to_string();
            // Refused here with the gateway's own limit rather than by the bucket after
            // the bytes went over the wire.
            if let Some(max) = upload["max_bytes"].as_u64() {
                if photo.len > max {
                    return Err(Failure::Usage(format!(
                        "{} is {} bytes; the gateway takes photos up to {max} bytes",
                        photo.path.display(),
                        photo.len
                    )));
                }
            }
            if !json {
                err(&format!(
                    "uploading {} ({:.1} MB)",
                    photo.path.display(),
                    photo.len as f64 / 1e6
                ));
            }
            client
                .upload(&upload, &photo.path, photo.content_type)
                .await?;
            Ok(json!({ "upload_id": upload_id }))
        }
    }
}

async fn submit(client: &Client, args: SubmitArgs, json: bool) -> Result<(), Failure> {
    let params = params_object(&args.params)?;
    let photo = open_photo(&args.photo).await?;
    let input = job_input(client, &photo, json).await?;
    let mut request = json!({ "workflow": args.workflow, "params": params, "input": input });
    if let Some(url) = &args.callback_url {
        request["callback_url"] = json!(url);
        request["callback_events"] = json!(args.callback_events);
    }
    if let Some(retention) = args.retention_secs {
        request["retention_secs"] = json!(retention);
    }
    if let Some(backend) = &args.backend {
        request["backend"] = json!(backend);
    }
    let accepted = client
        .create_job(&request, args.idempotency_key.as_deref())
        .await?;
    let job_id = accepted["job_id"]
        .as_str()
        .ok_or_else(|| no_field("job_id"))?
        .to_string();
    if !args.wait {
        print(json, &accepted, || job_id.clone());
        return Ok(());
    }
    err(&format!(
        "job {job_id} {}",
        accepted["status"].as_str().unwrap_or("accepted")
    ));
    let mut reporter = Reporter::new(&accepted);
    let waited = tokio::select! {
        waited = wait(client, &job_id, args.poll_interval, &mut reporter) => waited,
        _ = tokio::signal::ctrl_c() => Err(Failure::Interrupted { job_id: job_id.clone() }),
    };
    reporter.finish();
    let job = waited?;
    let status = job["status"].as_str().unwrap_or("unknown").to_string();
    if json {
        crate::output::json(&job);
    }
    if status != "succeeded" {
        let error = job["error"]["code"].as_str().map(|code| {
            (
                code.to_string(),
                job["error"]["message"].as_str().unwrap_or("").to_string(),
            )
        });
        return Err(Failure::JobEnded {
            job_id,
            status,
            error,
        });
    }
    let outputs = job["outputs"].as_array().cloned().unwrap_or_default();
    if !json {
        out(&succeeded_line(&job));
    }
    match &args.out {
        Some(dir) => save_outputs(client, &outputs, dir, json).await,
        None => {
            if !json {
                for output in &outputs {
                    out(&format!(
                        "{}  {}",
                        output["file_name"].as_str().unwrap_or("-"),
                        output["url"].as_str().unwrap_or("-")
                    ));
                }
            }
            Ok(())
        }
    }
}

fn succeeded_line(job: &Value) -> String {
    let mut line = format!("job {} succeeded", job["job_id"].as_str().unwrap_or("-"));
    if let Some(seconds) = job["gpu_seconds"].as_f64() {
        line.push_str(&format!(", {seconds:.3} GPU seconds"));
    }
    if let Some(cost) = job["cost_usd"].as_f64() {
        line.push_str(&format!(", ${cost:.6}"));
    }
    line
}

/// Looks at the job every `interval` until it ends. A look that fails for a moment (network,
/// 5xx) is tried again: the job goes on meanwhile, and ending the wait would lose sight of it.
async fn wait(
    client: &Client,
    job_id: &str,
    interval: std::time::Duration,
    reporter: &mut Reporter,
) -> Result<Value, Failure> {
    let mut failed_looks = 0;
    loop {
        tokio::time::sleep(interval).await;
        match client.job(job_id).await {
            Ok(job) => {
                failed_looks = 0;
                reporter.update(&job);
                if render::is_terminal(&job) {
                    return Ok(job);
                }
                if !job["status"].is_string() {
                    return Err(no_field("status"));
                }
            }
            Err(failure) if failure.is_transient() && failed_looks < WAIT_TRANSIENT_TRIES => {
                failed_looks += 1;
                reporter.note(&format!("{failure}; looking again"));
            }
            Err(failure) => return Err(failure),
        }
    }
}

/// The name an output is saved under in `dir`: the last component of its `file_name`, so a
/// name like `../x` cannot leave `dir`, made unique among this job's outputs.
pub fn output_name(file_name: &str, index: usize, taken: &mut HashSet<String>) -> String {
    let base = Path::new(file_name)
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .map(str::to_string)
        .unwrap_or_else(|| format!("output-{}", index + 1));
    let mut name = base.clone();
    let mut n = 2;
    while !taken.insert(name.clone()) {
        name = match base.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() => format!("{stem}-{n}.{ext}"),
            _ => format!("{base}-{n}"),
        };
        n += 1;
    }
    name
}

async fn save_outputs(
    client: &Client,
    outputs: &[Value],
    dir: &Path,
    json: bool,
) -> Result<(), Failure> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| Failure::Io(format!("cannot create {}: {e}", dir.display())))?;
    let mut taken = HashSet::new();
    for (i, output) in outputs.iter().enumerate() {
        let url = output["url"]
            .as_str()
            .ok_or_else(|| no_field("outputs[].url"))?;
        let name = output_name(output["file_name"].as_str().unwrap_or(""), i, &mut taken);
        let path = dir.join(&name);
        let size = client.download(url, &path).await?;
        if let Some(expected) = output["size"].as_u64() {
            if size != expected {
                return Err(Failure::BadAnswer {
                    status: None,
                    detail: format!(
                        "{} is {size} bytes, the job says {expected}",
                        path.display()
                    ),
                });
            }
        }
        let line = format!("saved {} ({size} bytes)", path.display());
        // With --json, stdout holds the job's JSON alone.
        if json {
            err(&line);
        } else {
            out(&line);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_saved_under_their_own_name_inside_the_folder() {
        let mut taken = HashSet::new();
        assert_eq!(output_name("restored.png", 0, &mut taken), "restored.png");
        assert_eq!(output_name("../../etc/passwd", 1, &mut taken), "passwd");
        assert_eq!(output_name("..", 2, &mut taken), "output-3");
        assert_eq!(output_name("", 3, &mut taken), "output-4");
    }

    #[test]
    fn two_outputs_of_one_name_do_not_overwrite_each_other() {
        let mut taken = HashSet::new();
        assert_eq!(output_name("restored.png", 0, &mut taken), "restored.png");
        assert_eq!(output_name("restored.png", 1, &mut taken), "restored-2.png");
        assert_eq!(
            output_name("a/restored.png", 2, &mut taken),
            "restored-3.png"
        );
        assert_eq!(output_name("notes", 3, &mut taken), "notes");
        assert_eq!(output_name("notes", 4, &mut taken), "notes-2");
    }
}
