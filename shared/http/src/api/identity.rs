//! Who is calling. In AWS the API Gateway JWT authorizer has already checked the token and
//! passes its claims; the owner is the `sub` claim. Locally a static token map stands in.
use std::collections::HashMap;

use axum::http::request::Parts;
use lambda_http::request::RequestContext;

use gateway::config::{self, ConfigError, Env};

#[derive(Clone, Debug)]
pub enum IdentitySource {
    /// Claims from API Gateway's JWT authorizer (`sub`).
    JwtClaims,
    /// `Authorization: Bearer <token>` looked up in a token → owner map (local runner only).
    DevTokens(HashMap<String, String>),
}

impl IdentitySource {
    /// The local runner's token map, as configured (`GATEWAY_DEV_TOKENS`).
    pub fn dev_tokens_from_env(env: &Env) -> Result<Self, ConfigError> {
        Self::parse_dev_tokens(&config::dev_tokens(env))
    }

    /// Parses a `token=owner,token2=owner2` map.
    pub fn parse_dev_tokens(raw: &str) -> Result<Self, ConfigError> {
        let mut map = HashMap::new();
        for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some((token, owner)) if !token.trim().is_empty() && !owner.trim().is_empty() => {
                    map.insert(token.trim().to_string(), owner.trim().to_string());
                }
                _ => {
                    return Err(ConfigError::Invalid {
                        name: "GATEWAY_DEV_TOKENS",
                        reason: "expected token=owner pairs separated by commas".into(),
                    })
                }
            }
        }
        Ok(Self::DevTokens(map))
    }

    pub fn owner(&self, parts: &Parts) -> Option<String> {
        let owner = match self {
            Self::JwtClaims => match parts.extensions.get::<RequestContext>() {
                Some(RequestContext::ApiGatewayV2(ctx)) => ctx
                    .authorizer
                    .as_ref()
                    .and_then(|a| a.jwt.as_ref())
                    .and_then(|jwt| jwt.claims.get("sub"))
                    .cloned(),
                _ => None,
            },
            Self::DevTokens(map) => parts
                .headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .and_then(|token| map.get(token.trim()))
                .cloned(),
        }?;
        // Owners become S3 key segments: refuse anything that could break out of one.
        let valid = !owner.is_empty()
            && owner.len() <= 128
            && owner.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '|' | ':')
            })
            && owner != "."
            && owner != "..";
        valid.then_some(owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(auth: Option<&str>) -> Parts {
        let mut builder = axum::http::Request::builder();
        if let Some(auth) = auth {
            builder = builder.header("authorization", auth);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_known_dev_token_names_its_owner() {
        let source = IdentitySource::parse_dev_tokens("t1=alice, t2=bob").unwrap();
        assert_eq!(source.owner(&parts(Some("Bearer t2"))), Some("bob".into()));
    }

    #[test]
    fn unknown_or_missing_tokens_name_nobody() {
        let source = IdentitySource::parse_dev_tokens("t1=alice").unwrap();
        assert_eq!(source.owner(&parts(Some("Bearer nope"))), None);
        assert_eq!(source.owner(&parts(Some("t1"))), None);
        assert_eq!(source.owner(&parts(None)), None);
    }

    #[test]
    fn malformed_token_maps_are_refused() {
        assert!(IdentitySource::parse_dev_tokens("justatoken").is_err());
        assert!(IdentitySource::parse_dev_tokens("=owner").is_err());
    }

    #[test]
    fn owners_that_could_escape_a_key_segment_are_refused() {
        let source = IdentitySource::parse_dev_tokens("t1=../x").unwrap();
        assert_eq!(source.owner(&parts(Some("Bearer t1"))), None);
    }

    #[test]
    fn without_an_authorizer_context_jwt_mode_names_nobody() {
        assert_eq!(
            IdentitySource::JwtClaims.owner(&parts(Some("Bearer x"))),
            None
        );
    }
}
