//! Secrets from AWS Secrets Manager, read once at cold start. Each secret a function is told
//! about (`config::SECRET_SOURCES`: `RUNPOD_SECRET_ARN`, `VOLUME_SECRET_ARN`,
//! `WEBHOOK_SECRET_ARN`) is a JSON object of its own keys; their values then take the place of
//! environment variables of the same names, so no secret ever sits in a Lambda's plain
//! environment.
use std::collections::HashMap;

use aws_sdk_secretsmanager::Client;
use gateway::config::SecretSource;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("could not read secret {arn}: {reason}")]
    Unreadable { arn: String, reason: String },
    #[error("secret {arn} is not a JSON object of strings")]
    NotAnObject { arn: String },
    #[error("secret {arn} holds an unknown key {key:?}; allowed: {allowed}")]
    UnknownKey {
        arn: String,
        key: String,
        allowed: String,
    },
}

/// The Secrets Manager operation [`fetch`] calls.
pub const AWS_OPERATIONS: &[&str] = &["GetSecretValue"];

/// A Secrets Manager client that makes only [`fetch`]'s call.
pub fn client(sdk: &aws_config::SdkConfig) -> Client {
    Client::from_conf(
        aws_sdk_secretsmanager::config::Builder::from(sdk)
            .interceptor(crate::adapters::declared::DeclaredOperations::new(
                "secrets",
                AWS_OPERATIONS,
            ))
            .build(),
    )
}

pub async fn fetch(
    client: &Client,
    source: &SecretSource,
    arn: &str,
) -> Result<HashMap<String, String>, SecretError> {
    let out = client
        .get_secret_value()
        .secret_id(arn)
        .send()
        .await
        .map_err(|e| SecretError::Unreadable {
            arn: arn.to_string(),
            reason: format!("{}", aws_sdk_secretsmanager::error::DisplayErrorContext(e)),
        })?;
    parse(source, arn, out.secret_string().unwrap_or_default())
}

/// The secret's values, if it is a JSON object holding only `source`'s keys.
pub fn parse(
    source: &SecretSource,
    arn: &str,
    text: &str,
) -> Result<HashMap<String, String>, SecretError> {
    let values: HashMap<String, String> =
        serde_json::from_str(text).map_err(|_| SecretError::NotAnObject {
            arn: arn.to_string(),
        })?;
    if let Some(key) = values.keys().find(|k| !source.keys.contains(&k.as_str())) {
        return Err(SecretError::UnknownKey {
            arn: arn.to_string(),
            key: key.clone(),
            allowed: source.keys.join(", "),
        });
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use gateway::config::SECRET_SOURCES;

    use super::*;

    fn source(arn_var: &str) -> &'static SecretSource {
        SECRET_SOURCES
            .iter()
            .find(|s| s.arn_var == arn_var)
            .unwrap()
    }

    #[test]
    fn known_keys_are_read() {
        let text = r#"{"WEBHOOK_SECRET": "s", "WEBHOOK_SECRET_PREVIOUS": ""}"#;
        let values = parse(source("WEBHOOK_SECRET_ARN"), "arn", text).unwrap();
        assert_eq!(values["WEBHOOK_SECRET"], "s");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = parse(
            source("WEBHOOK_SECRET_ARN"),
            "arn",
            r#"{"WEBHOOK_SECERT": "typo"}"#,
        )
        .unwrap_err();
        assert!(matches!(err, SecretError::UnknownKey { .. }));
    }

    #[test]
    fn a_key_of_another_secret_is_refused() {
        // The RunPod key must not ride along in the webhook secret, where more functions read it.
        let err = parse(
            source("WEBHOOK_SECRET_ARN"),
            "arn",
            r#"{"WEBHOOK_SECRET": "s", "RUNPOD_API_KEY": "k"}"#,
        )
        .unwrap_err();
        assert!(matches!(err, SecretError::UnknownKey { key, .. } if key == "RUNPOD_API_KEY"));
    }

    #[test]
    fn a_non_object_is_refused_without_echoing_it() {
        let err = parse(source("RUNPOD_SECRET_ARN"), "arn", "rps_not-json").unwrap_err();
        assert!(!err.to_string().contains("rps_"));
    }
}
