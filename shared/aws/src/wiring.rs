//! Start-up wiring: builds the adapters and use cases from the environment, once per process.
//! Each function asks only for what it uses, so it reads only the variables it needs and fails
//! at cold start, not mid-request, when one is missing.
use std::sync::{Arc, OnceLock};

use aws_config::{BehaviorVersion, SdkConfig};

use crate::adapters::dynamodb::DynamoJobStore;
use crate::adapters::http_fetch::HttpFetcher;
#[cfg(any(feature = "images", feature = "callbacks"))]
use crate::adapters::http_fetch::SystemResolver;
use crate::adapters::runpod::{http_client, HttpRunPod};
use crate::adapters::s3::{aws_client, volume_client, S3ObjectStore};
#[cfg(feature = "secrets")]
use crate::adapters::secrets;
use crate::adapters::sqs::{
    SqsCallbackQueue, SqsFinalizeQueue, SqsJobQueue, SqsPollQueue, SqsStopQueue,
};
use gateway::app::backends::{Backends, Pod, Serverless};
#[cfg(feature = "images")]
use gateway::app::dispatch::Dispatcher;
use gateway::app::finalize::Finalizer;
use gateway::app::observe::Observer;
use gateway::app::stop::Stopper;
use gateway::app::webhook::WebhookHandler;
use gateway::config::{
    self, ConfigError, Env, JanitorSettings, LogConfig, PodConfig, RunPodConfig, Settings,
    VolumeConfig, WebhookSecrets,
};
use gateway::domain::job::BackendKind;
use gateway::domain::paths::VolumeLayout;
use gateway::domain::token::WebhookSigner;
use gateway::domain::workflow::WorkflowCatalog;
use gateway::ports::RunPod;
use gateway::ports::{Clock, SystemClock};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("workflow catalog: {0}")]
    Catalog(String),
    #[error("HTTP client: {0}")]
    Http(String),
    #[cfg(feature = "secrets")]
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
    #[error("{0} is set, but this function is built without secrets (the `secrets` feature)")]
    NoSecrets(&'static str),
}

/// What every function shares: the SDK config (loaded once), settings, clock and catalog.
#[derive(Clone)]
pub struct Wiring {
    pub env: Env,
    pub sdk: SdkConfig,
    pub settings: Settings,
    pub log: LogConfig,
    pub clock: Arc<dyn Clock>,
    pub catalog: Arc<WorkflowCatalog>,
    clients: Clients,
    /// How [`Wiring::from_env`] spent the init, for [`Wiring::ready`] to log.
    init: Option<InitTimes>,
}

/// Where a function's init goes, phase by phase (the benchmark reads them from the `init` log
/// line): the SDK's configuration chain, the secrets, the configuration and workflow catalog,
/// logging and metrics, and the function's own clients and use cases.
#[derive(Clone, Copy, Debug)]
struct InitTimes {
    started: std::time::Instant,
    sdk_config: std::time::Duration,
    secrets: std::time::Duration,
    config: std::time::Duration,
    tracing: std::time::Duration,
    ready_from: std::time::Instant,
}

/// One client per service per process: each owns a connection pool, and a second one would
/// mean a second TLS handshake on a cold start.
#[derive(Clone, Default)]
struct Clients {
    dynamodb: Arc<OnceLock<aws_sdk_dynamodb::Client>>,
    sqs: Arc<OnceLock<aws_sdk_sqs::Client>>,
    s3: Arc<OnceLock<aws_sdk_s3::Client>>,
    volume: Arc<OnceLock<aws_sdk_s3::Client>>,
    http: Arc<OnceLock<reqwest::Client>>,
}

fn once<T: Clone, E>(cell: &OnceLock<T>, build: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    if let Some(value) = cell.get() {
        return Ok(value.clone());
    }
    let value = build()?;
    Ok(cell.get_or_init(|| value).clone())
}

impl Wiring {
    /// From the process environment, with the SDK's own configuration chain, and the secrets
    /// named by the `*_SECRET_ARN` variables that are set; then logging as configured.
    pub async fn from_env() -> Result<Self, BootError> {
        use std::time::Instant;
        let started = Instant::now();
        let sdk = aws_config::defaults(BehaviorVersion::latest()).load().await;
        let sdk_config = started.elapsed();
        let env = Env::process();
        let at = Instant::now();
        let env = Self::read_secrets(env, &sdk).await?;
        let secrets = at.elapsed();
        let at = Instant::now();
        let mut wiring = Self::new(env, sdk)?;
        let config = at.elapsed();
        let at = Instant::now();
        init_tracing(&wiring.log);
        crate::metrics::install(&wiring.log);
        let tracing = at.elapsed();
        wiring.init = Some(InitTimes {
            started,
            sdk_config,
            secrets,
            config,
            tracing,
            ready_from: Instant::now(),
        });
        Ok(wiring)
    }

    /// Logs where the init went (`init`, one line): each phase of [`Wiring::from_env`], and
    /// the function's own clients and use cases built since. A function calls it once, just
    /// before it starts taking events.
    pub fn ready(&self) {
        let Some(times) = self.init else { return };
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        tracing::info!(
            function = %self.log.function,
            sdk_config_ms = ms(times.sdk_config),
            secrets_ms = ms(times.secrets),
            config_ms = ms(times.config),
            tracing_ms = ms(times.tracing),
            clients_ms = ms(times.ready_from.elapsed()),
            total_ms = ms(times.started.elapsed()),
            "init"
        );
    }

    /// Like [`Wiring::new`], after laying each Secrets Manager secret this function is told
    /// about (`config::secrets_to_read`) over `env`.
    pub async fn with_secrets(env: Env, sdk: SdkConfig) -> Result<Self, BootError> {
        let env = Self::read_secrets(env, &sdk).await?;
        Self::new(env, sdk)
    }

    /// `env` with each Secrets Manager secret this function is told about laid over it.
    async fn read_secrets(env: Env, sdk: &SdkConfig) -> Result<Env, BootError> {
        let sources = config::secrets_to_read(&env);
        if sources.is_empty() {
            return Ok(env);
        }
        #[cfg(feature = "secrets")]
        {
            let client = secrets::client(sdk);
            // All at once: init then waits for one round trip, not one per secret.
            let fetched = futures::future::try_join_all(
                sources
                    .iter()
                    .map(|(source, arn)| secrets::fetch(&client, source, arn)),
            )
            .await?;
            Ok(env.with_secrets(fetched.into_iter().flatten().collect()))
        }
        #[cfg(not(feature = "secrets"))]
        {
            let _ = sdk;
            Err(BootError::NoSecrets(sources[0].0.arn_var))
        }
    }

    pub fn new(env: Env, sdk: SdkConfig) -> Result<Self, BootError> {
        let catalog = WorkflowCatalog::builtin().map_err(|e| BootError::Catalog(e.to_string()))?;
        Ok(Self {
            sdk,
            settings: Settings::from_env(&env)?,
            log: LogConfig::from_env(&env),
            env,
            clock: Arc::new(SystemClock),
            catalog: Arc::new(catalog),
            clients: Clients::default(),
            init: None,
        })
    }

    pub fn job_store(&self) -> Result<Arc<DynamoJobStore>, BootError> {
        Ok(Arc::new(DynamoJobStore::new(
            self.dynamodb(),
            config::jobs_table(&self.env)?,
        )))
    }

    fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        self.clients
            .dynamodb
            .get_or_init(|| crate::adapters::dynamodb::client(&self.sdk))
            .clone()
    }

    fn sqs(&self) -> aws_sdk_sqs::Client {
        self.clients
            .sqs
            .get_or_init(|| crate::adapters::sqs::client(&self.sdk))
            .clone()
    }

    pub fn queue(&self) -> Result<Arc<SqsJobQueue>, BootError> {
        Ok(Arc::new(SqsJobQueue::new(
            self.sqs(),
            config::queue_url(&self.env)?,
        )))
    }

    pub fn stops(&self) -> Result<Arc<SqsStopQueue>, BootError> {
        Ok(Arc::new(SqsStopQueue::new(
            self.sqs(),
            config::stop_queue_url(&self.env)?,
        )))
    }

    pub fn finalize_queue(&self) -> Result<Arc<SqsFinalizeQueue>, BootError> {
        Ok(Arc::new(SqsFinalizeQueue::new(
            self.sqs(),
            config::finalize_queue_url(&self.env)?,
        )))
    }

    pub fn callback_queue(&self) -> Result<Arc<SqsCallbackQueue>, BootError> {
        Ok(Arc::new(SqsCallbackQueue::new(
            self.sqs(),
            config::callback_queue_url(&self.env)?,
        )))
    }

    /// The callbacks function's use case (and the API's, for the owners' secrets and test
    /// events): the job table for the delivery logs and the encrypted secrets, KMS, the
    /// results bucket for the outputs' links.
    #[cfg(feature = "callbacks")]
    pub fn callbacks(&self) -> Result<gateway::app::callbacks::Callbacks, BootError> {
        use crate::adapters::signing_keys::{kms_client, KmsSigningKeys};
        let store = self.job_store()?;
        Ok(gateway::app::callbacks::Callbacks {
            logs: store.clone(),
            store,
            queue: self.callback_queue()?,
            sender: Arc::new(crate::adapters::callback_http::HttpCallbackSender::default()),
            keys: Arc::new(KmsSigningKeys::new(
                self.dynamodb(),
                config::jobs_table(&self.env)?,
                kms_client(&self.sdk),
                config::callback_key_id(&self.env)?,
            )),
            resolver: Arc::new(SystemResolver),
            results: self.results()?,
            turns: self.turns()?,
            settings: self.settings.clone(),
            clock: self.clock.clone(),
        })
    }

    /// The hold-back slots (in the job table), and the dispatch queue a woken job is sent to.
    pub fn turns(&self) -> Result<Arc<gateway::app::holds::Turns>, BootError> {
        Ok(Arc::new(gateway::app::holds::Turns {
            slots: self.job_store()?,
            queue: self.queue()?,
        }))
    }

    /// What the dispatch function runs on both its queues' batches.
    #[cfg(all(feature = "sqs-events", feature = "images"))]
    pub fn consumer(&self) -> Result<crate::adapters::sqs::Consumer, BootError> {
        Ok(crate::adapters::sqs::Consumer {
            dispatcher: self.dispatcher()?,
            stopper: self.stopper()?,
        })
    }

    /// The stop queue's consumer: the one caller of RunPod's `/cancel`, and of a ComfyUI
    /// server's queue delete and interrupt.
    pub fn stopper(&self) -> Result<Stopper, BootError> {
        Ok(Stopper {
            backends: self.backends(self.runpod_if_deployed()?)?,
        })
    }

    pub fn polls(&self) -> Result<Arc<SqsPollQueue>, BootError> {
        Ok(Arc::new(SqsPollQueue::new(
            self.sqs(),
            config::poll_queue_url(&self.env)?,
        )))
    }

    /// The RunPod client, if this deployment runs the serverless backend (`BACKENDS`): a
    /// pod-only deployment needs no RunPod key.
    fn runpod_if_deployed(&self) -> Result<Option<Arc<dyn RunPod>>, BootError> {
        if !self.settings.backends.contains(&BackendKind::Serverless) {
            return Ok(None);
        }
        Ok(Some(self.runpod()?))
    }

    /// The backends this deployment runs (`BACKENDS`), `runpod` the serverless one's client
    /// (the sweeper's is paced).
    pub fn backends(&self, runpod: Option<Arc<dyn RunPod>>) -> Result<Backends, BootError> {
        let mut backends = Backends::new();
        let (volume, layout) = self.volume()?;
        // Read whatever the backends, so that each function reads the same variables.
        let pod = PodConfig::from_env(&self.env)?;
        if let Some(runpod) = runpod {
            backends = backends.with(
                BackendKind::Serverless,
                Arc::new(Serverless {
                    runpod,
                    uploads: self.uploads()?,
                    volume,
                    volume_root: layout.root().clone(),
                    execution_timeout: self.settings.execution_timeout,
                    ttl: self.settings.runpod_ttl,
                }),
            );
        }
        if self.settings.backends.contains(&BackendKind::Pod) {
            let config = pod;
            let url = config.url.clone().ok_or(ConfigError::Invalid {
                name: "POD_COMFYUI_URL",
                reason: "must be set when BACKENDS names pod".into(),
            })?;
            let base = url::Url::parse(&url).map_err(|e| ConfigError::Invalid {
                name: "POD_COMFYUI_URL",
                reason: e.to_string(),
            })?;
            let comfy = crate::adapters::comfy_http::HttpComfyServer::with_timeout(
                base,
                config.token.clone(),
                config.request_timeout,
            )
            .map_err(|e| BootError::Http(e.to_string()))?;
            backends = backends.with(
                BackendKind::Pod,
                Arc::new(Pod {
                    comfy: Arc::new(comfy),
                    uploads: self.uploads()?,
                    max_input_bytes: self.settings.max_upload_bytes,
                    poll_every: config.poll_every,
                    volume_comfyui_root: config.volume_comfyui_root,
                }),
            );
        }
        Ok(backends)
    }

    fn s3(&self) -> Result<aws_sdk_s3::Client, BootError> {
        once(&self.clients.s3, || {
            Ok(aws_client(
                &self.sdk,
                config::s3_force_path_style(&self.env)?,
            ))
        })
    }

    pub fn uploads(&self) -> Result<Arc<S3ObjectStore>, BootError> {
        Ok(Arc::new(
            S3ObjectStore::new(self.s3()?, config::uploads_bucket(&self.env)?)
                .signing_with(&self.sdk),
        ))
    }

    pub fn results(&self) -> Result<Arc<S3ObjectStore>, BootError> {
        Ok(Arc::new(S3ObjectStore::new(
            self.s3()?,
            config::results_bucket(&self.env)?,
        )))
    }

    pub fn volume(&self) -> Result<(Arc<S3ObjectStore>, VolumeLayout), BootError> {
        let config = VolumeConfig::from_env(&self.env)?;
        let client = once(&self.clients.volume, || {
            Ok::<_, BootError>(volume_client(&config))
        })?;
        let store = S3ObjectStore::new(client, config.volume_id.clone());
        Ok((
            Arc::new(store),
            VolumeLayout::new(config.mount_prefixes, config.root),
        ))
    }

    pub fn runpod(&self) -> Result<Arc<HttpRunPod>, BootError> {
        let config = RunPodConfig::from_env(&self.env)?;
        let http = once(&self.clients.http, || {
            http_client(&config).map_err(|e| BootError::Http(e.to_string()))
        })?;
        Ok(Arc::new(
            HttpRunPod::new(http, &config).with_max_body(self.settings.max_status_bytes),
        ))
    }

    /// The sweeper's RunPod client: its `/status` calls keep to `SWEEP_STATUS_PER_SEC`, its
    /// share of RunPod's limit, however many jobs are due.
    pub fn sweeper_runpod(&self) -> Result<Arc<HttpRunPod>, BootError> {
        let runpod = Arc::unwrap_or_clone(self.runpod()?);
        Ok(Arc::new(
            runpod.with_status_pace(self.settings.sweep_status_per_sec),
        ))
    }

    pub fn signer(&self) -> Result<WebhookSigner, BootError> {
        let config = WebhookSecrets::from_env(&self.env)?;
        Ok(WebhookSigner::new(
            config.secret.as_bytes(),
            config.previous_secret.map(String::into_bytes),
        ))
    }

    #[cfg(feature = "api")]
    pub fn api(&self) -> Result<gateway::app::api::Api, BootError> {
        Ok(gateway::app::api::Api {
            store: self.job_store()?,
            callbacks: self.callback_queue()?,
            queue: self.queue()?,
            uploads: self.uploads()?,
            results: self.results()?,
            stops: self.stops()?,
            images: Arc::new(crate::adapters::images::ImageHeaders),
            resolver: Arc::new(SystemResolver),
            catalog: self.catalog.clone(),
            batches: self.job_store()?,
            turns: self.turns()?,
            tenants: Arc::new(gateway::app::tenants::Tenants::new(
                self.job_store()?,
                self.settings.tenant_limits,
                self.clock.clone(),
            )),
            settings: self.settings.clone(),
            clock: self.clock.clone(),
        })
    }

    #[cfg(feature = "images")]
    pub fn dispatcher(&self) -> Result<Dispatcher, BootError> {
        let (volume, layout) = self.volume()?;
        Ok(Dispatcher {
            store: self.job_store()?,
            callbacks: self.callback_queue()?,
            uploads: self.uploads()?,
            volume,
            resolver: Arc::new(SystemResolver),
            fetcher: Arc::new(HttpFetcher::new(
                HttpFetcher::client().map_err(|e| BootError::Http(e.to_string()))?,
            )),
            images: Arc::new(crate::adapters::images::ImageHeaders),
            volume_root: layout.root().clone(),
            backends: self.backends(self.runpod_if_deployed()?)?,
            polls: self.polls()?,
            turns: self.turns()?,
            stops: self.stops()?,
            catalog: self.catalog.clone(),
            signer: self.signer()?,
            webhook_base: config::webhook_base_url(&self.env)?,
            settings: self.settings.clone(),
            clock: self.clock.clone(),
        })
    }

    pub fn finalizer(&self) -> Result<Finalizer, BootError> {
        let (volume, layout) = self.volume()?;
        let http = HttpFetcher::client().map_err(|e| BootError::Http(e.to_string()))?;
        Ok(Finalizer {
            store: self.job_store()?,
            callbacks: self.callback_queue()?,
            volume,
            results: self.results()?,
            layout,
            catalog: self.catalog.clone(),
            fetcher: Arc::new(HttpFetcher::new(http)),
            // Only a backend that serves outputs back (the pod's `/view`); a serverless job's
            // contract is its workflow's, and finalize holds no RunPod key.
            backends: self.backends(None)?,
            queue: self.finalize_queue()?,
            settings: self.settings.clone(),
            clock: self.clock.clone(),
        })
    }

    /// What the webhook and the sweeper act on RunPod's answers with: no volume, no
    /// downloads; a completed run goes to the finalize function.
    pub fn observer(&self) -> Result<Observer, BootError> {
        Ok(Observer {
            store: self.job_store()?,
            callbacks: self.callback_queue()?,
            reports: self.results()?,
            finalize: self.finalize_queue()?,
            settings: self.settings.clone(),
            clock: self.clock.clone(),
        })
    }

    pub fn webhook(&self) -> Result<WebhookHandler, BootError> {
        Ok(WebhookHandler {
            store: self.job_store()?,
            runpod: self.runpod()?,
            stops: self.stops()?,
            observer: Arc::new(self.observer()?),
            signer: self.signer()?,
        })
    }

    pub fn sweeper(&self) -> Result<gateway::app::sweeper::Sweeper, BootError> {
        let (volume, layout) = self.volume()?;
        Ok(gateway::app::sweeper::Sweeper {
            store: self.job_store()?,
            callbacks: self.callback_queue()?,
            queue: self.queue()?,
            backends: self.backends(match self.runpod_if_deployed()? {
                Some(_) => Some(self.sweeper_runpod()? as Arc<dyn RunPod>),
                None => None,
            })?,
            polls: self.polls()?,
            stops: self.stops()?,
            observer: Arc::new(self.observer()?),
            finalize: self.finalize_queue()?,
            delivery_logs: self.job_store()?,
            results: self.results()?,
            uploads: self.uploads()?,
            volume,
            volume_root: layout.root().clone(),
            settings: self.settings.clone(),
            clock: self.clock.clone(),
        })
    }

    /// The volume's janitor: this deployment's folder on it, and the job table to judge what
    /// may go.
    pub fn janitor(&self) -> Result<gateway::app::janitor::Janitor, BootError> {
        let (volume, layout) = self.volume()?;
        Ok(gateway::app::janitor::Janitor {
            store: self.job_store()?,
            volume: volume.clone(),
            staged: volume,
            root: layout.root().clone(),
            // The pod's job folders, when the deployment runs a pod whose ComfyUI writes on the
            // volume.
            backend_folders: gateway::app::backends::comfy_job_parents(
                config::pod_volume_comfyui_root(&self.env)
                    .filter(|_| self.settings.backends.contains(&BackendKind::Pod))
                    .as_deref(),
            ),
            settings: JanitorSettings::from_env(&self.env)?,
            clock: self.clock.clone(),
        })
    }
}

/// The log subscriber every binary uses, writing to `writer`: JSON lines with the event's
/// fields at the top level (what CloudWatch metric filters read as `$.field`), or text.
pub fn subscriber<W>(log: &LogConfig, writer: W) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(writer);
    if log.json {
        Box::new(builder.json().flatten_event(true).finish())
    } else {
        Box::new(builder.finish())
    }
}

/// Installs [`subscriber`] on stdout for the process. A second call (tests, the runner
/// embedding functions) keeps the first subscriber.
pub fn init_tracing(log: &LogConfig) {
    use tracing_subscriber::util::SubscriberInitExt;
    let _ = subscriber(log, std::io::stdout).try_init();
}
