//! A tiny ComfyUI: runs an API-format workflow's image plumbing on real files.
//!
//! Only the nodes that move pixels in the restore workflow do real work (`LoadImage`,
//! `ImageScaleToTotalPixels`, `SaveImage`). Every other node hands through the first image among
//! its linked inputs, which makes the diffusion chain (VAEEncode → KSampler → VAEDecode) an
//! identity, and nodes with no image upstream (checkpoints, prompts) produce nothing.
//! Blocking code: run it on `spawn_blocking`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat, ImageReader};
use serde_json::{json, Map, Value};

type Nodes = Map<String, Value>;

/// A link is `["<node id>", <output index>]`; the id may also appear as a number.
fn as_link(value: &Value) -> Option<String> {
    let items = value.as_array()?;
    if items.len() != 2 || !items[1].is_u64() {
        return None;
    }
    match &items[0] {
        Value::String(id) => Some(id.clone()),
        Value::Number(n) if n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

fn node_inputs(node: &Value) -> Option<&Map<String, Value>> {
    node.get("inputs").and_then(Value::as_object)
}

fn class_type(node: &Value) -> &str {
    node.get("class_type").and_then(Value::as_str).unwrap_or("")
}

/// Runs the workflow of a job and answers in the output contract of the worker image its input
/// is written for, as two different worker images on RunPod would:
///
/// - `{"workflow_api": …}` (the seed's handler): outputs are written on the volume and reported as
///   `{"prompt_id", "files": [absolute paths under mount_prefix], "file_count"}`;
/// - `{"workflow": …}` (runpod-workers/worker-comfyui): outputs stay off the volume (in ComfyUI's
///   own output folder) and come back inline as
///   `{"images": [{"filename", "type": "base64", "data"}]}`.
///
/// Either way the LoadImage input is read from the volume.
pub(crate) fn execute(
    input: &Value,
    volume_dir: &Path,
    mount_prefix: &str,
) -> Result<Value, String> {
    let (workflow, inline) = match (input.get("workflow_api"), input.get("workflow")) {
        (Some(workflow), _) => (workflow, false),
        (None, Some(workflow)) => (workflow, true),
        (None, None) => return Err("Missing 'workflow_api' parameter".to_owned()),
    };
    let (nodes, order) = plan(workflow)?;
    let mut run = Run {
        input_dir: volume_dir,
        output_dir: volume_dir,
        mount_prefix: mount_prefix.trim_end_matches('/'),
        images: HashMap::new(),
        files: Vec::new(),
        saved: Vec::new(),
        inline: inline.then(Vec::new),
    };
    for id in &order {
        let image = run.node(nodes, id)?;
        run.images.insert(id.clone(), image);
    }
    if let Some(saved) = run.inline {
        use base64::Engine as _;
        let images: Vec<Value> = saved
            .into_iter()
            .map(|(filename, png)| {
                json!({
                    "filename": filename,
                    "type": "base64",
                    "data": base64::engine::general_purpose::STANDARD.encode(png),
                })
            })
            .collect();
        return Ok(json!({ "images": images }));
    }
    let files = run.files;
    Ok(json!({
        "prompt_id": uuid::Uuid::new_v4().to_string(),
        "file_count": files.len(),
        "files": files,
    }))
}

/// The nodes of an API-format graph and the order to run them in (outputs = SaveImage nodes).
fn plan(workflow: &Value) -> Result<(&Nodes, Vec<String>), String> {
    let nodes = workflow
        .as_object()
        .ok_or("the workflow must be an object of nodes in ComfyUI API format")?;
    for (id, node) in nodes {
        if node.get("class_type").and_then(Value::as_str).is_none() {
            return Err(format!("node {id}: missing 'class_type'"));
        }
        if node.get("inputs").is_some_and(|i| !i.is_object()) {
            return Err(format!("node {id}: 'inputs' must be an object"));
        }
    }
    let mut outputs: Vec<&String> = nodes
        .iter()
        .filter(|(_, node)| class_type(node) == "SaveImage")
        .map(|(id, _)| id)
        .collect();
    if outputs.is_empty() {
        return Err("Prompt has no outputs (no SaveImage node)".to_owned());
    }
    // Numeric ids in numeric order, like ComfyUI's usual execution of independent outputs.
    outputs.sort_by_key(|id| (id.parse::<u64>().unwrap_or(u64::MAX), (*id).clone()));

    let order = execution_order(nodes, &outputs)?;
    Ok((nodes, order))
}

/// One image a SaveImage node wrote, named as ComfyUI reports it in a history entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedImage {
    pub node_id: String,
    pub filename: String,
    /// Relative to the output directory, `/`-separated; empty for the directory itself.
    pub subfolder: String,
}

/// Why a graph did not run to the end; `node_id` names the failing node, if one did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphError {
    pub node_id: Option<String>,
    pub message: String,
}

/// Runs an API-format graph as ComfyUI would on its own folders: LoadImage reads paths relative
/// to `input_dir`, SaveImage writes `{prefix}_{counter:05}_.png` under `output_dir`.
/// Blocking, like [`execute`].
pub fn run_graph(
    workflow: &Value,
    input_dir: &Path,
    output_dir: &Path,
) -> Result<Vec<SavedImage>, GraphError> {
    let (nodes, order) = plan(workflow).map_err(|message| GraphError {
        node_id: None,
        message,
    })?;
    let mut run = Run {
        input_dir,
        output_dir,
        mount_prefix: "",
        images: HashMap::new(),
        files: Vec::new(),
        saved: Vec::new(),
        inline: None,
    };
    for id in &order {
        let image = run.node(nodes, id).map_err(|message| GraphError {
            node_id: Some(id.clone()),
            message,
        })?;
        run.images.insert(id.clone(), image);
    }
    Ok(run.saved)
}

/// Dependencies-first order of every node reachable from the outputs. Iterative, so a long
/// hostile chain cannot overflow the stack; rejects dangling links and cycles.
fn execution_order(nodes: &Nodes, outputs: &[&String]) -> Result<Vec<String>, String> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Active,
        Done,
    }
    let links_of = |id: &str| -> Result<Vec<String>, String> {
        let mut links = Vec::new();
        if let Some(inputs) = nodes.get(id).and_then(node_inputs) {
            for (name, value) in inputs {
                if let Some(target) = as_link(value) {
                    if !nodes.contains_key(&target) {
                        return Err(format!(
                            "node {id}: input '{name}' links to missing node {target}"
                        ));
                    }
                    links.push(target);
                }
            }
        }
        Ok(links)
    };
    let mut marks: HashMap<String, Mark> = HashMap::new();
    let mut order = Vec::new();
    for &root in outputs {
        if marks.contains_key(root.as_str()) {
            continue;
        }
        marks.insert(root.clone(), Mark::Active);
        let mut stack: Vec<(String, Vec<String>, usize)> = vec![(root.clone(), links_of(root)?, 0)];
        while let Some((id, links, next)) = stack.last_mut() {
            if let Some(target) = links.get(*next).cloned() {
                *next += 1;
                match marks.get(&target) {
                    Some(Mark::Done) => {}
                    Some(Mark::Active) => {
                        return Err(format!("workflow graph has a cycle through node {target}"));
                    }
                    None => {
                        marks.insert(target.clone(), Mark::Active);
                        let target_links = links_of(&target)?;
                        stack.push((target, target_links, 0));
                    }
                }
            } else {
                let id = id.clone();
                stack.pop();
                marks.insert(id.clone(), Mark::Done);
                order.push(id);
            }
        }
    }
    Ok(order)
}

struct Run<'a> {
    input_dir: &'a Path,
    output_dir: &'a Path,
    mount_prefix: &'a str,
    images: HashMap<String, Option<Rc<DynamicImage>>>,
    files: Vec<String>,
    saved: Vec<SavedImage>,
    /// worker-comfyui mode: saved images as (file name, PNG bytes), kept off the volume.
    inline: Option<Vec<(String, Vec<u8>)>>,
}

impl Run<'_> {
    fn node(&mut self, nodes: &Nodes, id: &str) -> Result<Option<Rc<DynamicImage>>, String> {
        let node = &nodes[id];
        let empty = Map::new();
        let inputs = node_inputs(node).unwrap_or(&empty);
        let class = class_type(node);
        match class {
            "LoadImage" => {
                let name = inputs.get("image").and_then(Value::as_str).ok_or_else(|| {
                    format!("node {id} (LoadImage): 'image' must be a path string")
                })?;
                let path = self
                    .input_path(name)
                    .map_err(|e| format!("node {id} (LoadImage): {e}"))?;
                let image = load_image(&path)
                    .map_err(|e| format!("node {id} (LoadImage): cannot load '{name}': {e}"))?;
                Ok(Some(Rc::new(image)))
            }
            "ImageScaleToTotalPixels" => {
                let image = self.linked_image(inputs, "image", id, class)?;
                let megapixels = match inputs.get("megapixels") {
                    None => 1.0,
                    Some(v) => v.as_f64().ok_or_else(|| {
                        format!("node {id} ({class}): 'megapixels' must be a number")
                    })?,
                };
                // ComfyUI's widget bounds; also keeps a hostile value from allocating gigabytes.
                if !(0.01..=16.0).contains(&megapixels) {
                    return Err(format!(
                        "node {id} ({class}): megapixels {megapixels} outside 0.01..16"
                    ));
                }
                let method = inputs
                    .get("upscale_method")
                    .and_then(Value::as_str)
                    .unwrap_or("nearest-exact");
                let filter = filter_for(method).ok_or_else(|| {
                    format!("node {id} ({class}): upscale_method '{method}' not in list")
                })?;
                let steps = inputs
                    .get("resolution_steps")
                    .and_then(Value::as_u64)
                    .unwrap_or(1)
                    .max(1);
                let (width, height) =
                    total_pixels_size(image.width(), image.height(), megapixels, steps);
                Ok(Some(Rc::new(image.resize_exact(width, height, filter))))
            }
            "SaveImage" => {
                let image = self.linked_image(inputs, "images", id, class)?;
                let prefix = inputs
                    .get("filename_prefix")
                    .and_then(Value::as_str)
                    .unwrap_or("ComfyUI");
                let file = self
                    .save(&image, prefix, id)
                    .map_err(|e| format!("node {id} (SaveImage): {e}"))?;
                self.files.push(file);
                Ok(None)
            }
            _ => Ok(inputs
                .values()
                .filter_map(as_link)
                .find_map(|target| self.images.get(&target).cloned().flatten())),
        }
    }

    fn linked_image(
        &self,
        inputs: &Map<String, Value>,
        name: &str,
        id: &str,
        class: &str,
    ) -> Result<Rc<DynamicImage>, String> {
        let target = inputs
            .get(name)
            .and_then(as_link)
            .ok_or_else(|| format!("node {id} ({class}): input '{name}' must be a link"))?;
        self.images.get(&target).cloned().flatten().ok_or_else(|| {
            format!("node {id} ({class}): input '{name}' (node {target}) yields no image")
        })
    }

    /// A path relative to the input root, refusing anything that could leave it.
    fn input_path(&self, relative: &str) -> Result<PathBuf, String> {
        let parts = relative_parts(relative)?;
        let mut path = self.input_dir.to_path_buf();
        path.extend(&parts);
        Ok(path)
    }

    /// ComfyUI's SaveImage naming: `<prefix>_<counter:05>_.png`, the counter one above the
    /// highest already present for that prefix.
    fn save(&mut self, image: &DynamicImage, prefix: &str, id: &str) -> Result<String, String> {
        let mut parts = relative_parts(prefix)?;
        let base = parts.pop().ok_or("empty filename_prefix")?;
        if let Some(saved) = self.inline.as_mut() {
            let file_name = format!("{base}_{:05}_.png", saved.len() + 1);
            let mut png = std::io::Cursor::new(Vec::new());
            DynamicImage::ImageRgb8(image.to_rgb8())
                .write_to(&mut png, ImageFormat::Png)
                .map_err(|e| format!("cannot encode {file_name}: {e}"))?;
            saved.push((file_name.clone(), png.into_inner()));
            return Ok(file_name);
        }
        let mut dir = self.output_dir.to_path_buf();
        dir.extend(&parts);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let counter = next_counter(&dir, &base)?;
        let file_name = format!("{base}_{counter:05}_.png");
        let path = dir.join(&file_name);
        // ComfyUI images are RGB tensors; alpha and 16-bit depth do not survive it either.
        DynamicImage::ImageRgb8(image.to_rgb8())
            .save_with_format(&path, ImageFormat::Png)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        self.saved.push(SavedImage {
            node_id: id.to_owned(),
            filename: file_name.clone(),
            subfolder: parts.join("/"),
        });
        let mut mount_path = self.mount_prefix.to_owned();
        for part in parts.iter().chain(std::iter::once(&file_name)) {
            mount_path.push('/');
            mount_path.push_str(part);
        }
        Ok(mount_path)
    }
}

/// Splits a volume-relative path into components, dropping `.` and empty ones.
fn relative_parts(relative: &str) -> Result<Vec<String>, String> {
    if relative.starts_with('/') || relative.starts_with('\\') || relative.contains('\0') {
        return Err(format!(
            "path '{relative}' must be relative to the volume root"
        ));
    }
    let mut parts = Vec::new();
    for part in relative.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("path '{relative}' must not contain '..'")),
            other => parts.push(other.to_owned()),
        }
    }
    if parts.is_empty() {
        return Err("empty path".to_owned());
    }
    Ok(parts)
}

fn next_counter(dir: &Path, base: &str) -> Result<u32, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut highest = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(base))
            .and_then(|r| r.strip_prefix('_'))
        else {
            continue;
        };
        if let Some(n) = rest.split('_').next().and_then(|d| d.parse::<u32>().ok()) {
            highest = highest.max(n);
        }
    }
    Ok(highest + 1)
}

fn load_image(path: &Path) -> Result<DynamicImage, String> {
    let reader = ImageReader::open(path).map_err(|e| e.to_string())?;
    let reader = reader.with_guessed_format().map_err(|e| e.to_string())?;
    reader.decode().map_err(|e| e.to_string())
}

/// ComfyUI's method names mapped to the closest `image` filter (`area` is a box average; the
/// triangle filter is the nearest equivalent for downscaling).
fn filter_for(method: &str) -> Option<FilterType> {
    Some(match method {
        "nearest-exact" => FilterType::Nearest,
        "bilinear" | "area" => FilterType::Triangle,
        "bicubic" => FilterType::CatmullRom,
        "lanczos" => FilterType::Lanczos3,
        _ => return None,
    })
}

/// ComfyUI (comfy_extras/nodes_post_processing.py) uses binary megapixels:
/// `total = megapixels * 1024 * 1024`, `scale = sqrt(total / (w * h))`, each side
/// `round(side * scale / steps) * steps`.
pub(crate) fn total_pixels_size(
    width: u32,
    height: u32,
    megapixels: f64,
    steps: u64,
) -> (u32, u32) {
    let total = megapixels * 1024.0 * 1024.0;
    let scale = (total / (f64::from(width) * f64::from(height))).sqrt();
    let steps = steps as f64;
    let side = |s: u32| -> u32 {
        let v = (f64::from(s) * scale / steps).round() * steps;
        // Clamped: ComfyUI would fail on a zero side; an emulator should still produce a file.
        v.clamp(1.0, 65_535.0) as u32
    };
    (side(width), side(height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_pixels_follows_comfyui_binary_megapixels() {
        let (w, h) = total_pixels_size(640, 480, 1.0, 1);
        assert_eq!((w, h), (1182, 887));
        let (w, h) = total_pixels_size(4000, 3000, 0.5, 8);
        assert_eq!((w % 8, h % 8), (0, 0));
    }

    #[test]
    fn links_accept_string_and_numeric_ids() {
        assert_eq!(as_link(&json!(["93", 0])), Some("93".to_owned()));
        assert_eq!(as_link(&json!([93, 0])), Some("93".to_owned()));
        assert_eq!(as_link(&json!(["93", "x"])), None);
        assert_eq!(as_link(&json!("93")), None);
    }

    #[test]
    fn cycles_and_dangling_links_are_rejected() {
        let cycle = json!({
            "1": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0]}},
            "2": {"class_type": "KSampler", "inputs": {"latent_image": ["1", 0]}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}
        });
        let err = execute(
            &json!({"workflow_api": cycle}),
            Path::new("/nonexistent"),
            "/v",
        )
        .unwrap_err();
        assert!(err.contains("cycle"), "{err}");
        let dangling = json!({"9": {"class_type": "SaveImage", "inputs": {"images": ["5", 0]}}});
        let err = execute(
            &json!({"workflow_api": dangling}),
            Path::new("/nonexistent"),
            "/v",
        )
        .unwrap_err();
        assert!(err.contains("missing node 5"), "{err}");
    }

    #[test]
    fn relative_paths_cannot_escape() {
        assert!(relative_parts("../etc/passwd").is_err());
        assert!(relative_parts("/etc/passwd").is_err());
        assert!(relative_parts("inputs/../../x").is_err());
        assert_eq!(
            relative_parts("inputs//a/./b.jpg").unwrap(),
            vec!["inputs", "a", "b.jpg"]
        );
    }
}
