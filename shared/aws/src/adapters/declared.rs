//! Each adapter declares the AWS operations it calls (`AWS_OPERATIONS`), as data: the deployment
//! contract test holds those lists against the IAM grants in `template.yaml`. This interceptor
//! makes the declaration binding: a client built by the wiring refuses, before anything is
//! sent, any operation its adapter did not declare, so a new call fails every test that makes
//! it until it is declared (and granted), instead of failing in AWS with `AccessDenied`.
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeSerializationInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

/// Refuses operations outside `operations` (SDK operation names: `GetItem`, `PutObject`, …).
#[derive(Clone, Debug)]
pub struct DeclaredOperations {
    adapter: &'static str,
    operations: &'static [&'static str],
}

impl DeclaredOperations {
    pub fn new(adapter: &'static str, operations: &'static [&'static str]) -> Self {
        Self {
            adapter,
            operations,
        }
    }

    /// Whether a call of `operation` may go out.
    pub fn allows(&self, operation: &str) -> bool {
        self.operations.contains(&operation)
    }
}

impl Intercept for DeclaredOperations {
    fn name(&self) -> &'static str {
        "DeclaredOperations"
    }

    // Not `read_before_execution`: a client's interceptors run that before the operation's
    // configuration (which names the operation) is applied.
    fn read_before_serialization(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        match cfg.load::<Metadata>() {
            Some(call) if !self.allows(call.name()) => Err(format!(
                "the {} adapter does not declare the AWS operation {} {}: add it to its \
                 AWS_OPERATIONS, to deploy/contract.json and to the roles in template.yaml",
                self.adapter,
                call.service(),
                call.name()
            )
            .into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DynamoDB client guarded to `GetItem`, pointed at a port nothing listens on.
    async fn guarded() -> aws_sdk_dynamodb::Client {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url("http://127.0.0.1:9")
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                "AKIDTEST", "test", None, None, "test",
            ))
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .load()
            .await;
        aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::config::Builder::from(&sdk)
                .interceptor(DeclaredOperations::new("test", &["GetItem"]))
                .build(),
        )
    }

    fn message(err: impl std::error::Error) -> String {
        format!("{}", aws_sdk_dynamodb::error::DisplayErrorContext(err))
    }

    #[tokio::test]
    async fn an_undeclared_operation_is_refused_before_it_is_sent() {
        let err = guarded()
            .await
            .delete_item()
            .table_name("t")
            .send()
            .await
            .unwrap_err();
        let message = message(err);
        assert!(
            message.contains("does not declare the AWS operation"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_declared_operation_goes_out() {
        let err = guarded()
            .await
            .get_item()
            .table_name("t")
            .send()
            .await
            .unwrap_err();
        assert!(
            !message(err).contains("does not declare"),
            "refused by the guard"
        );
    }

    #[test]
    fn only_declared_operations_are_allowed() {
        let guard = DeclaredOperations::new("test", &["GetItem"]);
        assert!(guard.allows("GetItem"));
        assert!(!guard.allows("DeleteItem"));
    }
}
