//! What the benchmark takes from `template.yaml`: each function's memory size (Globals and each
//! function's `MemorySize`) and the secrets it is told of (its `*_SECRET_ARN` variables), matched
//! to its binary through `BuildProperties: Binary:`. A plain line scan: CloudFormation's short
//! tags (`!Ref`, `!Sub`) need no YAML library to skip.
use std::collections::HashMap;

pub const ASSUMED_MB: u32 = 512;

#[derive(Clone, Debug)]
pub struct MemorySizes {
    default_mb: u32,
    by_binary: HashMap<String, u32>,
    /// The `*_SECRET_ARN` variables each binary's function is given.
    secrets: HashMap<String, Vec<String>>,
    /// Where the sizes came from, for the report.
    pub source: String,
}

impl MemorySizes {
    pub fn load() -> Self {
        let path = crate::common::repo_root().join("template.yaml");
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text),
            Err(_) => Self {
                default_mb: ASSUMED_MB,
                by_binary: HashMap::new(),
                secrets: HashMap::new(),
                source: format!("no template.yaml: {ASSUMED_MB} MB assumed"),
            },
        }
    }

    pub fn parse(text: &str) -> Self {
        let mut default_mb = None;
        let mut by_binary = HashMap::new();
        let mut secrets = HashMap::new();
        let mut section = "";
        let mut resource: Option<Resource> = None;
        let flush = |resource: &mut Option<Resource>,
                     by_binary: &mut HashMap<String, u32>,
                     secrets: &mut HashMap<String, Vec<String>>| {
            if let Some(Resource {
                binary: Some(binary),
                memory,
                secrets: told,
            }) = resource.take()
            {
                if let Some(mb) = memory {
                    by_binary.insert(binary.clone(), mb);
                }
                secrets.insert(binary, told);
            }
        };
        for line in text.lines() {
            let indent = line.len() - line.trim_start().len();
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if indent == 0 {
                flush(&mut resource, &mut by_binary, &mut secrets);
                section = if trimmed.starts_with("Globals:") {
                    "globals"
                } else if trimmed.starts_with("Resources:") {
                    "resources"
                } else {
                    ""
                };
                continue;
            }
            let value = |key: &str| {
                trimmed
                    .strip_prefix(key)
                    .map(|v| v.trim().trim_matches('"').to_string())
            };
            match section {
                "globals" => {
                    if let Some(mb) = value("MemorySize:").and_then(|v| v.parse().ok()) {
                        default_mb = Some(mb);
                    }
                }
                "resources" => {
                    if indent == 2 && trimmed.ends_with(':') {
                        flush(&mut resource, &mut by_binary, &mut secrets);
                        resource = Some(Resource::default());
                        continue;
                    }
                    if let Some(resource) = resource.as_mut() {
                        if let Some(name) = value("Binary:") {
                            resource.binary = Some(name);
                        } else if let Some(mb) = value("MemorySize:").and_then(|v| v.parse().ok()) {
                            resource.memory = Some(mb);
                        } else if let Some((var, _)) = trimmed.split_once(':') {
                            if var.ends_with("_SECRET_ARN") {
                                resource.secrets.push(var.to_string());
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        flush(&mut resource, &mut by_binary, &mut secrets);
        // Functions without their own MemorySize take the global one.
        let default = default_mb.unwrap_or(ASSUMED_MB);
        let mut sizes = Self {
            default_mb: default,
            by_binary,
            secrets,
            source: match default_mb {
                Some(mb) => format!("template.yaml (Globals {mb} MB)"),
                None => format!("template.yaml has no Globals MemorySize: {ASSUMED_MB} MB assumed"),
            },
        };
        sizes.add_binaries_without_size(text);
        sizes
    }

    /// Binaries named in the template whose resource sets no MemorySize get the default.
    fn add_binaries_without_size(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(name) = line.trim().strip_prefix("Binary:") {
                let name = name.trim().trim_matches('"').to_string();
                self.by_binary.entry(name).or_insert(self.default_mb);
            }
        }
    }

    /// Whether `binary`'s function is given the secret named by `arn_var`, as in the template.
    pub fn told_of(&self, binary: &str, arn_var: &str) -> bool {
        self.secrets
            .get(binary)
            .is_some_and(|told| told.iter().any(|v| v == arn_var))
    }

    pub fn of(&self, binary: &str) -> u32 {
        self.by_binary
            .get(binary)
            .copied()
            .unwrap_or(self.default_mb)
    }
}

/// One resource of the template, as far as the scan has read it.
#[derive(Default)]
struct Resource {
    binary: Option<String>,
    memory: Option<u32>,
    secrets: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_come_from_globals_and_each_function() {
        let text = "\
Globals:
  Function:
    Runtime: provided.al2023
    MemorySize: 512
Resources:
  SubmitFunction:
    Type: AWS::Serverless::Function
    Metadata:
      BuildProperties:
        Binary: submit
    Properties:
      Timeout: 20
  SweeperFunction:
    Metadata:
      BuildProperties:
        Binary: sweeper
    Properties:
      MemorySize: 256
      Role: !GetAtt SweeperRole.Arn
";
        let sizes = MemorySizes::parse(text);
        assert_eq!(sizes.of("submit"), 512);
        assert_eq!(sizes.of("sweeper"), 256);
        assert_eq!(sizes.of("unknown"), 512);
    }

    #[test]
    fn each_function_is_told_only_of_its_own_secrets() {
        let text = "\
Resources:
  SubmitFunction:
    Metadata:
      BuildProperties:
        Binary: submit
    Properties:
      Environment:
        Variables:
          TABLE_NAME: !Ref Jobs
  FinalizeFunction:
    Metadata:
      BuildProperties:
        Binary: finalize
    Properties:
      Environment:
        Variables:
          VOLUME_SECRET_ARN: !Ref VolumeSecret
";
        let sizes = MemorySizes::parse(text);
        assert!(sizes.told_of("finalize", "VOLUME_SECRET_ARN"));
        assert!(!sizes.told_of("finalize", "RUNPOD_SECRET_ARN"));
        assert!(!sizes.told_of("submit", "VOLUME_SECRET_ARN"));
    }
}
