"""A handler with worker-comfyui's contracts (runpod-workers/worker-comfyui 5.x), run by the real
``runpod`` SDK worker in the tests: the gateway's ``worker_comfyui`` output contract.

- input ``{"workflow": {<ComfyUI API-format graph>}}`` (worker-comfyui's key). No ``images``
  array: the gateway keeps base64 out of RunPod inputs, so LoadImage names a file on the network
  volume, which this deployment uses as ComfyUI's input directory (``RUNPOD_VOLUME_DIR``).
- outputs land in ComfyUI's own output directory (``COMFY_OUTPUT_DIR``, a temporary directory by
  default), not on the volume, and come back in the job output:
  ``{"images": [{"filename", "type": "base64", "data"}]}``; or, when ``BUCKET_ENDPOINT_URL`` is
  set, uploaded with the SDK's ``rp_upload.upload_image(job_id, path)`` (a presigned URL, bucket
  ``%m-%y``) as ``{"filename", "type": "s3_url", "data": <url>}``, exactly as worker-comfyui does.
- failures come back as ``{"error": "..."}`` (the SDK then reports the job FAILED).

``HANDLER_DELAY_SECS`` and ``HANDLER_RAISE`` work as in seed_handler.py.
"""

import asyncio
import base64
import os
import tempfile
import time

import comfy_lite

comfy_lite.die_with_parent()

import runpod  # noqa: E402
from runpod.serverless.utils import rp_upload  # noqa: E402

OUTPUT_DIR = os.environ.get("COMFY_OUTPUT_DIR") or tempfile.mkdtemp(prefix="comfyui-output-")


def ensure_upload_bucket():
    """Test setup only: worker-comfyui uploads into the bucket named after the month
    (``%m-%y``), which must exist on the test's S3 server."""
    if not os.environ.get("BUCKET_ENDPOINT_URL"):
        return
    client, _ = rp_upload.get_boto_client()
    bucket = time.strftime("%m-%y")
    try:
        client.head_bucket(Bucket=bucket)
    except Exception:  # noqa: BLE001  (absent: create it)
        client.create_bucket(Bucket=bucket)


def work(job):
    workflow = job["input"].get("workflow")
    if not isinstance(workflow, dict):
        return {"error": "Missing 'workflow' parameter"}
    written = comfy_lite.run_restore(workflow, OUTPUT_DIR)
    images = []
    for path in written:
        name = os.path.basename(path)
        if os.environ.get("BUCKET_ENDPOINT_URL"):
            images.append(
                {"filename": name, "type": "s3_url", "data": rp_upload.upload_image(job["id"], path)}
            )
        else:
            with open(path, "rb") as file:
                data = base64.b64encode(file.read()).decode("ascii")
            images.append({"filename": name, "type": "base64", "data": data})
        os.remove(path)
    return {"images": images}


async def handler(job):
    delay = float(os.environ.get("HANDLER_DELAY_SECS", "0") or 0)
    if delay > 0:
        await asyncio.sleep(delay)
    message = os.environ.get("HANDLER_RAISE")
    if message:
        raise RuntimeError(message)
    return await asyncio.to_thread(work, job)


if __name__ == "__main__":
    ensure_upload_bucket()
    runpod.serverless.start({"handler": handler})
