"""Drives the RunPod emulator's endpoint API with the official ``runpod`` SDK client
(``runpod.Endpoint``), pointed at it through ``RUNPOD_ENDPOINT_BASE_URL``, and checks that
``run``, ``status``, ``output``, ``run_sync``, ``cancel`` and ``health`` behave as the SDK
expects. An SDK worker running seed_handler.py (with a short ``HANDLER_DELAY_SECS``, concurrency
1) serves the endpoint meanwhile.

Environment: ``RUNPOD_ENDPOINT_BASE_URL`` (``http://127.0.0.1:PORT/v2``), ``RUNPOD_API_KEY``,
``ENDPOINT_ID``, ``IMAGE_KEY`` (an image on the volume), ``MOUNT`` (the worker's mount path).
Prints a JSON summary on success; any failed check raises (non-zero exit).
"""

import json
import os
import time

import runpod  # reads RUNPOD_ENDPOINT_BASE_URL at import
from runpod.endpoint.runner import Job, RunPodClient

DEADLINE_SECS = 60


def workflow(prefix, megapixels=0.05):
    return {
        "78": {"class_type": "LoadImage", "inputs": {"image": os.environ["IMAGE_KEY"]}},
        "93": {
            "class_type": "ImageScaleToTotalPixels",
            "inputs": {"image": ["78", 0], "megapixels": megapixels, "upscale_method": "lanczos"},
        },
        "60": {"class_type": "SaveImage", "inputs": {"images": ["93", 0], "filename_prefix": prefix}},
    }


def wait_status(job, wanted):
    deadline = time.monotonic() + DEADLINE_SECS
    while True:
        status = Job(job.endpoint_id, job.job_id, job.rp_client).status()
        if status in wanted:
            return status
        assert time.monotonic() < deadline, f"job {job.job_id} stuck in {status}, wanted {wanted}"
        time.sleep(0.1)


def main():
    assert runpod.endpoint_url_base == os.environ["RUNPOD_ENDPOINT_BASE_URL"], runpod.endpoint_url_base
    runpod.api_key = os.environ["RUNPOD_API_KEY"]
    endpoint = runpod.Endpoint(os.environ["ENDPOINT_ID"])
    mount = os.environ.get("MOUNT", "/runpod-volume")
    summary = {}

    health = endpoint.health()
    assert set(health) == {"jobs", "workers"}, health
    assert set(health["jobs"]) == {"completed", "failed", "inProgress", "inQueue", "retried"}, health
    assert set(health["workers"]) == {"idle", "running"}, health

    # run → status → output: the SDK wraps the dict in {"input": …} itself.
    job = endpoint.run({"workflow_api": workflow("outputs/sdk-client/run")})
    first = job.status()
    assert first in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED"), first
    output = job.output(timeout=DEADLINE_SECS)
    assert output["file_count"] == 1, output
    assert output["files"] == [f"{mount}/outputs/sdk-client/run_00001_.png"], output
    assert job.status() == "COMPLETED"
    summary["run"] = {"first_status": first, "files": output["files"]}

    # run_sync: waits at the endpoint (the SDK polls /status if the wait runs out).
    sync_output = endpoint.run_sync({"input": {"workflow_api": workflow("outputs/sdk-client/sync")}}, timeout=DEADLINE_SECS)
    assert sync_output["files"] == [f"{mount}/outputs/sdk-client/sync_00001_.png"], sync_output
    summary["run_sync"] = sync_output["files"]

    # cancel: one job running on the (single-slot) worker, one still queued behind it.
    running = endpoint.run({"workflow_api": workflow("outputs/sdk-client/running")})
    wait_status(running, ("IN_PROGRESS",))
    # Let the handler start: a stop that lands between job-take and the SDK creating the
    # handler's task is dropped by the SDK (and the job would simply run to its end).
    time.sleep(0.5)
    queued = endpoint.run({"workflow_api": workflow("outputs/sdk-client/queued")})
    assert queued.status() == "IN_QUEUE"
    answer = queued.cancel()
    assert answer == {"id": queued.job_id, "status": "CANCELLED"}, answer
    assert queued.status() == "CANCELLED"
    answer = running.cancel()
    assert answer == {"id": running.job_id, "status": "CANCELLED"}, answer
    assert running.status() == "CANCELLED"
    summary["cancelled"] = [running.job_id, queued.job_id]

    health = endpoint.health()
    assert health["jobs"]["completed"] >= 2, health
    assert health["jobs"]["inQueue"] == 0, health
    assert health["workers"]["idle"] + health["workers"]["running"] >= 1, health
    summary["health"] = health

    # A wrong key: the SDK's own 401 message.
    try:
        runpod.Endpoint(os.environ["ENDPOINT_ID"], api_key="not-the-key").health()
        raise AssertionError("a wrong API key was accepted")
    except RuntimeError as error:
        assert "401 Unauthorized" in str(error), error
    summary["unauthorized"] = True

    # An unknown job: /status answers 404, which the SDK raises as an HTTP error.
    try:
        Job(os.environ["ENDPOINT_ID"], "no-such-job", RunPodClient()).status()
        raise AssertionError("an unknown job had a status")
    except Exception as error:  # requests.HTTPError
        assert "404" in str(error), error
    summary["unknown_job_404"] = True

    print(json.dumps(summary))


if __name__ == "__main__":
    main()
