//! Figure 6: submit throughput. `POST /jobs` (inline image) at a fixed concurrency through the
//! local runner, against the same moto and the same concurrency as the raw baseline: the
//! PutItem and SendMessage the submit path makes, straight through the SDK. Also the API router
//! alone (the runner's HTTP part without its SQS poller dispatching the jobs meanwhile), which
//! separates our submit code from the dispatch load the runner adds to moto. Queues nobody
//! consumes are purged before each measurement: moto's SendMessage slows down as a queue grows.
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use futures::StreamExt;
use gateway::ports::{JobQueue, JobStore};
use gateway_http::api::identity::IdentitySource;

use crate::common::{
    gateway_env, jpeg, new_job, now_ms, restore_request, BoxError, Names, Summary, DEV_TOKEN, OWNER,
};

#[derive(Clone, Debug, Default)]
pub struct Figure {
    pub concurrency: usize,
    pub requests: usize,
    pub image_bytes: usize,
    pub runner: Summary,
    /// The runner with per-tenant in-flight limits off (`TENANT_MAX_IN_FLIGHT=0`): no job takes
    /// a slot of its owner's, so the difference is what the holds cost the local stack.
    pub runner_unheld: Summary,
    pub api_only: Summary,
    pub raw: Summary,
    pub raw_with_s3: Summary,
    /// Runner ÷ the fair baseline (PutObject + PutItem + SendMessage), per round: the headline.
    pub ratio: Summary,
    /// Runner ÷ PutItem + SendMessage alone, kept for comparison with earlier reports.
    pub ratio_two_calls: Summary,
    pub errors: Vec<String>,
}

/// Runs `count` operations, `concurrency` at a time; returns successes per second.
async fn rate<F, Fut>(count: usize, concurrency: usize, op: F) -> (f64, usize)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    let ok = futures::stream::iter(0..count)
        .map(op)
        .buffer_unordered(concurrency)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    (ok as f64 / started.elapsed().as_secs_f64(), ok)
}

async fn queue_drained(sqs: &aws_sdk_sqs::Client, queue_url: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let depth = testkit::local_aws::queue_depth(sqs, queue_url)
            .await
            .unwrap_or(0);
        if depth == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Empties a queue nobody consumes. moto's SendMessage walks the whole queue (its attributes
/// count the visible messages), so a growing queue would slow the later rounds down.
async fn purge(sqs: &aws_sdk_sqs::Client, queue_url: &str) {
    let _ = sqs.purge_queue().queue_url(queue_url).send().await;
}

pub async fn measure(
    sdk: &SdkConfig,
    moto: &str,
    requests: usize,
    concurrency: usize,
    runs: usize,
) -> Result<Figure, BoxError> {
    // The worker is off: dispatch still copies each input to the volume and calls /run, but no
    // image work competes for the CPU.
    let emulator = crate::common::emulator(false).await?;

    // The local runner, whole; and again without per-tenant in-flight limits.
    let start_runner = async |label: &str, held: bool| {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let names = Names::fresh(moto, label);
        let mut env = gateway_env(moto, &emulator, &names, &url);
        if !held {
            env.retain(|(k, _)| k != "TENANT_MAX_IN_FLIGHT");
            env.push(("TENANT_MAX_IN_FLIGHT".into(), "0".into()));
        }
        let wiring = crate::common::wiring(sdk, &env).await?;
        let runner = crate::common::runner(listener, wiring).await?;
        Ok::<_, BoxError>((runner, url, names))
    };
    let (runner, runner_url, runner_names) = start_runner("tput-runner", true).await?;
    let (unheld, unheld_url, unheld_names) = start_runner("tput-unheld", false).await?;

    // The API router alone, on resources of its own (nobody consumes its queue).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api_url = format!("http://{}", listener.local_addr()?);
    let api_names = Names::fresh(moto, "tput-api");
    let api_wiring =
        crate::common::wiring(sdk, &gateway_env(moto, &emulator, &api_names, &api_url)).await?;
    let identity = IdentitySource::dev_tokens_from_env(&api_wiring.env)?;
    let app = gateway_http::api::router(Arc::new(gateway_http::api::ApiState::new(
        api_wiring.api()?,
        api_wiring.callbacks()?,
        identity,
    )));
    let api_server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    // The raw baseline: the same PutItem (conditional, same item) and SendMessage, no HTTP.
    let raw_names = Names::fresh(moto, "tput-raw");
    let raw_wiring =
        crate::common::wiring(sdk, &gateway_env(moto, &emulator, &raw_names, &api_url)).await?;
    let store = raw_wiring.job_store()?;
    let queue = raw_wiring.queue()?;
    let uploads = raw_wiring.uploads()?;

    let image = jpeg(320, 240);
    let body = bytes::Bytes::from(restore_request(&image).to_string());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let post = |url: String| {
        let http = http.clone();
        let body = body.clone();
        async move {
            match http
                .post(url)
                .bearer_auth(DEV_TOKEN)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
            {
                Ok(response) => response.status() == 202,
                Err(_) => false,
            }
        }
    };
    let raw_op = |with_s3: bool| {
        let store = store.clone();
        let queue = queue.clone();
        let uploads = uploads.clone();
        let image = bytes::Bytes::from(image.clone());
        move |_| {
            let store = store.clone();
            let queue = queue.clone();
            let uploads = uploads.clone();
            let image = image.clone();
            async move {
                let job = new_job(OWNER, now_ms());
                if with_s3 {
                    use gateway::ports::ObjectStore;
                    if uploads
                        .put_bytes(&job.input.key, image, "image/jpeg")
                        .await
                        .is_err()
                    {
                        return false;
                    }
                }
                store.create(&job).await.is_ok() && queue.enqueue(&job.id, None).await.is_ok()
            }
        }
    };

    // Warm every path's connections first.
    let _ = rate(concurrency, concurrency, |_| {
        post(format!("{runner_url}/jobs"))
    })
    .await;
    let _ = rate(concurrency, concurrency, |_| {
        post(format!("{unheld_url}/jobs"))
    })
    .await;
    let _ = rate(concurrency, concurrency, |_| {
        post(format!("{api_url}/jobs"))
    })
    .await;
    let _ = rate(concurrency, concurrency, raw_op(true)).await;
    queue_drained(&sqs, &runner_names.queue_url, Duration::from_secs(60)).await;
    queue_drained(&sqs, &unheld_names.queue_url, Duration::from_secs(60)).await;

    let mut figure = Figure {
        concurrency,
        requests,
        image_bytes: image.len(),
        ..Figure::default()
    };
    let mut unheld_rates = vec![];
    let (mut runner_rates, mut api_rates, mut raw_rates, mut raw_s3_rates, mut ratios) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut two_call_ratios = vec![];
    // Interleaved, so that drift on the machine touches every variant alike.
    for round in 0..runs {
        purge(&sqs, &raw_names.queue_url).await;
        let (raw, raw_ok) = rate(requests, concurrency, raw_op(false)).await;
        purge(&sqs, &raw_names.queue_url).await;
        let (raw_s3, raw_s3_ok) = rate(requests, concurrency, raw_op(true)).await;
        purge(&sqs, &api_names.queue_url).await;
        let (api, api_ok) = rate(requests, concurrency, |_| post(format!("{api_url}/jobs"))).await;
        let (run, run_ok) = rate(requests, concurrency, |_| {
            post(format!("{runner_url}/jobs"))
        })
        .await;
        queue_drained(&sqs, &runner_names.queue_url, Duration::from_secs(120)).await;
        let (free, free_ok) = rate(requests, concurrency, |_| {
            post(format!("{unheld_url}/jobs"))
        })
        .await;
        for (name, ok) in [
            ("runner without tenant limits", free_ok),
            ("raw", raw_ok),
            ("raw+S3", raw_s3_ok),
            ("API", api_ok),
            ("runner", run_ok),
        ] {
            if ok != requests {
                figure
                    .errors
                    .push(format!("round {round}: {name} {ok}/{requests} succeeded"));
            }
        }
        crate::progress!(
            "submit throughput {}/{runs}: runner {run:.0}/s, without tenant limits {free:.0}/s, API alone {api:.0}/s, raw {raw:.0}/s, raw+S3 {raw_s3:.0}/s",
            round + 1
        );
        runner_rates.push(run);
        unheld_rates.push(free);
        api_rates.push(api);
        raw_rates.push(raw);
        raw_s3_rates.push(raw_s3);
        // The fair baseline: the least I/O a submit can do (the image, the job, the message).
        ratios.push(run / raw_s3);
        two_call_ratios.push(run / raw);
        // Let the runner's dispatcher finish this round's jobs before the next round starts.
        queue_drained(&sqs, &unheld_names.queue_url, Duration::from_secs(120)).await;
    }
    runner.stop().await;
    unheld.stop().await;
    api_server.abort();
    emulator.shutdown().await;
    figure.runner = Summary::of(&runner_rates);
    figure.runner_unheld = Summary::of(&unheld_rates);
    figure.api_only = Summary::of(&api_rates);
    figure.raw = Summary::of(&raw_rates);
    figure.raw_with_s3 = Summary::of(&raw_s3_rates);
    figure.ratio = Summary::of(&ratios);
    figure.ratio_two_calls = Summary::of(&two_call_ratios);
    Ok(figure)
}
