//! The local runner: the gateway's five functions in one process, against the local stack.
//!
//! - the public API and the webhook receiver on one listener (the same routers Lambda serves);
//! - SQS long-pollers feeding batches of the dispatch queue and of the stop queue to the dispatch
//!   function's handler, several dispatch batches in flight at once (the event source's
//!   `MaximumConcurrency`), and the finalize queue to the finalize function's, one message at a
//!   time, deleting what succeeded and leaving failures to come back after the visibility
//!   timeout, as the Lambda event sources do;
//! - a sweeper tick and a janitor tick standing in for the EventBridge schedules.
pub mod resources;

use axum::serve::ListenerExt as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use gateway_aws::adapters::sqs::{
    handle_batch, handle_callback_batch, handle_finalize_batch, handle_poll_batch,
};
use gateway_aws::wiring::{BootError, Wiring};
use gateway_http::api::identity::IdentitySource;
use gateway_http::api::ApiState;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The runner's own settings: `gateway::config::LocalRunnerConfig`, read with the rest of the
/// configuration.
pub type RunnerOptions = gateway::config::LocalRunnerConfig;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("local resources: {0}")]
    Setup(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub struct Runner {
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Runner {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

pub async fn start(wiring: Wiring, options: RunnerOptions) -> Result<Runner, RunnerError> {
    let listener = tokio::net::TcpListener::bind(options.listen).await?;
    start_on(listener, wiring, options).await
}

/// Like [`start`], on a listener bound beforehand: callers that must know the address first
/// (to put it in `WEBHOOK_BASE_URL`) bind port 0 themselves.
pub async fn start_on(
    listener: tokio::net::TcpListener,
    wiring: Wiring,
    options: RunnerOptions,
) -> Result<Runner, RunnerError> {
    if options.create_resources {
        resources::ensure(&wiring, options.queue_visibility_secs)
            .await
            .map_err(RunnerError::Setup)?;
    }
    gateway_aws::metrics::install(&wiring.log);
    let identity = IdentitySource::dev_tokens_from_env(&wiring.env).map_err(BootError::from)?;
    let api = Arc::new(ApiState::new(wiring.api()?, wiring.callbacks()?, identity));
    let webhook = Arc::new(wiring.webhook()?);
    let consumer = Arc::new(wiring.consumer()?);
    let dispatch: Handler = Arc::new(move |event| {
        let consumer = consumer.clone();
        Box::pin(async move { handle_batch(&consumer, event).await })
    });
    let finalizer = Arc::new(wiring.finalizer()?);
    let finalize: Handler = Arc::new(move |event| {
        let finalizer = finalizer.clone();
        Box::pin(async move { handle_finalize_batch(&finalizer, event, None).await })
    });
    let callbacks = Arc::new(wiring.callbacks()?);
    let deliver: Handler = Arc::new(move |event| {
        let callbacks = callbacks.clone();
        Box::pin(async move { handle_callback_batch(&callbacks, event).await })
    });
    let sweeper = Arc::new(wiring.sweeper()?);
    let polled = sweeper.clone();
    let poll: Handler = Arc::new(move |event| {
        let sweeper = polled.clone();
        Box::pin(async move { handle_poll_batch(&sweeper, event).await })
    });
    let poll_queue_url = gateway::config::poll_queue_url(&wiring.env).map_err(BootError::from)?;
    let janitor = Arc::new(wiring.janitor()?);
    let sqs = aws_sdk_sqs::Client::new(&wiring.sdk);
    let queue_url = gateway::config::queue_url(&wiring.env).map_err(BootError::from)?;
    let stop_queue_url = gateway::config::stop_queue_url(&wiring.env).map_err(BootError::from)?;
    let finalize_queue_url =
        gateway::config::finalize_queue_url(&wiring.env).map_err(BootError::from)?;
    let callback_queue_url =
        gateway::config::callback_queue_url(&wiring.env).map_err(BootError::from)?;

    let app = gateway_http::api::router(api).merge(gateway_http::webhook::router(webhook));
    let addr = listener.local_addr()?;
    let (shutdown, watcher) = watch::channel(false);

    let mut server_stop = watcher.clone();
    let server = tokio::spawn(async move {
        let serve =
            axum::serve(listener.tap_io(no_delay), app).with_graceful_shutdown(async move {
                let _ = server_stop.changed().await;
            });
        if let Err(err) = serve.await {
            tracing::error!(error = %err, "local API server stopped");
        }
    });
    let mut tasks = vec![server];
    let concurrency = options.dispatch_concurrency.max(1);
    // (queue, handler, batch size, pollers): as each event source is set in the template.
    let sources = [
        (
            queue_url,
            dispatch.clone(),
            options.dispatch_batch_size.clamp(1, 10),
            concurrency,
        ),
        // One stop poller: in AWS the stop queue's event source is capped low, so that cancels
        // stay under RunPod's rate limit.
        (stop_queue_url, dispatch, 10, 1),
        // The finalize function's event source takes one message per invocation.
        (finalize_queue_url, finalize, 1, concurrency),
        // The callbacks function's event source: batches of ten, each attempt bounded by the
        // sender's timeout. Two pollers: local receivers are few, and each idle poller costs
        // moto a receive a second.
        (callback_queue_url, deliver, 10, 2),
        // The sweeper function's second event source: single checks of pod jobs.
        (poll_queue_url, poll, 10, 2),
    ];
    for (queue_url, handler, batch_size, pollers) in sources {
        for _ in 0..pollers {
            tasks.push(tokio::spawn(poll_queue(
                Poller {
                    sqs: sqs.clone(),
                    queue_url: queue_url.clone(),
                    handler: handler.clone(),
                    batch_size,
                },
                watcher.clone(),
            )));
        }
    }
    tasks.push(tokio::spawn(tick(
        options.sweep_every,
        watcher.clone(),
        move || {
            let sweeper = sweeper.clone();
            async move {
                if let Err(err) = sweeper.sweep().await {
                    tracing::warn!(error = %err, "sweep failed");
                }
            }
        },
    )));
    let watcher_metrics = watcher.clone();
    tasks.push(tokio::spawn(tick(
        options.janitor_every,
        watcher,
        move || {
            let janitor = janitor.clone();
            async move {
                janitor.run_before(None).await;
            }
        },
    )));
    // The functions flush their metrics after each invocation; the runner, hosting them all
    // in one process, flushes on a short tick instead.
    tasks.push(tokio::spawn(tick(
        METRICS_FLUSH_EVERY,
        watcher_metrics,
        || async { gateway_aws::metrics::flush() },
    )));
    tracing::info!(%addr, "local gateway listening");
    Ok(Runner {
        addr,
        shutdown,
        tasks,
    })
}

/// How often the runner writes the metrics its functions counted.
const METRICS_FLUSH_EVERY: Duration = Duration::from_millis(250);

/// A function's handler of an SQS batch, as its Lambda event source calls it.
type Handler =
    Arc<dyn Fn(SqsEvent) -> Pin<Box<dyn Future<Output = SqsBatchResponse> + Send>> + Send + Sync>;

struct Poller {
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    handler: Handler,
    batch_size: u8,
}

/// One of the event source's pollers: receive a batch, hand it to the consumer, delete what it
/// did not report as failed; the next batch only after this one is done.
async fn poll_queue(poller: Poller, mut stop: watch::Receiver<bool>) {
    let Poller {
        sqs,
        queue_url,
        handler,
        batch_size,
    } = poller;
    loop {
        let receive = sqs
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(i32::from(batch_size))
            .wait_time_seconds(1)
            // As Lambda's event source hands them over: the trace header with each record.
            .message_system_attribute_names(
                aws_sdk_sqs::types::MessageSystemAttributeName::AwsTraceHeader,
            )
            .send();
        let received = tokio::select! {
            _ = stop.changed() => return,
            received = receive => received,
        };
        let messages = match received {
            Ok(out) => out.messages.unwrap_or_default(),
            Err(err) => {
                tracing::warn!(error = ?err, "SQS receive failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if messages.is_empty() {
            continue;
        }
        let mut event = SqsEvent::default();
        let mut receipts = Vec::new();
        for message in messages {
            let mut record = SqsMessage::default();
            record.message_id = message.message_id.clone();
            record.receipt_handle = message.receipt_handle.clone();
            record.body = message.body.clone();
            if let Some(attributes) = &message.attributes {
                for (name, value) in attributes {
                    record
                        .attributes
                        .insert(name.as_str().to_string(), value.clone());
                }
            }
            receipts.push((
                message.message_id.unwrap_or_default(),
                message.receipt_handle,
            ));
            event.records.push(record);
        }
        let response = handler(event).await;
        for (message_id, receipt) in receipts {
            let failed = response
                .batch_item_failures
                .iter()
                .any(|f| f.item_identifier == message_id);
            if failed {
                continue;
            }
            if let Some(receipt) = receipt {
                if let Err(err) = sqs
                    .delete_message()
                    .queue_url(&queue_url)
                    .receipt_handle(receipt)
                    .send()
                    .await
                {
                    tracing::warn!(error = ?err, "SQS delete failed; the message will come back");
                }
            }
        }
    }
}

/// Runs `run` every `every`, as a schedule would, until told to stop.
async fn tick<F, Fut>(every: Duration, mut stop: watch::Receiver<bool>, run: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = interval.tick() => run().await,
        }
    }
}

/// Small responses go out at once: with Nagle's algorithm on, a response's last short segment
/// waits for the client's delayed ACK (40 ms on Linux), which showed as a 40 ms stall in most
/// object copies through this server.
fn no_delay(tcp: &mut tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
}
