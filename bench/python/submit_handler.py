"""The cold-start baseline in Python: the submit path with boto3, as a Lambda handler under the
official runtime interface client (`python -m awslambdaric submit_handler.handler`).

Init (module import) builds the three clients, as a Python Lambda would; the handler stores the
inline image in the uploads bucket, writes the job item to DynamoDB (conditional put, the same
attributes as the Rust store) and sends the job id to SQS. It validates less than the Rust
submit (no image decoding, no workflow catalog), so it is, if anything, a generous baseline.
Configuration comes from the same environment variables as the Rust functions.
"""
import base64
import json
import os
import time
import uuid

import boto3
from botocore.config import Config

_TABLE = os.environ["JOBS_TABLE"]
_QUEUE_URL = os.environ["JOBS_QUEUE_URL"]
_UPLOADS = os.environ["UPLOADS_BUCKET"]
_PATH_STYLE = os.environ.get("S3_FORCE_PATH_STYLE", "false").lower() in ("1", "true", "yes")

_dynamodb = boto3.client("dynamodb")
_sqs = boto3.client("sqs")
_s3 = boto3.client(
    "s3", config=Config(s3={"addressing_style": "path" if _PATH_STYLE else "auto"})
)


def _response(status, body):
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json"},
        "body": json.dumps(body),
    }


def handler(event, context):
    claims = event["requestContext"]["authorizer"]["jwt"]["claims"]
    owner = claims["sub"]
    try:
        request = json.loads(event.get("body") or "")
        image = base64.b64decode(request["input"]["image_base64"], validate=True)
    except (ValueError, KeyError, TypeError):
        return _response(400, {"error": {"code": "invalid_json", "message": "bad request"}})
    now = int(time.time() * 1000)
    job_id = str(uuid.uuid4())
    key = f"inputs/{owner}/{job_id}/input.jpg"
    _s3.put_object(Bucket=_UPLOADS, Key=key, Body=image, ContentType="image/jpeg")
    job = {
        "id": job_id,
        "owner": owner,
        "workflow": request.get("workflow", "restore"),
        "params": request.get("params") or {},
        "input": {"key": key, "content_type": "image/jpeg", "size": len(image)},
        "state": "queued",
        "version": 1,
        "created_at": now,
        "deadline_at": now + 3_600_000,
        "next_check_at": now + 120_000,
        "expires_at": now // 1000 + 30 * 86_400,
    }
    _dynamodb.put_item(
        TableName=_TABLE,
        Item={
            "pk": {"S": job_id},
            "job_id": {"S": job_id},
            "owner": {"S": owner},
            "state": {"S": "queued"},
            "workflow": {"S": job["workflow"]},
            "created_at": {"N": str(now)},
            "version": {"N": "1"},
            "expires_at": {"N": str(job["expires_at"])},
            "sweep_shard": {"S": "s0"},
            "next_check_at": {"N": str(job["next_check_at"])},
            "doc": {"S": json.dumps(job)},
        },
        ConditionExpression="attribute_not_exists(pk)",
    )
    _sqs.send_message(QueueUrl=_QUEUE_URL, MessageBody=json.dumps({"job_id": job_id}))
    return _response(202, {"job_id": job_id, "status": "queued", "workflow": job["workflow"]})
