//! Presigned browser-style POST uploads (S3's POST Object with a signed policy). Unlike a
//! presigned PUT, the policy carries conditions the bucket enforces at upload time: here the
//! exact key, the content type and a `content-length-range`, so an upload over the limit is
//! refused by S3 itself. The AWS SDK for Rust presigns requests but not POST policies, so the
//! policy is signed here with Signature Version 4, as AWS documents for browser uploads
//! (<https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-HTTPPOSTConstructPolicy.html>).
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

/// The credentials and scope a policy is signed with.
pub struct Signer<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: Option<&'a str>,
    pub region: &'a str,
}

/// What a client sends: every field, then the file, as `multipart/form-data` to the bucket URL.
#[derive(Debug, Clone, PartialEq)]
pub struct PostPolicy {
    pub fields: Vec<(String, String)>,
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// `YYYYMMDD` and `YYYYMMDDTHHMMSSZ` of a moment (UTC), from days since the epoch.
fn stamps(at: SystemTime) -> (String, String) {
    let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let date = format!("{year:04}{month:02}{day:02}");
    let time = format!(
        "{date}T{:02}{:02}{:02}Z",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    );
    (date, time)
}

/// ISO 8601 with seconds, as the policy's `expiration` wants it.
fn iso(at: SystemTime) -> String {
    let (_, time) = stamps(at);
    format!(
        "{}-{}-{}T{}:{}:{}Z",
        &time[0..4],
        &time[4..6],
        &time[6..8],
        &time[9..11],
        &time[11..13],
        &time[13..15]
    )
}

/// Signs a policy allowing one upload to `key` in `bucket`: of `content_type`, between 1 and
/// `max_bytes` bytes, until `now + expires_in`.
pub fn sign(
    signer: &Signer<'_>,
    bucket: &str,
    key: &str,
    content_type: &str,
    max_bytes: u64,
    now: SystemTime,
    expires_in: Duration,
) -> PostPolicy {
    let (date, amz_date) = stamps(now);
    let credential = format!(
        "{}/{date}/{}/s3/aws4_request",
        signer.access_key_id, signer.region
    );
    let mut conditions = vec![
        json!({ "bucket": bucket }),
        json!({ "key": key }),
        json!({ "Content-Type": content_type }),
        json!(["content-length-range", 1, max_bytes]),
        json!({ "x-amz-algorithm": "AWS4-HMAC-SHA256" }),
        json!({ "x-amz-credential": credential }),
        json!({ "x-amz-date": amz_date }),
    ];
    if let Some(token) = signer.session_token {
        conditions.push(json!({ "x-amz-security-token": token }));
    }
    let policy = json!({
        "expiration": iso(now + expires_in),
        "conditions": conditions,
    });
    let encoded = base64::engine::general_purpose::STANDARD.encode(policy.to_string());
    let key_date = hmac(
        format!("AWS4{}", signer.secret_access_key).as_bytes(),
        date.as_bytes(),
    );
    let key_region = hmac(&key_date, signer.region.as_bytes());
    let key_service = hmac(&key_region, b"s3");
    let signing_key = hmac(&key_service, b"aws4_request");
    let signature = hex::encode(hmac(&signing_key, encoded.as_bytes()));
    let mut fields = vec![
        ("key".to_string(), key.to_string()),
        ("Content-Type".to_string(), content_type.to_string()),
        (
            "x-amz-algorithm".to_string(),
            "AWS4-HMAC-SHA256".to_string(),
        ),
        ("x-amz-credential".to_string(), credential),
        ("x-amz-date".to_string(), amz_date),
    ];
    if let Some(token) = signer.session_token {
        fields.push(("x-amz-security-token".to_string(), token.to_string()));
    }
    fields.push(("policy".to_string(), encoded));
    fields.push(("x-amz-signature".to_string(), signature));
    PostPolicy { fields }
}

/// The policy a set of fields carries, decoded (for checks and tests).
pub fn policy_of(fields: &[(String, String)]) -> Option<serde_json::Value> {
    let encoded = &fields.iter().find(|(name, _)| name == "policy")?.1;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    serde_json::from_slice(&raw).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer<'static> {
        Signer {
            access_key_id: "AKIDTESTSIGNERONLY",
            secret_access_key: "not-a-real-secret-for-policy-tests",
            session_token: None,
            region: "us-east-1",
        }
    }

    #[test]
    fn dates_are_utc_calendar_days() {
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            stamps(at),
            ("20270115".to_string(), "20270115T080000Z".to_string())
        );
        assert_eq!(iso(at), "2027-01-15T08:00:00Z");
        assert_eq!(stamps(UNIX_EPOCH).0, "19700101");
        // A leap day.
        let leap = UNIX_EPOCH + Duration::from_secs(1_709_164_800);
        assert_eq!(stamps(leap).0, "20240229");
    }

    #[test]
    fn the_policy_carries_the_key_type_and_size_range() {
        let post = sign(
            &signer(),
            "uploads",
            "uploads/alice/u1",
            "image/png",
            50 * 1024 * 1024,
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            Duration::from_secs(3_600),
        );
        let policy = policy_of(&post.fields).unwrap();
        let conditions = policy["conditions"].as_array().unwrap();
        assert!(conditions.contains(&json!(["content-length-range", 1, 52_428_800])));
        assert!(conditions.contains(&json!({"key": "uploads/alice/u1"})));
        assert!(conditions.contains(&json!({"Content-Type": "image/png"})));
        assert_eq!(policy["expiration"], "2027-01-15T09:00:00Z");
    }

    #[test]
    fn the_signature_follows_sigv4_and_changes_with_the_policy() {
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let sign_for = |max| {
            sign(
                &signer(),
                "b",
                "k",
                "image/png",
                max,
                at,
                Duration::from_secs(60),
            )
        };
        let signature = |post: &PostPolicy| {
            post.fields
                .iter()
                .find(|(n, _)| n == "x-amz-signature")
                .unwrap()
                .1
                .clone()
        };
        let (a, b) = (sign_for(10), sign_for(11));
        assert_eq!(signature(&a).len(), 64);
        assert_eq!(signature(&a), signature(&sign_for(10)), "deterministic");
        assert_ne!(
            signature(&a),
            signature(&b),
            "a wider limit needs a new signature"
        );
    }
}
