//! `--param NAME=VALUE`: the job's `params` object, typed the way a shell user means it.

use serde_json::{Map, Value};

use crate::failure::Failure;

/// One `NAME=VALUE`. The value is JSON when it parses as JSON (`0.25`, `true`, `null`,
/// `"quoted"`, `[1,2]`), otherwise the text itself: `--param style=sepia` needs no quotes.
/// As a clap value parser, an error here is a usage error (exit 2).
pub fn parse_param(arg: &str) -> Result<(String, Value), String> {
    let (name, value) = arg
        .split_once('=')
        .ok_or_else(|| format!("`{arg}` is not NAME=VALUE"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("`{arg}` has no parameter name before `=`"));
    }
    let value =
        serde_json::from_str::<Value>(value).unwrap_or_else(|_| Value::String(value.to_string()));
    Ok((name.to_string(), value))
}

/// The `params` object. A name given twice is refused rather than silently taking one of them.
pub fn params_object(params: &[(String, Value)]) -> Result<Map<String, Value>, Failure> {
    let mut object = Map::new();
    for (name, value) in params {
        if object.insert(name.clone(), value.clone()).is_some() {
            return Err(Failure::Usage(format!("--param {name} is given twice")));
        }
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_and_booleans_are_json_and_other_text_is_a_string() {
        assert_eq!(
            parse_param("megapixels=0.25").unwrap(),
            ("megapixels".into(), json!(0.25))
        );
        assert_eq!(parse_param("seed=42").unwrap(), ("seed".into(), json!(42)));
        assert_eq!(
            parse_param("fast=true").unwrap(),
            ("fast".into(), json!(true))
        );
        assert_eq!(
            parse_param("style=sepia").unwrap(),
            ("style".into(), json!("sepia"))
        );
        assert_eq!(
            parse_param("style=\"42\"").unwrap(),
            ("style".into(), json!("42"))
        );
        assert_eq!(parse_param("note=").unwrap(), ("note".into(), json!("")));
    }

    #[test]
    fn only_the_first_equals_sign_separates_name_from_value() {
        assert_eq!(
            parse_param("prompt=a=b").unwrap(),
            ("prompt".into(), json!("a=b"))
        );
    }

    #[test]
    fn a_param_without_a_name_or_an_equals_sign_is_refused() {
        assert!(parse_param("megapixels").is_err());
        assert!(parse_param("=1").is_err());
    }

    #[test]
    fn a_param_given_twice_is_a_usage_error() {
        let params = vec![
            ("seed".to_string(), json!(1)),
            ("seed".to_string(), json!(2)),
        ];
        let failure = params_object(&params).unwrap_err();
        assert_eq!(failure.exit_code(), crate::failure::EXIT_USAGE);
        assert!(failure.to_string().contains("seed"), "{failure}");
    }

    #[test]
    fn params_become_one_object() {
        let params = vec![
            ("megapixels".to_string(), json!(0.05)),
            ("denoise".to_string(), json!(0.5)),
        ];
        assert_eq!(
            Value::Object(params_object(&params).unwrap()),
            json!({"megapixels": 0.05, "denoise": 0.5})
        );
    }
}
