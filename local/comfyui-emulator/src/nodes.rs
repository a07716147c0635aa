//! The node types this server knows and ComfyUI's prompt validation (`execution.py`,
//! `validate_prompt`/`validate_inputs`) over them: unknown types, missing outputs, missing
//! required inputs, dangling links and LoadImage's own file check. Input types and combo
//! choices are not checked.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{json, Map, Value};

pub(crate) struct NodeType {
    pub name: &'static str,
    pub display_name: &'static str,
    pub category: &'static str,
    /// (input name, type); a type `COMBO:a|b` is a list of choices.
    pub required: &'static [(&'static str, &'static str)],
    pub optional: &'static [(&'static str, &'static str)],
    pub outputs: &'static [&'static str],
    pub output_node: bool,
}

const SAMPLERS: &str =
    "COMBO:euler|euler_ancestral|heun|dpm_2|dpmpp_2m|dpmpp_sde|dpmpp_2m_sde|ddim|uni_pc";
const SCHEDULERS: &str = "COMBO:normal|karras|exponential|sgm_uniform|simple|ddim_uniform|beta";
const UPSCALE_METHODS: &str = "COMBO:nearest-exact|bilinear|area|bicubic|lanczos";

pub(crate) const NODE_TYPES: &[NodeType] = &[
    NodeType {
        name: "CheckpointLoaderSimple",
        display_name: "Load Checkpoint",
        category: "loaders",
        required: &[("ckpt_name", "COMBO:")],
        optional: &[],
        outputs: &["MODEL", "CLIP", "VAE"],
        output_node: false,
    },
    NodeType {
        name: "CLIPTextEncode",
        display_name: "CLIP Text Encode (Prompt)",
        category: "conditioning",
        required: &[("text", "STRING"), ("clip", "CLIP")],
        optional: &[],
        outputs: &["CONDITIONING"],
        output_node: false,
    },
    NodeType {
        name: "KSampler",
        display_name: "KSampler",
        category: "sampling",
        required: &[
            ("model", "MODEL"),
            ("seed", "INT"),
            ("steps", "INT"),
            ("cfg", "FLOAT"),
            ("sampler_name", SAMPLERS),
            ("scheduler", SCHEDULERS),
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("latent_image", "LATENT"),
            ("denoise", "FLOAT"),
        ],
        optional: &[],
        outputs: &["LATENT"],
        output_node: false,
    },
    NodeType {
        name: "VAEEncode",
        display_name: "VAE Encode",
        category: "latent",
        required: &[("pixels", "IMAGE"), ("vae", "VAE")],
        optional: &[],
        outputs: &["LATENT"],
        output_node: false,
    },
    NodeType {
        name: "VAEDecode",
        display_name: "VAE Decode",
        category: "latent",
        required: &[("samples", "LATENT"), ("vae", "VAE")],
        optional: &[],
        outputs: &["IMAGE"],
        output_node: false,
    },
    NodeType {
        name: "LoadImage",
        display_name: "Load Image",
        category: "image",
        required: &[("image", "COMBO:")],
        optional: &[],
        outputs: &["IMAGE", "MASK"],
        output_node: false,
    },
    NodeType {
        name: "ImageScaleToTotalPixels",
        display_name: "Scale Image to Total Pixels",
        category: "image/upscaling",
        required: &[
            ("image", "IMAGE"),
            ("upscale_method", UPSCALE_METHODS),
            ("megapixels", "FLOAT"),
        ],
        optional: &[("resolution_steps", "INT")],
        outputs: &["IMAGE"],
        output_node: false,
    },
    NodeType {
        name: "SaveImage",
        display_name: "Save Image",
        category: "image",
        required: &[("images", "IMAGE"), ("filename_prefix", "STRING")],
        optional: &[],
        outputs: &[],
        output_node: true,
    },
    NodeType {
        name: "PreviewImage",
        display_name: "Preview Image",
        category: "image",
        required: &[("images", "IMAGE")],
        optional: &[],
        outputs: &[],
        output_node: true,
    },
];

pub(crate) fn node_type(name: &str) -> Option<&'static NodeType> {
    NODE_TYPES.iter().find(|t| t.name == name)
}

pub(crate) fn has_save_image(prompt: &Value) -> bool {
    prompt
        .as_object()
        .is_some_and(|nodes| nodes.values().any(|n| n["class_type"] == "SaveImage"))
}

/// A failed validation: ComfyUI's 400 body `{"error": …, "node_errors": …}`.
#[derive(Debug)]
pub(crate) struct Invalid {
    pub error: Value,
    pub node_errors: Value,
}

pub(crate) fn error(kind: &str, message: &str, details: &str) -> Value {
    json!({"type": kind, "message": message, "details": details, "extra_info": {}})
}

fn invalid(kind: &str, message: &str, details: &str) -> Invalid {
    Invalid {
        error: error(kind, message, details),
        node_errors: json!({}),
    }
}

/// Ids in ComfyUI's usual order: numeric ids numerically, then the rest.
fn sorted_ids<'a>(ids: impl Iterator<Item = &'a String>) -> Vec<&'a String> {
    let mut ids: Vec<&String> = ids.collect();
    ids.sort_by_key(|id| (id.parse::<u64>().unwrap_or(u64::MAX), (*id).clone()));
    ids
}

fn as_link(value: &Value) -> Option<String> {
    let items = value.as_array()?;
    if items.len() != 2 {
        return None;
    }
    match &items[0] {
        Value::String(id) => Some(id.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Validates a prompt; returns the output node ids to execute.
/// `inject` makes it fail as a server missing a model would (the fault switch).
pub(crate) fn validate(
    prompt: &Value,
    input_dir: &Path,
    inject: bool,
) -> Result<Vec<String>, Invalid> {
    let Some(nodes) = prompt.as_object() else {
        return Err(invalid(
            "invalid_prompt",
            "Cannot execute because the prompt is not an object of nodes.",
            "",
        ));
    };
    let mut outputs = Vec::new();
    for id in sorted_ids(nodes.keys()) {
        let Some(class_type) = nodes[id].get("class_type").and_then(Value::as_str) else {
            return Err(invalid(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                &format!("Node ID '#{id}'"),
            ));
        };
        let Some(kind) = node_type(class_type) else {
            return Err(invalid(
                "missing_node_type",
                &format!("Node '{class_type}' not found. The custom node may not be installed."),
                &format!("Node ID '#{id}'"),
            ));
        };
        if kind.output_node {
            outputs.push(id.clone());
        }
    }
    if outputs.is_empty() {
        return Err(invalid("prompt_no_outputs", "Prompt has no outputs", ""));
    }

    let mut checker = Checker {
        nodes,
        input_dir,
        validated: HashMap::new(),
    };
    let mut good = Vec::new();
    let mut failed: Vec<(String, Vec<Value>)> = Vec::new();
    let mut node_errors: BTreeMap<String, Value> = BTreeMap::new();
    for output in &outputs {
        let (valid, reasons) = match checker.node(output) {
            Ok(valid) => (valid, checker.reasons(output)),
            Err(exception) => {
                let reasons = vec![json!({
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": exception,
                    "extra_info": {"exception_type": "KeyError", "traceback": []},
                })];
                checker
                    .validated
                    .insert(output.clone(), (false, reasons.clone()));
                (false, reasons)
            }
        };
        if valid {
            good.push(output.clone());
            continue;
        }
        failed.push((output.clone(), reasons));
        // As ComfyUI: every node with reasons so far counts this output as dependent.
        for (node_id, (valid, reasons)) in &checker.validated {
            if *valid || reasons.is_empty() {
                continue;
            }
            let entry = node_errors.entry(node_id.clone()).or_insert_with(|| {
                json!({
                    "errors": reasons,
                    "dependent_outputs": [],
                    "class_type": nodes[node_id]["class_type"],
                })
            });
            if let Some(list) = entry["dependent_outputs"].as_array_mut() {
                list.push(json!(output));
            }
        }
    }
    if inject && !outputs.is_empty() {
        let (node_id, reason) = injected_reason(nodes, &outputs[0]);
        node_errors.insert(
            node_id.clone(),
            json!({
                "errors": [reason.clone()],
                "dependent_outputs": outputs,
                "class_type": nodes[&node_id]["class_type"],
            }),
        );
        failed = outputs
            .iter()
            .map(|o| (o.clone(), vec![reason.clone()]))
            .collect();
        good.clear();
    }
    if good.is_empty() {
        let details: Vec<String> = failed
            .iter()
            .flat_map(|(_, reasons)| reasons.iter())
            .map(|r| {
                format!(
                    "{}: {}",
                    r["message"].as_str().unwrap_or(""),
                    r["details"].as_str().unwrap_or("")
                )
            })
            .collect();
        return Err(Invalid {
            error: error(
                "prompt_outputs_failed_validation",
                "Prompt outputs failed validation",
                &details.join("\n"),
            ),
            node_errors: json!(node_errors),
        });
    }
    Ok(good)
}

/// The injected failure: a model the server does not have, ComfyUI's most common refusal.
fn injected_reason(nodes: &Map<String, Value>, fallback: &str) -> (String, Value) {
    let found = sorted_ids(nodes.keys()).into_iter().find_map(|id| {
        let inputs = nodes[id].get("inputs")?.as_object()?;
        let (name, value) = inputs.iter().find(|(_, v)| v.is_string())?;
        Some((id.clone(), name.clone(), value.clone()))
    });
    let (id, name, value) = found.unwrap_or_else(|| {
        (
            fallback.to_owned(),
            "filename_prefix".to_owned(),
            json!(null),
        )
    });
    let reason = json!({
        "type": "value_not_in_list",
        "message": "Value not in list",
        "details": format!("{name}: '{}' not in []", value.as_str().unwrap_or("")),
        "extra_info": {"input_name": name, "input_config": null, "received_value": value},
    });
    (id, reason)
}

struct Checker<'a> {
    nodes: &'a Map<String, Value>,
    input_dir: &'a Path,
    /// node id → (valid, reasons); upstream failures leave a node invalid without reasons.
    validated: HashMap<String, (bool, Vec<Value>)>,
}

impl Checker<'_> {
    fn reasons(&self, id: &str) -> Vec<Value> {
        self.validated
            .get(id)
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    }

    /// Whether `id` and everything upstream is valid; `Err` for a link to a missing node, which
    /// ComfyUI meets as a Python `KeyError`. Iterative over the graph's depth would be nicer,
    /// but validated nodes are memoised and the graphs here are small.
    fn node(&mut self, id: &str) -> Result<bool, String> {
        if let Some((valid, _)) = self.validated.get(id) {
            return Ok(*valid);
        }
        // Marks the node first, so a cycle ends instead of recursing forever.
        self.validated.insert(id.to_owned(), (true, Vec::new()));
        let node = &self.nodes[id];
        let class_type = node["class_type"].as_str().unwrap_or("");
        let kind = node_type(class_type).ok_or_else(|| format!("'{class_type}'"))?;
        let empty = Map::new();
        let inputs = node
            .get("inputs")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let mut valid = true;
        let mut reasons = Vec::new();
        for (name, _) in kind.required.iter().chain(kind.optional) {
            let Some(value) = inputs.get(*name) else {
                if kind.required.iter().any(|(n, _)| n == name) {
                    valid = false;
                    reasons.push(json!({
                        "type": "required_input_missing",
                        "message": "Required input is missing",
                        "details": name,
                        "extra_info": {"input_name": name},
                    }));
                }
                continue;
            };
            if let Some(target) = as_link(value) {
                if !self.nodes.contains_key(&target) {
                    return Err(format!("'{target}'"));
                }
                if !self.node(&target)? {
                    valid = false;
                }
            }
        }
        if class_type == "LoadImage" {
            if let Some(image) = inputs.get("image").and_then(Value::as_str) {
                if !input_file_exists(self.input_dir, image) {
                    valid = false;
                    reasons.push(json!({
                        "type": "custom_validation_failed",
                        "message": "Custom validation failed for node",
                        "details": format!("image - Invalid image file: {image}"),
                        "extra_info": {"input_name": "image"},
                    }));
                }
            }
        }
        self.validated.insert(id.to_owned(), (valid, reasons));
        Ok(valid)
    }
}

/// ComfyUI's `exists_annotated_filepath` for the input folder, refusing paths that leave it.
fn input_file_exists(input_dir: &Path, name: &str) -> bool {
    let name = name.strip_suffix(" [input]").unwrap_or(name);
    if name.starts_with('/') || name.split('/').any(|p| p == "..") {
        return false;
    }
    input_dir.join(name).is_file()
}

/// `/object_info` for one node type, in ComfyUI's shape (trimmed to what clients read).
pub(crate) fn object_info(kind: &NodeType, input_files: &[String]) -> Value {
    let spec = |inputs: &[(&str, &str)]| -> Map<String, Value> {
        inputs
            .iter()
            .map(|(name, ty)| {
                let value = match ty.strip_prefix("COMBO:") {
                    Some("") if kind.name == "LoadImage" => {
                        json!([input_files, {"image_upload": true}])
                    }
                    Some("") => json!([[]]),
                    Some(choices) => json!([choices.split('|').collect::<Vec<_>>()]),
                    None => json!([ty, {}]),
                };
                ((*name).to_owned(), value)
            })
            .collect()
    };
    json!({
        "input": {"required": spec(kind.required), "optional": spec(kind.optional)},
        "input_order": {
            "required": kind.required.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            "optional": kind.optional.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        },
        "output": kind.outputs,
        "output_is_list": kind.outputs.iter().map(|_| false).collect::<Vec<_>>(),
        "output_name": kind.outputs,
        "name": kind.name,
        "display_name": kind.display_name,
        "description": "",
        "python_module": "nodes",
        "category": kind.category,
        "output_node": kind.output_node,
        "deprecated": false,
        "experimental": false,
    })
}
