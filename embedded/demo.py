"""End-to-end demo against a running `make serve`: presign, generate, download, verify; then the
same through a job.

Creates the bucket, presigns a PUT URL for `.../1.png` with boto3, calls POST /generate with
it, downloads the object from the returned `s3_url`, checks that its MD5 is `image_hash` and
that it is a JPEG of the expected size, and prints the response. Then submits the same request
as a job (POST /jobs with `Prefer: wait`), follows it with GET /jobs/{id} until it ends, and
checks its object the same way. Exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def _presign(s3_url: str, bucket: str, key: str, signature_version: str) -> str:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=s3_url,
        # moto accepts any credentials; fixed ones keep the demo independent of ~/.aws.
        aws_access_key_id="demo",
        aws_secret_access_key="demo",
        region_name="us-east-1",
        config=Config(signature_version=signature_version),
    )
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return client.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600
    )


def _post_json(
    url: str,
    body: dict[str, Any] | None,
    timeout: float,
    api_key: str | None = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", **(headers or {})}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers=headers,
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="http://127.0.0.1:8080")
    parser.add_argument("--s3", default="http://127.0.0.1:9000")
    parser.add_argument("--bucket", default="aiu-character")
    parser.add_argument("--key", default="000/1.png", help="placeholder key; must end in a file name")
    parser.add_argument("--prompt", default="a lighthouse on a cliff at dawn")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-upscale", dest="upscale", action="store_false")
    parser.add_argument("--no-nsfw", dest="nsfw", action="store_false")
    parser.add_argument(
        "--sigv2", action="store_true", help="SigV2 query auth, the spec's URL form (default SigV4)"
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--no-job", dest="job", action="store_false", help="skip the job")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("IMAGEGEN_API_KEY"),
        help="when the gateway has GATEWAY_API_KEYS (default: $IMAGEGEN_API_KEY)",
    )
    args = parser.parse_args(argv)

    s3_prefix = _presign(args.s3, args.bucket, args.key, "s3" if args.sigv2 else "s3v4")
    body = {
        "prompt": args.prompt,
        "width": args.width,
        "height": args.height,
        "num_inference_steps": args.steps,
        "response_format": "s3",
        # Strings, as in the spec's example.
        "upscale": "true" if args.upscale else "false",
        "s3_prefix": s3_prefix,
        "enable_nsfw_check": "true" if args.nsfw else "false",
    }
    print(
        f"POST {args.gateway}/generate  ({args.width}x{args.height}, {args.steps} steps; "
        "with the demo models on 2 cores this takes a few seconds)"
    )
    try:
        status, response = _post_json(f"{args.gateway}/generate", body, args.timeout, args.api_key)
    except (urllib.error.URLError, OSError) as exc:
        print(f"cannot reach the gateway at {args.gateway} ({exc}); is `make serve` running?")
        return 1
    print(json.dumps(response, indent=2))
    if status != 200:
        print(f"FAIL: HTTP {status}")
        return 1

    problems = _check(response["data"], args)
    if problems or not args.job:
        return 1 if problems else 0

    body["s3_prefix"] = _presign(
        args.s3, args.bucket, args.key.rsplit("/", 1)[0] + "/job.png", "s3" if args.sigv2 else "s3v4"
    )
    print(f"\nPOST {args.gateway}/jobs  (the same request as a job; Prefer: wait=30)")
    status, job = _post_json(
        f"{args.gateway}/jobs", body, args.timeout, args.api_key, headers={"Prefer": "wait=30"}
    )
    deadline = time.monotonic() + args.timeout
    while status in (200, 202) and job.get("status") not in FINAL and time.monotonic() < deadline:
        time.sleep(1)
        status, job = _post_json(
            f"{args.gateway}{job['urls']['get']}", None, 30, args.api_key, method="GET"
        )
    print(json.dumps(job, indent=2))
    if job.get("status") != "succeeded":
        print(f"FAIL: HTTP {status}, job {job.get('status')}")
        return 1
    return 1 if _check(job["data"], args) else 0


FINAL = ("succeeded", "failed", "canceled")


def _check(data: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Download the object, check its name, MD5, format and size; print the verdict."""
    with urllib.request.urlopen(data["s3_url"], timeout=60) as resp:
        stored = resp.read()
    digest = hashlib.md5(stored).hexdigest()
    problems = []
    if digest != data["image_hash"]:
        problems.append(f"MD5 of the stored object is {digest}, image_hash is {data['image_hash']}")
    if not data["s3_url"].split("?", 1)[0].endswith(f"/{data['image_hash']}.jpg"):
        problems.append("s3_url does not end in {image_hash}.jpg")
    from PIL import Image

    scale = 2 if args.upscale else 1
    expected = (args.width * scale, args.height * scale)
    with Image.open(io.BytesIO(stored)) as image:
        if image.format != "JPEG" or image.size != expected:
            problems.append(f"stored object is {image.format} {image.size}, expected JPEG {expected}")
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print(
            f"OK: downloaded {len(stored)} bytes from s3_url, named {{image_hash}}.jpg; their MD5 "
            f"{digest} is image_hash; a {expected[0]}x{expected[1]} JPEG as asked "
            f"({args.width}x{args.height}{', upscaled 2x' if args.upscale else ''})"
        )
    return problems


if __name__ == "__main__":
    sys.exit(main())
