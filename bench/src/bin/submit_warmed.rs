//! The submit function as `functions/submit` builds it, plus start-up warming: during init it
//! makes one cheap call on each AWS client the first request uses (DynamoDB DescribeTable, SQS
//! GetQueueAttributes, S3 HeadObject), concurrently, ignoring errors. The benchmark runs it
//! beside the real `submit` to show what warming moves from the first request into init.
use std::sync::Arc;

use gateway::app::api::Api;
use gateway::config;
use gateway_aws::adapters::dynamodb::DynamoJobStore;
use gateway_aws::adapters::s3::{aws_client, S3ObjectStore};
use gateway_aws::adapters::sqs::SqsJobQueue;
use gateway_aws::wiring::Wiring;
use gateway_http::api::{identity::IdentitySource, router, ApiState};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    let wiring = Wiring::from_env().await?;
    let env = &wiring.env;
    let table = config::jobs_table(env)?;
    let queue_url = config::queue_url(env)?;
    let uploads_bucket = config::uploads_bucket(env)?;
    let dynamodb = aws_sdk_dynamodb::Client::new(&wiring.sdk);
    let sqs = aws_sdk_sqs::Client::new(&wiring.sdk);
    let s3 = aws_client(&wiring.sdk, config::s3_force_path_style(env)?);

    // The warming: the connections (and, in AWS, the TLS sessions) the first request needs.
    let _ = tokio::join!(
        dynamodb.describe_table().table_name(&table).send(),
        sqs.get_queue_attributes().queue_url(&queue_url).send(),
        // HeadObject, not HeadBucket: the store's client makes only the store's calls.
        s3.head_object()
            .bucket(&uploads_bucket)
            .key("warm-up")
            .send(),
    );

    let store = Arc::new(DynamoJobStore::new(dynamodb, table));
    let api = Api {
        batches: store.clone(),
        turns: wiring.turns()?,
        tenants: Arc::new(gateway::app::tenants::Tenants::new(
            store.clone(),
            wiring.settings.tenant_limits,
            wiring.clock.clone(),
        )),
        store,
        queue: Arc::new(SqsJobQueue::new(sqs, queue_url)),
        uploads: Arc::new(S3ObjectStore::new(s3.clone(), uploads_bucket).signing_with(&wiring.sdk)),
        results: Arc::new(S3ObjectStore::new(s3, config::results_bucket(env)?)),
        stops: wiring.stops()?,
        callbacks: wiring.callback_queue()?,
        images: Arc::new(gateway_aws::adapters::images::ImageHeaders),
        resolver: Arc::new(gateway_aws::adapters::http_fetch::SystemResolver),
        catalog: wiring.catalog.clone(),
        settings: wiring.settings.clone(),
        clock: wiring.clock.clone(),
    };
    let state = ApiState::new(api, wiring.callbacks()?, IdentitySource::JwtClaims);
    lambda_http::run(router(Arc::new(state))).await
}
