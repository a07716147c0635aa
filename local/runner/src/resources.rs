//! Creates the AWS resources the SAM template would create, in the local stack (moto): the jobs
//! table with its indexes, the dispatch, stop, finalize, callback and poll queues with their
//! dead-letter queues, the two buckets, and the KMS key of the callback signing secrets.
//! Idempotent, so every start of the stack can call it.
use aws_sdk_sqs::types::QueueAttributeName;
use gateway::config;
use gateway_aws::adapters::dynamodb::create_table;
use gateway_aws::wiring::Wiring;

/// Receives before a message goes to the dead-letter queue, as in the template.
pub const MAX_RECEIVES: u32 = 5;

pub async fn ensure(wiring: &Wiring, visibility_secs: u32) -> Result<(), String> {
    let env = &wiring.env;
    let table = config::jobs_table(env).map_err(|e| e.to_string())?;
    create_table(&aws_sdk_dynamodb::Client::new(&wiring.sdk), &table).await?;

    let sqs = aws_sdk_sqs::Client::new(&wiring.sdk);
    for queue_url in [
        config::queue_url(env),
        config::stop_queue_url(env),
        config::finalize_queue_url(env),
        config::callback_queue_url(env),
        config::poll_queue_url(env),
    ] {
        let queue_url = queue_url.map_err(|e| e.to_string())?;
        create_queue(&sqs, &queue_url, visibility_secs).await?;
    }

    let key = config::callback_key_id(env).map_err(|e| e.to_string())?;
    ensure_key(&aws_sdk_kms::Client::new(&wiring.sdk), &key).await?;

    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&wiring.sdk)
            .force_path_style(true)
            .build(),
    );
    for bucket in [config::uploads_bucket(env), config::results_bucket(env)] {
        let bucket = bucket.map_err(|e: gateway::config::ConfigError| e.to_string())?;
        match s3.create_bucket().bucket(&bucket).send().await {
            Ok(_) => {}
            Err(e)
                if e.as_service_error().is_some_and(|s| {
                    s.is_bucket_already_owned_by_you() || s.is_bucket_already_exists()
                }) => {}
            Err(e) => return Err(format!("create bucket {bucket}: {e:?}")),
        }
    }
    Ok(())
}

/// A symmetric KMS key under `alias` (`alias/…`), made when the alias names none: the
/// template makes the key in AWS and passes its id.
async fn ensure_key(kms: &aws_sdk_kms::Client, alias: &str) -> Result<(), String> {
    let Some(name) = alias.strip_prefix("alias/") else {
        return Err(format!(
            "CALLBACK_KEY_ID {alias:?}: the local stack takes an alias/… name"
        ));
    };
    if kms.describe_key().key_id(alias).send().await.is_ok() {
        return Ok(());
    }
    let key = kms
        .create_key()
        .description("local stack: callback signing secrets")
        .send()
        .await
        .map_err(|e| format!("create KMS key: {e:?}"))?;
    let key_id = key
        .key_metadata()
        .map(|m| m.key_id().to_string())
        .unwrap_or_default();
    match kms
        .create_alias()
        .alias_name(format!("alias/{name}"))
        .target_key_id(key_id)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        // Another start of the stack made it meanwhile.
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_already_exists_exception()) =>
        {
            Ok(())
        }
        Err(e) => Err(format!("create KMS alias {alias}: {e:?}")),
    }
}

/// The queue named by `queue_url`'s last segment, with a dead-letter queue beside it.
async fn create_queue(
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    visibility_secs: u32,
) -> Result<(), String> {
    let name = queue_url.rsplit('/').next().unwrap_or("jobs").to_string();
    let dlq = sqs
        .create_queue()
        .queue_name(format!("{name}-dlq"))
        .send()
        .await
        .map_err(|e| format!("create DLQ: {e:?}"))?;
    let dlq_arn = sqs
        .get_queue_attributes()
        .queue_url(dlq.queue_url().unwrap_or_default())
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| format!("DLQ arn: {e:?}"))?
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .unwrap_or_default();
    let redrive =
        format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"{MAX_RECEIVES}"}}"#);
    sqs.create_queue()
        .queue_name(&name)
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            visibility_secs.to_string(),
        )
        .attributes(QueueAttributeName::RedrivePolicy, redrive)
        .send()
        .await
        .map_err(|e| format!("create queue {name}: {e:?}"))?;
    Ok(())
}
