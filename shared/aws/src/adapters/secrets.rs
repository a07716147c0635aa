//! Secrets from AWS Secrets Manager, read once at cold start. The secret named by
//! `GATEWAY_SECRET_ARN` is a JSON object whose keys are the secret variables below; their values
//! then take the place of environment variables of the same names, so no secret ever sits in a
//! Lambda's plain environment.
use std::collections::HashMap;

use aws_sdk_secretsmanager::Client;

/// The only keys the secret may hold. Anything else is refused, so a typo cannot silently leave
/// a real secret unused (and a stray setting cannot hide in the secret).
pub const SECRET_KEYS: &[&str] = &[
    "RUNPOD_API_KEY",
    "VOLUME_ACCESS_KEY_ID",
    "VOLUME_SECRET_ACCESS_KEY",
    "WEBHOOK_SECRET",
    "WEBHOOK_SECRET_PREVIOUS",
];

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

pub async fn fetch(client: &Client, arn: &str) -> Result<HashMap<String, String>, SecretError> {
    let out = client
        .get_secret_value()
        .secret_id(arn)
        .send()
        .await
        .map_err(|e| SecretError::Unreadable {
            arn: arn.to_string(),
            reason: format!("{}", aws_sdk_secretsmanager::error::DisplayErrorContext(e)),
        })?;
    parse(arn, out.secret_string().unwrap_or_default())
}

pub fn parse(arn: &str, text: &str) -> Result<HashMap<String, String>, SecretError> {
    let values: HashMap<String, String> =
        serde_json::from_str(text).map_err(|_| SecretError::NotAnObject {
            arn: arn.to_string(),
        })?;
    if let Some(key) = values.keys().find(|k| !SECRET_KEYS.contains(&k.as_str())) {
        return Err(SecretError::UnknownKey {
            arn: arn.to_string(),
            key: key.clone(),
            allowed: SECRET_KEYS.join(", "),
        });
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_keys_are_read() {
        let values = parse("arn", r#"{"WEBHOOK_SECRET": "s", "RUNPOD_API_KEY": "k"}"#).unwrap();
        assert_eq!(values["WEBHOOK_SECRET"], "s");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = parse("arn", r#"{"WEBHOOK_SECERT": "typo"}"#).unwrap_err();
        assert!(matches!(err, SecretError::UnknownKey { .. }));
    }

    #[test]
    fn a_non_object_is_refused_without_echoing_it() {
        let err = parse("arn", "rps_not-json").unwrap_err();
        assert!(!err.to_string().contains("rps_"));
    }
}
