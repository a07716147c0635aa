//! The recorder behind the use cases' metrics (`gateway::metrics`): CloudWatch's embedded
//! metric format (EMF), through `metrics_cloudwatch_embedded`. Each function flushes after each
//! invocation; the lines go to stdout, which Lambda sends to CloudWatch Logs, which turns them
//! into metrics in the namespace `METRICS_NAMESPACE` (default `RunPodGateway`), dimension
//! `Service` = `METRICS_SERVICE` (the stack's name in the template). No `PutMetricData` call,
//! so no IAM permission and no latency on the request.
//!
//! A process has one recorder: the local runner, which hosts every function, installs it once,
//! and the tests capture what it flushes instead of printing it.
use std::sync::{Mutex, OnceLock};

use gateway::config::LogConfig;
use metrics_cloudwatch_embedded::Collector;

static COLLECTOR: OnceLock<Option<&'static Collector>> = OnceLock::new();
/// Flushed lines kept in memory instead of printed (`capture`), for tests.
static CAPTURED: Mutex<Option<Vec<String>>> = Mutex::new(None);
/// The most lines kept while capturing; older ones go first.
const CAPTURED_LINES: usize = 100_000;

/// Installs the recorder for the process, once. The function is named in each line (a
/// property, not a dimension: the alarms add up every function's jobs).
pub fn install(log: &LogConfig) -> Option<&'static Collector> {
    *COLLECTOR.get_or_init(|| {
        match metrics_cloudwatch_embedded::Builder::new()
            .cloudwatch_namespace(log.metrics_namespace.clone())
            .with_dimension("Service", log.metrics_service.clone())
            .init()
        {
            Ok(collector) => {
                collector.set_property("function", log.function.clone());
                gateway::metrics::describe();
                Some(collector)
            }
            Err(err) => {
                tracing::warn!(error = %err, "no metrics recorder");
                None
            }
        }
    })
}

/// Writes what was counted since the last flush: one EMF line per set of dimensions, to
/// stdout, or to memory while capturing. Nothing is written when nothing was counted.
pub fn flush() {
    let Some(Some(collector)) = COLLECTOR.get() else {
        return;
    };
    let mut captured = CAPTURED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(lines) = captured.as_mut() {
        let mut out = Vec::new();
        if collector.flush(&mut out).is_ok() {
            lines.extend(String::from_utf8_lossy(&out).lines().map(str::to_string));
            let over = lines.len().saturating_sub(CAPTURED_LINES);
            lines.drain(..over);
        }
        return;
    }
    drop(captured);
    if let Err(err) = collector.flush(std::io::stdout().lock()) {
        tracing::warn!(error = %err, "could not write metrics");
    }
}

/// From now on, flushed lines are kept in memory (read with [`captured`]) instead of printed.
pub fn capture() {
    let mut captured = CAPTURED.lock().unwrap_or_else(|e| e.into_inner());
    captured.get_or_insert_with(Vec::new);
}

/// The lines flushed while capturing, oldest first.
pub fn captured() -> Vec<String> {
    CAPTURED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// Runs one invocation's work, then flushes what it counted: Lambda may freeze the process as
/// soon as the handler returns.
pub async fn flushed<T>(work: impl std::future::Future<Output = T>) -> T {
    let result = work.await;
    flush();
    result
}
