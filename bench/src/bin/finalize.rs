//! Child process of the peak-memory figure. Wires the observer the way the webhook function
//! does and the finalizer the way the finalize function does (same environment variables),
//! hands one job over on the RunPod report given as its second argument and finalizes it, and
//! prints one JSON line with its resident set before and its peak (`VmHWM`) after each step.
//! Run by `gateway-bench`; not useful alone.
use std::time::Instant;

use gateway::ports::RunPodStatus;
use gateway_aws::wiring::Wiring;

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let job_id = args
        .next()
        .ok_or("usage: bench-finalize JOB_ID STATUS_JSON|@FILE")?;
    let status = args.next().ok_or("missing STATUS_JSON")?;
    // A report with inline images is too long for a command line: it comes in a file.
    let status: RunPodStatus = match status.strip_prefix('@') {
        Some(path) => serde_json::from_slice(&std::fs::read(path)?)?,
        None => serde_json::from_str(&status)?,
    };
    let wiring = Wiring::from_env().await?;
    let observer = wiring.observer()?;
    let finalizer = wiring.finalizer()?;
    let job = finalizer
        .store
        .get(&job_id)
        .await?
        .ok_or("no such job in the table")?;
    let rss_before_kb = status_kb("VmRSS");
    let hwm_before_kb = status_kb("VmHWM");
    let started = Instant::now();
    let handed = observer.observe(job, &status).await?;
    let hwm_after_handoff_kb = status_kb("VmHWM");
    let outcome = finalizer.finalize(&job_id, None).await?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "handed": format!("{handed:?}"),
            "outcome": format!("{outcome:?}"),
            "hwm_after_handoff_kb": hwm_after_handoff_kb,
            "rss_before_kb": rss_before_kb,
            "hwm_before_kb": hwm_before_kb,
            "hwm_after_kb": status_kb("VmHWM"),
            "elapsed_ms": elapsed_ms,
        })
    );
    Ok(())
}
