//! The functions' memory sizes, read from `template.yaml` (Globals and each function's
//! `MemorySize`, matched to its binary through `BuildProperties: Binary:`). A plain line scan:
//! CloudFormation's short tags (`!Ref`, `!Sub`) need no YAML library to skip.
use std::collections::HashMap;

pub const ASSUMED_MB: u32 = 512;

#[derive(Clone, Debug)]
pub struct MemorySizes {
    default_mb: u32,
    by_binary: HashMap<String, u32>,
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
                source: format!("no template.yaml: {ASSUMED_MB} MB assumed"),
            },
        }
    }

    pub fn parse(text: &str) -> Self {
        let mut default_mb = None;
        let mut by_binary = HashMap::new();
        let mut section = "";
        let mut resource: Option<(Option<String>, Option<u32>)> = None;
        let flush = |resource: &mut Option<(Option<String>, Option<u32>)>,
                     by_binary: &mut HashMap<String, u32>| {
            if let Some((Some(binary), Some(mb))) = resource.take() {
                by_binary.insert(binary, mb);
            }
        };
        for line in text.lines() {
            let indent = line.len() - line.trim_start().len();
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if indent == 0 {
                flush(&mut resource, &mut by_binary);
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
                        flush(&mut resource, &mut by_binary);
                        resource = Some((None, None));
                        continue;
                    }
                    if let Some((binary, memory)) = resource.as_mut() {
                        if let Some(name) = value("Binary:") {
                            *binary = Some(name);
                        } else if let Some(mb) = value("MemorySize:").and_then(|v| v.parse().ok()) {
                            *memory = Some(mb);
                        }
                    }
                }
                _ => {}
            }
        }
        flush(&mut resource, &mut by_binary);
        // Functions without their own MemorySize take the global one.
        let default = default_mb.unwrap_or(ASSUMED_MB);
        let mut sizes = Self {
            default_mb: default,
            by_binary,
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

    pub fn of(&self, binary: &str) -> u32 {
        self.by_binary
            .get(binary)
            .copied()
            .unwrap_or(self.default_mb)
    }
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
}
