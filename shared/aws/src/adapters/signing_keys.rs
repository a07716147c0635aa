//! The owners' callback signing secrets, kept in the job table encrypted with a KMS key
//! (`pk = signing#<owner>`): one ciphertext per secret, the current first, the owner's id
//! bound in as the encryption context, so that a ciphertext copied to another owner's item
//! does not decrypt. The secrets are the owners'; the gateway only signs with them.
use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kms::primitives::Blob;
use base64::Engine as _;

use gateway::domain::callback::SigningSecret;
use gateway::domain::keys;
use gateway::ports::{SigningKeys, StoreError};

use crate::adapters::declared::DeclaredOperations;
use crate::adapters::dynamodb::put_versioned;

/// The KMS operations [`KmsSigningKeys`] calls.
pub const AWS_OPERATIONS: &[&str] = &["Encrypt", "Decrypt"];

/// A KMS client that makes only these calls.
pub fn kms_client(sdk: &aws_config::SdkConfig) -> aws_sdk_kms::Client {
    aws_sdk_kms::Client::from_conf(
        aws_sdk_kms::config::Builder::from(sdk)
            .interceptor(DeclaredOperations::new("signing keys", AWS_OPERATIONS))
            .build(),
    )
}

pub struct KmsSigningKeys {
    dynamodb: aws_sdk_dynamodb::Client,
    table: String,
    kms: aws_sdk_kms::Client,
    key_id: String,
}

/// Secrets kept per owner: the current one, and the one before it while receivers switch.
const KEPT: usize = 2;

impl KmsSigningKeys {
    pub fn new(
        dynamodb: aws_sdk_dynamodb::Client,
        table: impl Into<String>,
        kms: aws_sdk_kms::Client,
        key_id: impl Into<String>,
    ) -> Self {
        Self {
            dynamodb,
            table: table.into(),
            kms,
            key_id: key_id.into(),
        }
    }

    /// The owner's secrets and the item's version (0: none stored).
    async fn read(&self, owner: &str) -> Result<(Vec<SigningSecret>, u64), StoreError> {
        let out = self
            .dynamodb
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(keys::signing_keys(owner)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| StoreError::Unavailable(format!("{e:?}")))?;
        let Some(item) = out.item() else {
            return Ok((Vec::new(), 0));
        };
        let version = item
            .get("version")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let mut secrets = Vec::new();
        for sealed in item
            .get("secrets")
            .and_then(|v| v.as_l().ok())
            .into_iter()
            .flatten()
        {
            let sealed = sealed
                .as_s()
                .map_err(|_| StoreError::Corrupt("a sealed secret is not a string".into()))?;
            secrets.push(self.open(owner, sealed).await?);
        }
        Ok((secrets, version))
    }

    async fn seal(&self, owner: &str, secret: &SigningSecret) -> Result<String, StoreError> {
        let out = self
            .kms
            .encrypt()
            .key_id(&self.key_id)
            .plaintext(Blob::new(secret.expose().into_bytes()))
            .encryption_context("owner", owner)
            .send()
            .await
            .map_err(|e| StoreError::Unavailable(format!("KMS encrypt: {e:?}")))?;
        let blob = out
            .ciphertext_blob()
            .ok_or_else(|| StoreError::Unavailable("KMS returned no ciphertext".into()))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(blob.as_ref()))
    }

    async fn open(&self, owner: &str, sealed: &str) -> Result<SigningSecret, StoreError> {
        let blob = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| StoreError::Corrupt("a sealed secret is not base64".into()))?;
        let out = self
            .kms
            .decrypt()
            .ciphertext_blob(Blob::new(blob))
            .encryption_context("owner", owner)
            .send()
            .await
            .map_err(|e| StoreError::Unavailable(format!("KMS decrypt: {e:?}")))?;
        let plain = out
            .plaintext()
            .ok_or_else(|| StoreError::Corrupt("KMS returned no plaintext".into()))?;
        let text = std::str::from_utf8(plain.as_ref())
            .map_err(|_| StoreError::Corrupt("a secret is not text".into()))?;
        SigningSecret::parse(text).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Stores `secrets` as the version after `expected` (0: none stored yet).
    async fn write(
        &self,
        owner: &str,
        secrets: &[SigningSecret],
        expected: u64,
    ) -> Result<(), StoreError> {
        let mut sealed = Vec::new();
        for secret in secrets {
            sealed.push(AttributeValue::S(self.seal(owner, secret).await?));
        }
        let request = self
            .dynamodb
            .put_item()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(keys::signing_keys(owner)))
            .item("secrets", AttributeValue::L(sealed));
        put_versioned(request, expected).await
    }

    /// Applies `change` to the owner's secrets on the version read, again after losing a race.
    async fn change(
        &self,
        owner: &str,
        change: impl Fn(&[SigningSecret]) -> Option<Vec<SigningSecret>>,
    ) -> Result<Vec<SigningSecret>, StoreError> {
        for _ in 0..3 {
            let (secrets, version) = self.read(owner).await?;
            let Some(changed) = change(&secrets) else {
                return Ok(secrets);
            };
            match self.write(owner, &changed, version).await {
                Ok(()) => return Ok(changed),
                Err(StoreError::Conflict) => continue,
                Err(other) => return Err(other),
            }
        }
        Err(StoreError::Conflict)
    }
}

#[async_trait]
impl SigningKeys for KmsSigningKeys {
    async fn secrets(&self, owner: &str) -> Result<Vec<SigningSecret>, StoreError> {
        self.change(owner, |secrets| {
            secrets
                .is_empty()
                .then(|| vec![SigningSecret::generate(&mut rand::rng())])
        })
        .await
    }

    async fn rotate(&self, owner: &str) -> Result<Vec<SigningSecret>, StoreError> {
        self.change(owner, |secrets| {
            let mut rotated = vec![SigningSecret::generate(&mut rand::rng())];
            rotated.extend(secrets.iter().take(KEPT - 1).cloned());
            Some(rotated)
        })
        .await
    }
}
