"""What the Python test handlers share: the worker process's hygiene, the network-volume mount,
and the few ComfyUI nodes of the restore workflow done for real with Pillow.

A real serverless worker sees the network volume at ``/runpod-volume``. In the tests the RunPod
emulator's volume directory plays that mount: ``RUNPOD_VOLUME_DIR`` names the real directory and
``RUNPOD_VOLUME_MOUNT`` (default ``/runpod-volume``) the path the handler reports. Files are read
and written in the real directory; every path handed back starts with the mount, exactly as on
RunPod.
"""

import ctypes
import math
import os
import signal

from PIL import Image

PR_SET_PDEATHSIG = 1

MOUNT = os.environ.get("RUNPOD_VOLUME_MOUNT", "/runpod-volume").rstrip("/") or "/runpod-volume"

# ComfyUI's upscale_method names mapped to Pillow's filters.
FILTERS = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def die_with_parent():
    """Make this process, and every process it forks (the SDK's heartbeat process), die when
    its parent dies, so a killed test never leaves a worker behind."""

    def arm():
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass

    arm()
    os.register_at_fork(after_in_child=arm)


def volume_dir():
    path = os.environ.get("RUNPOD_VOLUME_DIR")
    if not path:
        raise RuntimeError("RUNPOD_VOLUME_DIR is not set: it must name the volume's real directory")
    return os.path.realpath(path)


def relative_parts(relative):
    """A volume-relative path split into parts; anything that could leave the volume is refused."""
    if not isinstance(relative, str) or not relative:
        raise ValueError("a volume path must be a non-empty string")
    if relative.startswith("/") or "\\" in relative or "\0" in relative:
        raise ValueError(f"path {relative!r} must be relative to the volume root")
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"path {relative!r} must stay inside the volume")
    return parts


def on_volume(relative):
    """The real file behind a volume-relative path."""
    return os.path.join(volume_dir(), *relative_parts(relative))


def mount_path(real_path):
    """The absolute path a worker reports for a file in the volume: /runpod-volume/…"""
    rel = os.path.relpath(os.path.realpath(real_path), volume_dir())
    if rel.startswith(".."):
        raise ValueError(f"{real_path} is not on the volume")
    return MOUNT + "/" + rel.replace(os.sep, "/")


def nodes_of(workflow, class_type):
    return [
        (node_id, node)
        for node_id, node in sorted(workflow.items(), key=lambda kv: str(kv[0]))
        if isinstance(node, dict) and node.get("class_type") == class_type
    ]


def one_node(workflow, class_type):
    found = nodes_of(workflow, class_type)
    if len(found) != 1:
        raise ValueError(f"the workflow needs exactly one {class_type} node, found {len(found)}")
    node_id, node = found[0]
    inputs = node.get("inputs")
    if not isinstance(inputs, dict):
        raise ValueError(f"node {node_id} ({class_type}) has no inputs")
    return node_id, inputs


def total_pixels_size(width, height, megapixels):
    """ComfyUI's ImageScaleToTotalPixels: binary megapixels, aspect ratio kept."""
    scale = math.sqrt(megapixels * 1024 * 1024 / (width * height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def next_counter(directory, base):
    highest = 0
    for name in os.listdir(directory):
        if name.startswith(base + "_"):
            head = name[len(base) + 1 :].split("_", 1)[0]
            if head.isdigit():
                highest = max(highest, int(head))
    return highest + 1


def run_restore(workflow, output_root):
    """Runs the restore graph's image nodes: LoadImage (from the volume) →
    ImageScaleToTotalPixels → SaveImage. The diffusion nodes between them pass the image
    through, as they would at denoise 0. Saves under ``output_root`` with ComfyUI's naming
    (``<filename_prefix>_00001_.png``) and returns the real paths written."""
    if not isinstance(workflow, dict) or not workflow:
        raise ValueError("the workflow must be a non-empty object of nodes (ComfyUI API format)")
    _, load = one_node(workflow, "LoadImage")
    _, scale = one_node(workflow, "ImageScaleToTotalPixels")
    _, save = one_node(workflow, "SaveImage")

    source = on_volume(load.get("image"))
    megapixels = scale.get("megapixels", 1.0)
    if isinstance(megapixels, bool) or not isinstance(megapixels, (int, float)):
        raise ValueError("megapixels must be a number")
    if not 0.01 <= megapixels <= 16:
        raise ValueError(f"megapixels {megapixels} outside 0.01..16")
    method = scale.get("upscale_method", "nearest-exact")
    if method not in FILTERS:
        raise ValueError(f"upscale_method {method!r} not in list")

    with Image.open(source) as image:
        image = image.convert("RGB")
        size = total_pixels_size(image.width, image.height, float(megapixels))
        result = image.resize(size, FILTERS[method])

    *folders, base = relative_parts(save.get("filename_prefix", "ComfyUI"))
    directory = os.path.join(output_root, *folders)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{base}_{next_counter(directory, base):05}_.png")
    result.save(path, format="PNG")
    return [path]
