"""Drives the ComfyUI emulator with a third-party client, ``comfy-api-simplified`` (PyPI, pinned
in local/python/requirements.txt), through its plain HTTP methods only: its ``*_and_wait``
helpers listen on ComfyUI's websocket, which the emulator does not serve.

Checks: an upload lands under the client's default subfolder; the restore graph, pointed at the
upload, queues and finishes in history; the saved output comes back from ``/view`` as a PNG of
the size ComfyUI's ImageScaleToTotalPixels gives; the queue reads as the client expects
(``get_queue_size_before``); a running prompt is interrupted and a pending one deleted.

Environment: ``COMFYUI_URL`` (the emulator's base URL, no path: the client joins routes with
``urljoin``, which would drop one). Prints a JSON summary on success; a failed check raises.
"""

import json
import os
import pathlib
import tempfile
import time

import requests
from PIL import Image
from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper

DEADLINE_SECS = 60
URL = os.environ["COMFYUI_URL"]
WORKFLOW = pathlib.Path(__file__).resolve().parents[2] / "workflows" / "restore-comfyui.json"


def until(what, probe):
    """Polls ``probe`` until it returns something truthy."""
    deadline = time.monotonic() + DEADLINE_SECS
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def admin(faults):
    """The emulator's own fault switches (not ComfyUI's API)."""
    response = requests.post(f"{URL}/__admin/faults", json=faults, timeout=10)
    response.raise_for_status()


def main():
    api = ComfyApiWrapper(URL)
    summary = {"system": api.get_system_stats()["system"]["comfyui_version"]}
    assert "LoadImage" in api.get_object_info(), "object_info lacks LoadImage"

    with tempfile.TemporaryDirectory() as tmp:
        photo = pathlib.Path(tmp) / "old-photo.png"
        Image.new("RGB", (64, 48), (120, 80, 40)).save(photo)
        uploaded = api.upload_image(photo)
    assert uploaded == {
        "name": "old-photo.png",
        "subfolder": "default_upload_folder",
        "type": "input",
    }, uploaded
    summary["uploaded"] = uploaded

    workflow = ComfyWorkflowWrapper(str(WORKFLOW))
    workflow.set_node_param("Load Image", "image", f"{uploaded['subfolder']}/{uploaded['name']}")
    queued = api.queue_prompt(workflow, client_id="comfy-client-check")
    prompt_id = queued["prompt_id"]
    assert queued["node_errors"] == {}, queued

    entry = until("the prompt's history", lambda: api.get_history(prompt_id).get(prompt_id))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["status"]["completed"] is True
    output_node = workflow.get_node_id("Save Image")
    images = entry["outputs"][output_node]["images"]
    assert len(images) == 1, images
    image = images[0]
    png = api.get_image(image["filename"], image["subfolder"], image["type"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    with tempfile.TemporaryDirectory() as tmp:
        saved = pathlib.Path(tmp) / "out.png"
        saved.write_bytes(png)
        size = Image.open(saved).size
    # One binary megapixel (1024 * 1024) at the upload's 4:3 aspect ratio.
    assert size == (1182, 887), size
    summary["output"] = {"file": image["filename"], "size": list(size)}

    queue = api.get_queue()
    assert queue == {"queue_running": [], "queue_pending": []}, queue

    # Slow runs so that one prompt is seen running while the next waits.
    admin({"slow_run_ms": 600_000})
    try:
        running = api.queue_prompt(workflow)["prompt_id"]
        pending = api.queue_prompt(workflow)["prompt_id"]
        until("the first prompt to run", lambda: api.get_queue_size_before(running) == 0)
        assert api.get_queue_size_before(pending) == 1
        # The client has no delete method: ComfyUI's own POST /queue.
        deleted = requests.post(f"{URL}/queue", json={"delete": [pending]}, timeout=10)
        assert deleted.status_code == 200, deleted.status_code
        try:
            api.get_queue_size_before(pending)
            raise AssertionError("the deleted prompt is still queued")
        except ValueError:
            pass
        api.interrupt()
        interrupted = until(
            "the interrupted prompt's history", lambda: api.get_history(running).get(running)
        )
    finally:
        admin({"slow_run_ms": 0})
    assert interrupted["status"]["status_str"] == "error", interrupted["status"]
    assert interrupted["status"]["messages"][-1][0] == "execution_interrupted"
    assert api.get_history(pending) == {}
    assert api.get_queue() == {"queue_running": [], "queue_pending": []}
    summary["interrupted"] = running
    summary["deleted"] = pending
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
