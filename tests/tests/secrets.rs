//! Secrets come from Secrets Manager (moto here) at start-up, never from plain variables.
use gateway::config::Env;
use gateway_aws::wiring::{BootError, Wiring};
use gateway_tests::aws_sdk_config;

async fn secret(sdk: &aws_config::SdkConfig, value: &str) -> String {
    let client = aws_sdk_secretsmanager::Client::new(sdk);
    let name = format!("gateway-{}", uuid::Uuid::new_v4().simple());
    client
        .create_secret()
        .name(&name)
        .secret_string(value)
        .send()
        .await
        .unwrap()
        .arn()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn secret_values_take_the_place_of_environment_variables() {
    let sdk = aws_sdk_config().await;
    let webhook_arn = secret(
        &sdk,
        r#"{"WEBHOOK_SECRET": "from-secrets-manager-0123", "WEBHOOK_SECRET_PREVIOUS": ""}"#,
    )
    .await;
    let runpod_arn = secret(&sdk, r#"{"RUNPOD_API_KEY": "fake-key"}"#).await;
    let env = Env::from_pairs([
        ("WEBHOOK_SECRET_ARN", webhook_arn.as_str()),
        ("RUNPOD_SECRET_ARN", runpod_arn.as_str()),
        ("WEBHOOK_SECRET", "plain-variable-should-lose"),
        ("RUNPOD_ENDPOINT_ID", "endpoint"),
    ]);
    let wiring = Wiring::with_secrets(env, sdk).await.unwrap();
    let webhook = gateway::config::WebhookSecrets::from_env(&wiring.env).unwrap();
    assert_eq!(webhook.secret, "from-secrets-manager-0123");
    let runpod = gateway::config::RunPodConfig::from_env(&wiring.env).unwrap();
    assert_eq!(runpod.api_key, "fake-key");
}

#[tokio::test]
async fn a_missing_secret_stops_the_function_at_start_up() {
    let sdk = aws_sdk_config().await;
    let env = Env::from_pairs([(
        "RUNPOD_SECRET_ARN",
        "arn:aws:secretsmanager:us-east-1:123456789012:secret:nope",
    )]);
    let result = Wiring::with_secrets(env, sdk).await;
    assert!(matches!(result, Err(BootError::Secret(_))));
}

#[tokio::test]
async fn a_secret_with_an_unknown_key_is_refused() {
    let sdk = aws_sdk_config().await;
    let arn = secret(&sdk, r#"{"WEBHOOK_SECERT": "typo"}"#).await;
    let env = Env::from_pairs([("WEBHOOK_SECRET_ARN", arn.as_str())]);
    let err = Wiring::with_secrets(env, sdk).await.err().expect("refused");
    assert!(err.to_string().contains("WEBHOOK_SECERT"), "{err}");
    assert!(!err.to_string().contains("typo"), "the value leaked: {err}");
}

#[tokio::test]
async fn the_runpod_key_in_the_volume_secret_is_refused() {
    // A key in the wrong secret would reach functions whose roles were meant not to see it.
    let sdk = aws_sdk_config().await;
    let arn = secret(
        &sdk,
        r#"{"VOLUME_ACCESS_KEY_ID": "id", "VOLUME_SECRET_ACCESS_KEY": "s", "RUNPOD_API_KEY": "k"}"#,
    )
    .await;
    let env = Env::from_pairs([("VOLUME_SECRET_ARN", arn.as_str())]);
    let err = Wiring::with_secrets(env, sdk).await.err().expect("refused");
    assert!(err.to_string().contains("RUNPOD_API_KEY"), "{err}");
}
