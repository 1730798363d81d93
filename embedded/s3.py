"""A local S3-compatible server: moto in server mode, on loopback, and a bucket on it.

moto keeps objects in memory and does not check signatures, which makes it stand in for the
spec's storage front: it accepts a PUT to a renamed key under a presigned URL.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing_extensions import Self

from embedded.process import ManagedProcess, ProcessStartError

BUCKET = "aiu-character"  # the spec's example bucket


class S3StartError(ProcessStartError):
    """The server exited or never answered."""


@dataclass
class MotoS3Server(ManagedProcess):
    """One `moto.server` process; usable as a context manager that waits until it answers."""

    name = "moto server"
    start_error = S3StartError

    host: str = "127.0.0.1"
    port: int = 9000
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    @property
    def ready_url(self) -> str:
        return f"{self.url}/moto-api/"


class LocalS3:
    """One bucket of the local S3, as the tests and the load run use it: presigned PUT URLs for
    the gateway, and the objects read back."""

    def __init__(self, server: MotoS3Server, bucket: str = BUCKET) -> None:
        self.server = server
        self.url = server.url
        self.hostport = f"{server.host}:{server.port}"
        self.bucket = bucket

    def client(self, signature_version: str = "s3v4") -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            # moto accepts any credentials; fixed ones keep this independent of ~/.aws.
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
            config=Config(signature_version=signature_version),
        )

    def create(self) -> Self:
        """Create the bucket (one that exists is kept)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=self.bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return self

    def presign_put(self, key: str, signature_version: str = "s3v4") -> str:
        return self.client(signature_version).generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=3600
        )

    def get(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self) -> list[str]:
        listed = self.client().list_objects_v2(Bucket=self.bucket)
        return [item["Key"] for item in listed.get("Contents", [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    with MotoS3Server(host=args.host, port=args.port) as server:
        print(f"S3 (moto) on {server.url}; Ctrl-C stops it", flush=True)
        try:
            return server.process.wait() if server.process else 1
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
