//! The workflow catalog: ComfyUI API-format graphs plus the manifests that expose a few of their
//! inputs as public, typed, bounded parameters.
//!
//! A manifest is checked against its graph when the catalog is built, so a typo in a manifest
//! fails the tests (and the cold start) instead of a GPU job. See `workflows/README.md` for the
//! manifest format.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use super::job::BackendKind;
use serde_json::{Map, Number, Value};

/// The workflows shipped in `workflows/`: (label, manifest, workflow). Adding one is a data change
/// plus a line here; `every_manifest_in_the_folder_is_builtin` fails until the line is added.
const BUILTIN: &[(&str, &str, &str)] = &[
    (
        "workflows/restore.manifest.json",
        include_str!("../../../../workflows/restore.manifest.json"),
        include_str!("../../../../workflows/restore.json"),
    ),
    (
        "workflows/restore-comfyui.manifest.json",
        include_str!("../../../../workflows/restore-comfyui.manifest.json"),
        include_str!("../../../../workflows/restore-comfyui.json"),
    ),
];

/// The keyword a manifest uses for "pick a value per job"; only integer parameters accept it.
const RANDOM: &str = "random";

/// How the worker hands back what a workflow produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputContract {
    /// The seed's handler: input `{"workflow_api": graph}`; it writes files on the network
    /// volume and returns their absolute paths (`{"prompt_id", "files", "file_count"}`).
    VolumeFiles,
    /// The stock runpod-workers/worker-comfyui image: input `{"workflow": graph}`; it returns
    /// the images in the job output, `{"images": [{"filename", "type": "base64" | "s3_url",
    /// "data"}]}` (base64 bytes, or a URL to fetch).
    WorkerComfyui,
    /// A ComfyUI server's own: the files its history lists for the prompt, fetched back
    /// through its `/view` (the pod backend's, whatever the workflow's serverless contract).
    ComfyView,
}

impl OutputContract {
    /// The key of the job input that carries the rendered graph, as the worker expects it.
    /// Nothing else goes into the input: images travel through the volume, never as base64.
    pub fn input_key(self) -> &'static str {
        match self {
            Self::VolumeFiles => "workflow_api",
            Self::WorkerComfyui | Self::ComfyView => "workflow",
        }
    }
}

/// Where a value goes in the graph: `graph[node].inputs[input]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    pub node: String,
    pub input: String,
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.inputs.{}", self.node, self.input)
    }
}

/// The type and bounds of one public parameter.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ParamKind {
    Number { min: f64, max: f64 },
    Integer { min: i64, max: i64 },
    String { choices: Vec<String> },
}

/// What a parameter takes when the client leaves it out.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamDefault {
    Value(Value),
    /// Drawn once at validation, so the stored parameters are exactly what runs.
    Random,
}

impl Serialize for ParamDefault {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ParamDefault::Value(v) => v.serialize(serializer),
            ParamDefault::Random => serializer.serialize_str(RANDOM),
        }
    }
}

/// One public parameter of a workflow, as checked at load. Serialises in the manifest's shape
/// (less the binding), so an API can list what a workflow accepts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParamSpec {
    #[serde(flatten)]
    pub kind: ParamKind,
    /// `None`: the parameter is required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<ParamDefault>,
    #[serde(skip)]
    pub binding: Binding,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// Parameters after [`Workflow::validate`]: every parameter of the workflow present, typed and in
/// bounds, random defaults already drawn.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ValidatedParams(pub BTreeMap<String, Value>);

/// A client parameter that was refused; `param` names it so the API can point at it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

impl ParamError {
    fn new(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: param.to_owned(),
            message: message.into(),
        }
    }
}

/// A manifest or workflow that cannot be served. `source_name` says where it came from (a file in
/// `workflows/`, or the position of a pair given to [`WorkflowCatalog::from_sources`]).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{source_name}: invalid manifest: {error}")]
    InvalidManifest {
        source_name: String,
        error: serde_json::Error,
    },
    #[error("{workflow}: invalid workflow JSON: {error}")]
    InvalidWorkflowJson {
        workflow: String,
        error: serde_json::Error,
    },
    #[error("{workflow}: not a ComfyUI API-format graph: {reason}")]
    InvalidGraph { workflow: String, reason: String },
    #[error("{workflow}: {reason}")]
    InvalidManifestField { workflow: String, reason: String },
    #[error("{workflow}: {binding} is bound to node {node:?}, which the workflow does not have")]
    UnknownNode {
        workflow: String,
        binding: String,
        node: String,
    },
    #[error(
        "{workflow}: {binding} is bound to input {input:?} of node {node:?}, which has no such input"
    )]
    UnknownInput {
        workflow: String,
        binding: String,
        node: String,
        input: String,
    },
    #[error("{workflow}: {binding} cannot be bound to {target}: {reason}")]
    BadBinding {
        workflow: String,
        binding: String,
        target: Binding,
        reason: String,
    },
    #[error("{workflow}: parameter {param}: {reason}")]
    InvalidParam {
        workflow: String,
        param: String,
        reason: String,
    },
    #[error("workflow {workflow:?} is defined twice")]
    DuplicateName { workflow: String },
}

/// Every workflow the gateway can run, by name.
#[derive(Clone, Debug)]
pub struct WorkflowCatalog {
    workflows: BTreeMap<String, Workflow>,
}

impl WorkflowCatalog {
    /// The workflows shipped in the repo's workflows/ folder, embedded at build time
    /// (include_str!), manifest checked against its workflow.
    pub fn builtin() -> Result<Self, CatalogError> {
        Self::build(
            BUILTIN
                .iter()
                .map(|(label, manifest, workflow)| (label.to_string(), *manifest, *workflow)),
        )
    }

    /// For tests/tools: build from (manifest JSON, workflow JSON) pairs.
    pub fn from_sources(pairs: &[(&str, &str)]) -> Result<Self, CatalogError> {
        Self::build(
            pairs
                .iter()
                .enumerate()
                .map(|(i, (manifest, workflow))| (format!("source #{i}"), *manifest, *workflow)),
        )
    }

    fn build<'a>(
        sources: impl Iterator<Item = (String, &'a str, &'a str)>,
    ) -> Result<Self, CatalogError> {
        let mut workflows = BTreeMap::new();
        for (label, manifest, graph) in sources {
            let workflow = Workflow::load(&label, manifest, graph)?;
            if workflows.contains_key(&workflow.name) {
                return Err(CatalogError::DuplicateName {
                    workflow: workflow.name,
                });
            }
            workflows.insert(workflow.name.clone(), workflow);
        }
        Ok(Self { workflows })
    }

    pub fn get(&self, name: &str) -> Option<&Workflow> {
        self.workflows.get(name)
    }

    /// Sorted, so listings are stable.
    pub fn names(&self) -> Vec<&str> {
        self.workflows.keys().map(String::as_str).collect()
    }

    /// Every workflow, by name.
    pub fn workflows(&self) -> impl Iterator<Item = &Workflow> {
        self.workflows.values()
    }
}

/// A workflow graph with its checked manifest.
#[derive(Clone, Debug)]
pub struct Workflow {
    name: String,
    version: String,
    description: String,
    output_contract: OutputContract,
    backends: Vec<BackendKind>,
    input_image: Binding,
    output: Binding,
    params: BTreeMap<String, ParamSpec>,
    template: Map<String, Value>,
}

impl Workflow {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn output_contract(&self) -> OutputContract {
        self.output_contract
    }

    /// The backends its manifest says the graph runs on.
    pub fn backends(&self) -> &[BackendKind] {
        &self.backends
    }

    /// The public parameters, sorted by name.
    pub fn params(&self) -> &BTreeMap<String, ParamSpec> {
        &self.params
    }

    /// The `params` a job of this workflow accepts, as a JSON Schema (2020-12, the dialect of
    /// OpenAPI 3.1): what [`Workflow::validate`] checks, bounds and choices included. A
    /// parameter drawn at random when left out has no `default` and says so.
    pub fn params_schema(&self) -> Value {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for (name, spec) in &self.params {
            let mut schema = match &spec.kind {
                ParamKind::Number { min, max } => {
                    serde_json::json!({"type": "number", "minimum": min, "maximum": max})
                }
                ParamKind::Integer { min, max } => {
                    serde_json::json!({"type": "integer", "minimum": min, "maximum": max})
                }
                ParamKind::String { choices } => {
                    serde_json::json!({"type": "string", "enum": choices})
                }
            };
            let fields = schema.as_object_mut().expect("an object");
            let mut description = spec.description.clone();
            match &spec.default {
                Some(ParamDefault::Value(value)) => {
                    fields.insert("default".into(), value.clone());
                }
                Some(ParamDefault::Random) => {
                    if !description.is_empty() {
                        description.push(' ');
                    }
                    description
                        .push_str("Drawn at random when left out; the job shows the value drawn.");
                }
                None => required.push(Value::from(name.as_str())),
            }
            if !description.is_empty() {
                fields.insert("description".into(), Value::from(description));
            }
            properties.insert(name.clone(), schema);
        }
        let mut schema = serde_json::json!({
            "type": "object",
            "additionalProperties": false,
            "properties": properties,
        });
        if !required.is_empty() {
            schema["required"] = Value::from(required);
        }
        schema
    }

    /// Checks client params: rejects unknown names, wrong JSON types, non-whole integers,
    /// non-finite and out-of-bounds values; fills defaults, drawing "random" ones from `rng` so
    /// the stored params are exactly what will run (a retry renders the same graph).
    ///
    /// Errors are reported one at a time, unknown names first, then in parameter-name order, so
    /// the same request always gets the same answer.
    pub fn validate(
        &self,
        params: &Map<String, Value>,
        rng: &mut impl rand::Rng,
    ) -> Result<ValidatedParams, ParamError> {
        if let Some(unknown) = params.keys().find(|k| !self.params.contains_key(*k)) {
            return Err(ParamError::new(unknown, "unknown parameter"));
        }
        let mut out = BTreeMap::new();
        for (name, spec) in &self.params {
            let value = match (params.get(name), &spec.default) {
                (Some(given), _) => check_value(name, &spec.kind, given)?,
                (None, Some(ParamDefault::Value(v))) => v.clone(),
                (None, Some(ParamDefault::Random)) => match spec.kind {
                    ParamKind::Integer { min, max } => Value::from(rng.random_range(min..=max)),
                    // Refused at load: "random" is only accepted for integers.
                    _ => unreachable!("random default on a non-integer parameter"),
                },
                (None, None) => return Err(ParamError::new(name, "is required")),
            };
            out.insert(name.clone(), value);
        }
        Ok(ValidatedParams(out))
    }

    /// The ComfyUI API-format graph with every bound input set: params, the input image (a
    /// volume-relative key like "inputs/<job>/input.jpg") and the output filename prefix (like
    /// "outputs/<job>/restored"). The template is left untouched.
    ///
    /// `params` is expected to come from [`Workflow::validate`]; a name the manifest does not
    /// bind is ignored and a missing one keeps the template's value.
    pub fn render(
        &self,
        params: &ValidatedParams,
        input_image_key: &str,
        output_prefix: &str,
    ) -> Value {
        let mut graph = self.template.clone();
        for (name, value) in &params.0 {
            if let Some(spec) = self.params.get(name) {
                set_input(&mut graph, &spec.binding, value.clone());
            }
        }
        set_input(&mut graph, &self.input_image, input_image_key.into());
        set_input(&mut graph, &self.output, output_prefix.into());
        Value::Object(graph)
    }

    fn load(label: &str, manifest: &str, graph: &str) -> Result<Self, CatalogError> {
        let raw: RawManifest =
            serde_json::from_str(manifest).map_err(|error| CatalogError::InvalidManifest {
                source_name: label.to_owned(),
                error,
            })?;
        let name = raw.name;
        let field_error = |reason: &str| CatalogError::InvalidManifestField {
            workflow: name.clone(),
            reason: reason.to_owned(),
        };
        // The name travels in request bodies, job records and logs: keep it a plain slug.
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(field_error(
                "name must be non-empty and use only a-z, 0-9, '_' and '-'",
            ));
        }
        if raw.version.trim().is_empty() {
            return Err(field_error("version must not be empty"));
        }
        // How a serverless worker hands its outputs back; a ComfyUI server's own way is the
        // pod backend's, never a manifest's to claim.
        if raw.output_contract == OutputContract::ComfyView {
            return Err(field_error(
                "output_contract must be volume_files or worker_comfyui",
            ));
        }
        if raw.backends.is_empty() {
            return Err(field_error("backends must name at least one backend"));
        }
        let template = parse_graph(&name, graph)?;

        let mut bound = BTreeSet::new();
        let mut bind = |what: &str, binding: &Binding, expect: JsonType| {
            check_binding(&name, &template, what, binding, expect)?;
            // Two bindings on one input would silently let one overwrite the other.
            if !bound.insert((binding.node.clone(), binding.input.clone())) {
                return Err(CatalogError::BadBinding {
                    workflow: name.clone(),
                    binding: what.to_owned(),
                    target: binding.clone(),
                    reason: "the input is already bound".to_owned(),
                });
            }
            Ok(())
        };
        bind("input_image", &raw.input_image, JsonType::String)?;
        bind("output", &raw.output, JsonType::String)?;
        let mut params = BTreeMap::new();
        for (param, raw_param) in raw.params {
            let spec = raw_param.into_spec(&name, &param)?;
            let expect = match spec.kind {
                ParamKind::Number { .. } | ParamKind::Integer { .. } => JsonType::Number,
                ParamKind::String { .. } => JsonType::String,
            };
            bind(&format!("parameter {param}"), &spec.binding, expect)?;
            params.insert(param, spec);
        }

        Ok(Self {
            name,
            version: raw.version,
            description: raw.description,
            output_contract: raw.output_contract,
            backends: raw.backends,
            input_image: raw.input_image,
            output: raw.output,
            params,
            template,
        })
    }
}

/// Checks one client value against its parameter's type and bounds, returning it in the form the
/// graph wants (numbers as floats, integers as integers).
fn check_value(name: &str, kind: &ParamKind, given: &Value) -> Result<Value, ParamError> {
    match kind {
        ParamKind::Number { min, max } => {
            let x = given
                .as_f64()
                .ok_or_else(|| ParamError::new(name, "must be a number"))?;
            if !x.is_finite() {
                return Err(ParamError::new(name, "must be a finite number"));
            }
            if x < *min || x > *max {
                return Err(ParamError::new(
                    name,
                    format!("must be between {min} and {max}"),
                ));
            }
            Ok(Value::from(x))
        }
        ParamKind::Integer { min, max } => {
            let out_of_bounds =
                || ParamError::new(name, format!("must be between {min} and {max}"));
            let Value::Number(n) = given else {
                return Err(ParamError::new(name, "must be an integer"));
            };
            let x = if let Some(i) = n.as_i64() {
                i
            } else if n.is_u64() {
                // Above i64::MAX, so above any bound a manifest can state.
                return Err(out_of_bounds());
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if !f.is_finite() {
                    return Err(ParamError::new(name, "must be a finite number"));
                }
                if f.fract() != 0.0 {
                    return Err(ParamError::new(name, "must be a whole number"));
                }
                // Compare as floats first: casting a huge float to i64 would saturate.
                if f < *min as f64 || f > *max as f64 {
                    return Err(out_of_bounds());
                }
                f as i64
            };
            if x < *min || x > *max {
                return Err(out_of_bounds());
            }
            Ok(Value::from(x))
        }
        ParamKind::String { choices } => {
            let s = given
                .as_str()
                .ok_or_else(|| ParamError::new(name, "must be a string"))?;
            if !choices.iter().any(|c| c == s) {
                return Err(ParamError::new(
                    name,
                    format!("must be one of: {}", choices.join(", ")),
                ));
            }
            Ok(Value::from(s))
        }
    }
}

fn set_input(graph: &mut Map<String, Value>, binding: &Binding, value: Value) {
    // Load-time checks guarantee the slot exists; `if let` keeps render total anyway.
    if let Some(slot) = graph
        .get_mut(&binding.node)
        .and_then(|node| node.get_mut("inputs"))
        .and_then(|inputs| inputs.get_mut(&binding.input))
    {
        *slot = value;
    }
}

fn parse_graph(workflow: &str, graph: &str) -> Result<Map<String, Value>, CatalogError> {
    let invalid = |reason: String| CatalogError::InvalidGraph {
        workflow: workflow.to_owned(),
        reason,
    };
    let value: Value =
        serde_json::from_str(graph).map_err(|error| CatalogError::InvalidWorkflowJson {
            workflow: workflow.to_owned(),
            error,
        })?;
    let Value::Object(nodes) = value else {
        return Err(invalid("the top level must be an object of nodes".into()));
    };
    if nodes.is_empty() {
        return Err(invalid("it has no nodes".into()));
    }
    for (id, node) in &nodes {
        if !node.get("class_type").is_some_and(Value::is_string) {
            return Err(invalid(format!("node {id:?} has no class_type string")));
        }
        if !node.get("inputs").is_some_and(Value::is_object) {
            return Err(invalid(format!("node {id:?} has no inputs object")));
        }
    }
    Ok(nodes)
}

#[derive(Clone, Copy)]
enum JsonType {
    Number,
    String,
}

fn check_binding(
    workflow: &str,
    template: &Map<String, Value>,
    what: &str,
    binding: &Binding,
    expect: JsonType,
) -> Result<(), CatalogError> {
    let Some(node) = template.get(&binding.node) else {
        return Err(CatalogError::UnknownNode {
            workflow: workflow.to_owned(),
            binding: what.to_owned(),
            node: binding.node.clone(),
        });
    };
    let Some(current) = node.get("inputs").and_then(|i| i.get(&binding.input)) else {
        return Err(CatalogError::UnknownInput {
            workflow: workflow.to_owned(),
            binding: what.to_owned(),
            node: binding.node.clone(),
            input: binding.input.clone(),
        });
    };
    // The template's own value shows what the node expects; a link (`["id", n]`) would be cut
    // out of the graph, and a type change means the binding points at the wrong input.
    let reason = match (expect, current) {
        (_, Value::Array(_)) => Some("the input is a link to another node"),
        (JsonType::Number, Value::Number(_)) | (JsonType::String, Value::String(_)) => None,
        (JsonType::Number, _) => Some("the template's value there is not a number"),
        (JsonType::String, _) => Some("the template's value there is not a string"),
    };
    match reason {
        Some(reason) => Err(CatalogError::BadBinding {
            workflow: workflow.to_owned(),
            binding: what.to_owned(),
            target: binding.clone(),
            reason: reason.to_owned(),
        }),
        None => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    version: String,
    #[serde(default)]
    description: String,
    output_contract: OutputContract,
    /// The backends the graph runs on; serverless alone when left out.
    #[serde(default = "serverless_only")]
    backends: Vec<BackendKind>,
    input_image: Binding,
    output: Binding,
    #[serde(default)]
    params: BTreeMap<String, RawParam>,
}

fn serverless_only() -> Vec<BackendKind> {
    vec![BackendKind::Serverless]
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawKind {
    Number,
    Integer,
    String,
}

/// Kept flat (rather than a tagged enum) so a mistake gets a message naming the parameter and
/// the field, not serde's generic one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParam {
    #[serde(rename = "type")]
    kind: RawKind,
    min: Option<Number>,
    max: Option<Number>,
    choices: Option<Vec<String>>,
    default: Option<Value>,
    node: String,
    input: String,
    #[serde(default)]
    description: String,
}

impl RawParam {
    fn into_spec(self, workflow: &str, param: &str) -> Result<ParamSpec, CatalogError> {
        let invalid = |reason: String| CatalogError::InvalidParam {
            workflow: workflow.to_owned(),
            param: param.to_owned(),
            reason,
        };
        let kind = match self.kind {
            // Bounds are mandatory: every knob that reaches a GPU must be capped.
            RawKind::Number => {
                if self.choices.is_some() {
                    return Err(invalid("choices only apply to string parameters".into()));
                }
                let bound = |n: &Option<Number>, which: &str| {
                    n.as_ref()
                        .and_then(Number::as_f64)
                        .filter(|x| x.is_finite())
                        .ok_or_else(|| invalid(format!("{which} must be a finite number")))
                };
                ParamKind::Number {
                    min: bound(&self.min, "min")?,
                    max: bound(&self.max, "max")?,
                }
            }
            RawKind::Integer => {
                if self.choices.is_some() {
                    return Err(invalid("choices only apply to string parameters".into()));
                }
                let bound = |n: &Option<Number>, which: &str| {
                    n.as_ref()
                        .and_then(Number::as_i64)
                        .ok_or_else(|| invalid(format!("{which} must be an integer")))
                };
                ParamKind::Integer {
                    min: bound(&self.min, "min")?,
                    max: bound(&self.max, "max")?,
                }
            }
            RawKind::String => {
                if self.min.is_some() || self.max.is_some() {
                    return Err(invalid("min and max only apply to numbers".into()));
                }
                match self.choices {
                    Some(choices) if !choices.is_empty() => ParamKind::String { choices },
                    _ => {
                        return Err(invalid(
                            "a string parameter needs a non-empty choices list".into(),
                        ))
                    }
                }
            }
        };
        match kind {
            ParamKind::Number { min, max } if min > max => {
                return Err(invalid(format!("min {min} is greater than max {max}")))
            }
            ParamKind::Integer { min, max } if min > max => {
                return Err(invalid(format!("min {min} is greater than max {max}")))
            }
            _ => {}
        }
        let default = match self.default {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == RANDOM && !matches!(kind, ParamKind::String { .. }) => {
                if !matches!(kind, ParamKind::Integer { .. }) {
                    return Err(invalid(
                        "only integer parameters can default to random".into(),
                    ));
                }
                Some(ParamDefault::Random)
            }
            // The default goes through the same check as a client value, so it is in bounds
            // and stored in the same form.
            Some(v) => Some(ParamDefault::Value(
                check_value(param, &kind, &v)
                    .map_err(|e| invalid(format!("default {v}: {}", e.message)))?,
            )),
        };
        Ok(ParamSpec {
            kind,
            default,
            binding: Binding {
                node: self.node,
                input: self.input,
            },
            description: self.description,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use serde_json::json;

    const GRAPH: &str = include_str!("../../../../workflows/restore.json");
    const MANIFEST: &str = include_str!("../../../../workflows/restore.manifest.json");

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn restore() -> Workflow {
        WorkflowCatalog::builtin()
            .unwrap()
            .get("restore")
            .unwrap()
            .clone()
    }

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    /// The builtin manifest with `edit` applied, loaded against the builtin graph.
    fn load_edited(edit: impl FnOnce(&mut Value)) -> Result<WorkflowCatalog, CatalogError> {
        let mut manifest: Value = serde_json::from_str(MANIFEST).unwrap();
        edit(&mut manifest);
        let manifest = manifest.to_string();
        WorkflowCatalog::from_sources(&[(&manifest, GRAPH)])
    }

    #[test]
    fn the_params_schema_states_each_bound_default_and_description() {
        let schema = restore().params_schema();
        assert_eq!(schema["type"], "object");
        assert_eq!(schema["additionalProperties"], false);
        let megapixels = &schema["properties"]["megapixels"];
        assert_eq!(megapixels["type"], "number");
        assert_eq!(megapixels["minimum"], 0.01);
        assert_eq!(megapixels["maximum"], 4.0);
        assert_eq!(megapixels["default"], 1.0);
        let seed = &schema["properties"]["seed"];
        assert_eq!(seed["type"], "integer");
        assert!(
            seed.get("default").is_none(),
            "a random default is no default"
        );
        assert!(seed["description"].as_str().unwrap().contains("random"));
        assert!(
            schema.get("required").is_none(),
            "every parameter has a default"
        );
    }

    #[test]
    fn a_parameter_without_a_default_is_required_in_the_schema() {
        let catalog = load_edited(|m| {
            m["params"]["denoise"]
                .as_object_mut()
                .unwrap()
                .remove("default");
        })
        .unwrap();
        let schema = catalog.get("restore").unwrap().params_schema();
        assert_eq!(schema["required"], serde_json::json!(["denoise"]));
    }

    #[test]
    fn builtin_has_restore_with_its_contract() {
        let catalog = WorkflowCatalog::builtin().unwrap();
        assert_eq!(catalog.names(), vec!["restore", "restore-comfyui"]);
        let wf = catalog.get("restore").unwrap();
        assert_eq!(wf.name(), "restore");
        assert_eq!(wf.version(), "1");
        assert_eq!(wf.output_contract(), OutputContract::VolumeFiles);
        assert_eq!(wf.output_contract().input_key(), "workflow_api");
        assert!(catalog.get("nope").is_none());
    }

    #[test]
    fn builtin_restore_comfyui_is_the_same_graph_under_the_worker_comfyui_contract() {
        let catalog = WorkflowCatalog::builtin().unwrap();
        let comfy = catalog.get("restore-comfyui").unwrap();
        assert_eq!(comfy.output_contract(), OutputContract::WorkerComfyui);
        assert_eq!(comfy.output_contract().input_key(), "workflow");
        let restore = catalog.get("restore").unwrap();
        assert_eq!(comfy.params(), restore.params());
        let p = restore.validate(&Map::new(), &mut rng()).unwrap();
        assert_eq!(
            comfy.render(&p, "inputs/j/input.jpg", "outputs/j/x"),
            restore.render(&p, "inputs/j/input.jpg", "outputs/j/x")
        );
        let contract: OutputContract = serde_json::from_value(json!("worker_comfyui")).unwrap();
        assert_eq!(contract, OutputContract::WorkerComfyui);
    }

    #[test]
    fn builtin_restore_renders_every_bound_input() {
        let wf = restore();
        let p = wf
            .validate(
                &params(json!({"megapixels": 2, "denoise": 0.5, "seed": 42})),
                &mut rng(),
            )
            .unwrap();
        let g = wf.render(&p, "inputs/j1/input.jpg", "outputs/j1/restored");
        assert_eq!(g["93"]["inputs"]["megapixels"], json!(2.0));
        assert_eq!(g["3"]["inputs"]["denoise"], json!(0.5));
        assert_eq!(g["3"]["inputs"]["seed"], json!(42));
        assert_eq!(g["78"]["inputs"]["image"], json!("inputs/j1/input.jpg"));
        assert_eq!(
            g["60"]["inputs"]["filename_prefix"],
            json!("outputs/j1/restored")
        );
        // Unbound inputs and links are carried over as they are.
        assert_eq!(g["3"]["inputs"]["model"], json!(["4", 0]));
        assert_eq!(g["3"]["inputs"]["steps"], json!(8));
    }

    #[test]
    fn every_manifest_in_the_folder_is_builtin() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../workflows");
        let catalog = WorkflowCatalog::builtin().unwrap();
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_str().unwrap().to_owned();
            let Some(stem) = file.strip_suffix(".manifest.json") else {
                continue;
            };
            seen += 1;
            let manifest = std::fs::read_to_string(&path).unwrap();
            let graph = std::fs::read_to_string(dir.join(format!("{stem}.json")))
                .unwrap_or_else(|e| panic!("{file} has no {stem}.json beside it: {e}"));
            let on_disk = WorkflowCatalog::from_sources(&[(&manifest, &graph)])
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(
                on_disk.names(),
                vec![stem],
                "{file}: name must match the file name"
            );
            let builtin = catalog
                .get(stem)
                .unwrap_or_else(|| panic!("{file} is not listed in BUILTIN"));
            assert_eq!(builtin.version(), on_disk.get(stem).unwrap().version());
        }
        assert_eq!(
            seen,
            catalog.names().len(),
            "BUILTIN lists a workflow not in the folder"
        );
    }

    #[test]
    fn validate_fills_fixed_defaults() {
        let p = restore().validate(&Map::new(), &mut rng()).unwrap();
        assert_eq!(p.0["megapixels"], json!(1.0));
        assert_eq!(p.0["denoise"], json!(0.7));
        assert_eq!(p.0.len(), 3);
    }

    #[test]
    fn validate_draws_random_default_within_bounds_from_the_rng() {
        let wf = restore();
        let a = wf.validate(&Map::new(), &mut rng()).unwrap();
        let b = wf.validate(&Map::new(), &mut rng()).unwrap();
        assert_eq!(a, b, "same rng state, same seed");
        let seed = a.0["seed"].as_i64().unwrap();
        assert!((0..=4_294_967_295).contains(&seed));
        let c = wf
            .validate(&Map::new(), &mut StdRng::seed_from_u64(8))
            .unwrap();
        assert_ne!(a.0["seed"], c.0["seed"]);
    }

    #[test]
    fn validate_keeps_a_given_seed() {
        let p = restore()
            .validate(&params(json!({"seed": 4294967295u64})), &mut rng())
            .unwrap();
        assert_eq!(p.0["seed"], json!(4294967295u64));
    }

    #[test]
    fn validate_rejects_unknown_parameter() {
        let err = restore()
            .validate(&params(json!({"steps": 50})), &mut rng())
            .unwrap_err();
        assert_eq!(err, ParamError::new("steps", "unknown parameter"));
    }

    #[test]
    fn validate_rejects_string_for_number() {
        let err = restore()
            .validate(&params(json!({"denoise": "0.5"})), &mut rng())
            .unwrap_err();
        assert_eq!(err.to_string(), "denoise: must be a number");
    }

    #[test]
    fn validate_rejects_out_of_bounds_number() {
        let err = restore()
            .validate(&params(json!({"denoise": 1.5})), &mut rng())
            .unwrap_err();
        assert_eq!(err.to_string(), "denoise: must be between 0 and 1");
    }

    #[test]
    fn validate_accepts_bounds_inclusively() {
        let p = restore()
            .validate(
                &params(json!({"denoise": 0, "megapixels": 4.0})),
                &mut rng(),
            )
            .unwrap();
        assert_eq!(p.0["denoise"], json!(0.0));
        assert_eq!(p.0["megapixels"], json!(4.0));
    }

    #[test]
    fn validate_rejects_fractional_integer() {
        let err = restore()
            .validate(&params(json!({"seed": 1.5})), &mut rng())
            .unwrap_err();
        assert_eq!(err.to_string(), "seed: must be a whole number");
    }

    #[test]
    fn validate_accepts_whole_float_as_integer() {
        let p = restore()
            .validate(&params(json!({"seed": 12.0})), &mut rng())
            .unwrap();
        assert_eq!(p.0["seed"], json!(12));
    }

    #[test]
    fn validate_rejects_negative_and_huge_integers() {
        let wf = restore();
        for v in [
            json!(-1),
            json!(4294967296u64),
            json!(u64::MAX),
            json!(1e300),
        ] {
            let err = wf
                .validate(&params(json!({ "seed": v })), &mut rng())
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                "seed: must be between 0 and 4294967295",
                "{v}"
            );
        }
    }

    #[test]
    fn validate_rejects_non_number_types_for_integer() {
        let wf = restore();
        for v in [json!("1"), json!(true), json!(null), json!([1]), json!({})] {
            let err = wf
                .validate(&params(json!({ "seed": v })), &mut rng())
                .unwrap_err();
            assert_eq!(err.message, "must be an integer", "{v}");
        }
    }

    #[test]
    fn check_value_rejects_non_finite_numbers() {
        // serde_json turns a non-finite float into null, which must not pass as a number.
        let kind = ParamKind::Number { min: 0.0, max: 1.0 };
        for x in [f64::NAN, f64::INFINITY] {
            assert!(check_value("x", &kind, &json!(x)).is_err());
        }
    }

    #[test]
    fn validate_requires_a_parameter_without_default() {
        let wf = load_edited(|m| m["params"]["denoise"]["default"] = Value::Null).unwrap();
        let err = wf
            .get("restore")
            .unwrap()
            .validate(&Map::new(), &mut rng())
            .unwrap_err();
        assert_eq!(err.to_string(), "denoise: is required");
    }

    #[test]
    fn validate_checks_string_choices() {
        let catalog = load_edited(|m| {
            m["params"]["sampler"] = json!({"type": "string", "choices": ["dpmpp_sde", "euler"],
                "default": "dpmpp_sde", "node": "3", "input": "sampler_name"});
        })
        .unwrap();
        let wf = catalog.get("restore").unwrap();
        let ok = wf
            .validate(&params(json!({"sampler": "euler"})), &mut rng())
            .unwrap();
        assert_eq!(ok.0["sampler"], json!("euler"));
        let err = wf
            .validate(&params(json!({"sampler": "ddim"})), &mut rng())
            .unwrap_err();
        assert_eq!(err.to_string(), "sampler: must be one of: dpmpp_sde, euler");
    }

    #[test]
    fn render_does_not_mutate_the_template() {
        let wf = restore();
        let p = wf
            .validate(&params(json!({"denoise": 0.1})), &mut rng())
            .unwrap();
        let _ = wf.render(&p, "inputs/a/input.jpg", "outputs/a/restored");
        let again = wf.render(&ValidatedParams::default(), "k", "o");
        assert_eq!(again["3"]["inputs"]["denoise"], json!(0.7));
        assert_eq!(again["3"]["inputs"]["seed"], json!(0));
    }

    #[test]
    fn render_ignores_names_the_manifest_does_not_bind() {
        let wf = restore();
        let mut p = ValidatedParams::default();
        p.0.insert("steps".into(), json!(500));
        let g = wf.render(&p, "k", "o");
        assert_eq!(g["3"]["inputs"]["steps"], json!(8));
    }

    #[test]
    fn validated_params_serialise_as_a_plain_object() {
        let p = restore()
            .validate(&params(json!({"seed": 5})), &mut rng())
            .unwrap();
        let s = serde_json::to_value(&p).unwrap();
        assert_eq!(s, json!({"denoise": 0.7, "megapixels": 1.0, "seed": 5}));
        assert_eq!(serde_json::from_value::<ValidatedParams>(s).unwrap(), p);
    }

    #[test]
    fn param_specs_serialise_for_listing() {
        let wf = restore();
        let s = serde_json::to_value(wf.params()).unwrap();
        assert_eq!(s["seed"]["type"], json!("integer"));
        assert_eq!(s["seed"]["default"], json!("random"));
        assert_eq!(s["denoise"]["max"], json!(1.0));
        assert!(s["denoise"].get("node").is_none());
    }

    #[test]
    fn load_rejects_invalid_manifest_json() {
        let err = WorkflowCatalog::from_sources(&[("{", GRAPH)]).unwrap_err();
        assert!(matches!(err, CatalogError::InvalidManifest { .. }), "{err}");
    }

    #[test]
    fn load_rejects_invalid_workflow_json() {
        let err = WorkflowCatalog::from_sources(&[(MANIFEST, "[1,")]).unwrap_err();
        assert!(
            matches!(err, CatalogError::InvalidWorkflowJson { .. }),
            "{err}"
        );
    }

    #[test]
    fn load_rejects_graph_that_is_not_api_format() {
        let err =
            WorkflowCatalog::from_sources(&[(MANIFEST, r#"{"3": {"inputs": {}}}"#)]).unwrap_err();
        assert!(matches!(err, CatalogError::InvalidGraph { .. }), "{err}");
    }

    #[test]
    fn load_rejects_unknown_manifest_field() {
        let err = load_edited(|m| m["outputs"] = json!("x")).unwrap_err();
        assert!(matches!(err, CatalogError::InvalidManifest { .. }), "{err}");
    }

    #[test]
    fn load_rejects_unknown_output_contract() {
        let err = load_edited(|m| m["output_contract"] = json!("carrier_pigeon")).unwrap_err();
        assert!(matches!(err, CatalogError::InvalidManifest { .. }), "{err}");
    }

    #[test]
    fn load_rejects_binding_to_missing_node() {
        let err = load_edited(|m| m["params"]["denoise"]["node"] = json!("999")).unwrap_err();
        assert!(
            matches!(&err, CatalogError::UnknownNode { node, .. } if node == "999"),
            "{err}"
        );
    }

    #[test]
    fn load_rejects_binding_to_missing_input() {
        let err = load_edited(|m| m["input_image"]["input"] = json!("picture")).unwrap_err();
        assert!(
            matches!(&err, CatalogError::UnknownInput { input, .. } if input == "picture"),
            "{err}"
        );
    }

    #[test]
    fn load_rejects_binding_to_a_link() {
        let err =
            load_edited(|m| m["output"] = json!({"node": "60", "input": "images"})).unwrap_err();
        assert!(matches!(err, CatalogError::BadBinding { .. }), "{err}");
    }

    #[test]
    fn load_rejects_binding_of_the_wrong_type() {
        let err =
            load_edited(|m| m["params"]["denoise"]["input"] = json!("sampler_name")).unwrap_err();
        assert!(matches!(err, CatalogError::BadBinding { .. }), "{err}");
    }

    #[test]
    fn load_rejects_two_bindings_on_one_input() {
        let err =
            load_edited(|m| m["params"]["strength"] = m["params"]["denoise"].clone()).unwrap_err();
        assert!(matches!(err, CatalogError::BadBinding { .. }), "{err}");
    }

    #[test]
    fn load_rejects_default_out_of_bounds() {
        let err = load_edited(|m| m["params"]["denoise"]["default"] = json!(2.0)).unwrap_err();
        assert!(matches!(err, CatalogError::InvalidParam { .. }), "{err}");
    }

    #[test]
    fn load_rejects_default_of_the_wrong_type() {
        let err = load_edited(|m| m["params"]["denoise"]["default"] = json!("0.5")).unwrap_err();
        assert!(matches!(err, CatalogError::InvalidParam { .. }), "{err}");
    }

    #[test]
    fn load_rejects_min_above_max() {
        let err =
            load_edited(|m| m["params"]["seed"]["min"] = json!(5_000_000_000u64)).unwrap_err();
        assert!(matches!(err, CatalogError::InvalidParam { .. }), "{err}");
    }

    #[test]
    fn load_rejects_missing_bounds() {
        let err = load_edited(|m| {
            m["params"]["megapixels"]
                .as_object_mut()
                .unwrap()
                .remove("max");
        })
        .unwrap_err();
        assert!(matches!(err, CatalogError::InvalidParam { .. }), "{err}");
    }

    #[test]
    fn load_rejects_random_default_on_a_number() {
        let err = load_edited(|m| m["params"]["denoise"]["default"] = json!("random")).unwrap_err();
        assert!(matches!(err, CatalogError::InvalidParam { .. }), "{err}");
    }

    #[test]
    fn load_rejects_a_name_that_is_not_a_slug() {
        let err = load_edited(|m| m["name"] = json!("Restore v2")).unwrap_err();
        assert!(
            matches!(err, CatalogError::InvalidManifestField { .. }),
            "{err}"
        );
    }

    #[test]
    fn load_rejects_duplicate_workflow_names() {
        let err =
            WorkflowCatalog::from_sources(&[(MANIFEST, GRAPH), (MANIFEST, GRAPH)]).unwrap_err();
        assert!(matches!(err, CatalogError::DuplicateName { .. }), "{err}");
    }
}
