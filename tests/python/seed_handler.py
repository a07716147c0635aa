"""The seed's RunPod serverless handler, run by the real ``runpod`` SDK worker in the tests.

Contract (the gateway's ``volume_files`` output contract):
- input ``{"workflow_api": {<ComfyUI API-format graph>}}``; the LoadImage node names the input
  image as a path relative to the network volume (``inputs/<job>/input.jpg``);
- the image work is done for real (Pillow: resize to the requested megapixels) and the result is
  written on the volume under ``outputs/`` with ComfyUI's SaveImage naming;
- the return value is ``{"prompt_id", "files": [absolute paths under /runpod-volume], "file_count"}``.

Environment:
- ``RUNPOD_VOLUME_DIR``: the real directory that plays ``/runpod-volume`` (required);
- ``RUNPOD_VOLUME_MOUNT``: the mount path reported in ``files`` (default ``/runpod-volume``);
- ``HANDLER_DELAY_SECS``: GPU time to pretend, awaited so that a stop from ``job-stop`` lands;
- ``HANDLER_GATE``: a file path; the handler reports its progress as an object instead of a
  string, then waits until the file exists
  (a test opens the gate once it has seen the progress, whatever the machine's speed);
- ``HANDLER_RAISE``: raise ``RuntimeError`` with this message instead of working.

Plus the SDK's own variables (``RUNPOD_WEBHOOK_GET_JOB`` …), set by the test harness.
"""

import asyncio
import os
import uuid

import comfy_lite

comfy_lite.die_with_parent()

import runpod  # noqa: E402  (after the fork hook, so the SDK's ping process inherits it)


async def handler(job):
    workflow = job["input"].get("workflow_api")
    if not isinstance(workflow, dict):
        raise ValueError("Missing 'workflow_api' parameter")
    gate = os.environ.get("HANDLER_GATE")
    # Each progress_update is sent from a thread of its own, so two in a row may land in either
    # order: a gated run sends its one update only.
    if gate:
        runpod.serverless.progress_update(job, {"percent": 40, "message": "restoring"})
    else:
        runpod.serverless.progress_update(job, "loading workflow")
    delay = float(os.environ.get("HANDLER_DELAY_SECS", "0") or 0)
    if delay > 0:
        await asyncio.sleep(delay)
    if gate:
        while not os.path.exists(gate):
            await asyncio.sleep(0.05)
    message = os.environ.get("HANDLER_RAISE")
    if message:
        raise RuntimeError(message)
    written = await asyncio.to_thread(comfy_lite.run_restore, workflow, comfy_lite.volume_dir())
    files = [comfy_lite.mount_path(path) for path in written]
    return {"prompt_id": str(uuid.uuid4()), "files": files, "file_count": len(files)}


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
