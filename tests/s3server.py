"""Real object-storage servers for tests and benchmarks, each in its own process, on 127.0.0.1 only: moto's S3
server mode, and a Google Cloud Storage emulator.

The clients under test (s3fs and gcsfs inside dinofeat, boto3 here to make buckets) reach them through their
standard environment variables (AWS_*, STORAGE_EMULATOR_HOST), exactly as they would reach S3 or GCS, so nothing
in dinofeat knows it is a test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any, Self


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _ServerProcess:
    """A server in its own process on 127.0.0.1: `with Server() as srv:` starts it (a fresh port each try),
    `srv.env` are the variables a client needs. Raises RuntimeError (with the server's output) if it does not come
    up in `timeout` seconds."""

    name = "server"

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        # servers log every request: to a file, never to a pipe nobody reads (a full pipe blocks the server)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server; closed in __exit__)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready_url(self) -> str:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for _ in range(3):  # the port picked may be taken by someone else before the server binds it
            self.port = _free_port()
            self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT)
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"{self.name} did not start on 127.0.0.1: {self._output()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.ready_url(), timeout=1):
                    return True
            except OSError:
                time.sleep(0.1)  # polling for readiness, not waiting for a result
        return False

    def _output(self) -> str:
        try:
            self.log.seek(0)
            return self.log.read().decode(errors="replace")[-2000:]
        except (OSError, ValueError):
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log.close()


class S3Server(_ServerProcess):
    """moto's S3 server mode; `s3.bucket(name)` makes a bucket."""

    name = "moto S3 server"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "dinofeat-test",
            "AWS_SECRET_ACCESS_KEY": "dinofeat-test-secret",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def ready_url(self) -> str:
        return f"{self.endpoint}/moto-api/"

    def client(self) -> Any:
        import boto3

        e = self.env
        return boto3.client(
            "s3",
            endpoint_url=e["AWS_ENDPOINT_URL"],
            aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"],
            region_name=e["AWS_REGION"],
        )

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


# GCS's documented upload precondition (`ifGenerationMatch`: 412 unless the object is at that generation, 0 = absent),
# which gcp-storage-emulator ignores: added to its upload handler. The emulator serves one request at a time, so the
# check and the write are one step, as they are on GCS. It proves what dinofeat sends and how it takes a 412, not
# that GCS itself honours the precondition (its documentation says it does).
_PRECONDITIONS = """
from http import HTTPStatus
import gcp_storage_emulator.handlers.objects as objects
from gcp_storage_emulator.exceptions import NotFound
_insert = objects.insert
def insert(request, response, storage, *args, **kwargs):
    want = request.query.get("ifGenerationMatch")
    if want:
        name = request.query["name"][0] if "name" in request.query else request.data["meta"].get("name")
        try:
            have = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
        except NotFound:
            have = "0"
        if have != want[0]:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "conditionNotMet"}})
            return None
    return _insert(request, response, storage, *args, **kwargs)
objects.insert = insert
"""


class GCSServer(_ServerProcess):
    """gcp-storage-emulator (a Google Cloud Storage JSON API server, in memory), reached by gcsfs through
    STORAGE_EMULATOR_HOST as it would reach GCS. It ignores generation preconditions; `preconditions=True` adds
    the upload precondition dinofeat's conditional writes use (see _PRECONDITIONS)."""

    name = "GCS emulator"

    def __init__(
        self, buckets: tuple[str, ...] = ("dinofeat-test",), timeout: float = 30.0, preconditions: bool = False
    ) -> None:
        super().__init__(timeout)
        self.buckets = buckets
        self.preconditions = preconditions

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def command(self) -> list[str]:
        code = "import sys; from gcp_storage_emulator.__main__ import main; sys.exit(main(sys.argv[1:]))"
        if self.preconditions:
            code = _PRECONDITIONS + code
        args = ["start", "-H", "127.0.0.1", "--port", str(self.port), "--in-memory", "-q"]
        return [sys.executable, "-c", code, *args, "--default-bucket", self.buckets[0]]

    def ready_url(self) -> str:
        return f"{self.endpoint}/storage/v1/b/{self.buckets[0]}"


def serve(server: _ServerProcess) -> Iterator[Any]:
    """A module fixture's body: start `server` (or skip the module, naming why), point the clients at it through
    the environment, and stop it and restore the environment afterwards."""
    import pytest

    try:
        server.__enter__()
    except (RuntimeError, OSError) as e:  # pragma: no cover - only where the server cannot run
        pytest.skip(f"the {server.name} could not start on 127.0.0.1: {e}")
    old = apply_env(server.env)
    try:
        yield server
    finally:
        restore_env(old)
        server.__exit__()


def apply_env(env: dict[str, str]) -> dict[str, str | None]:
    """Set `env` in os.environ; returns what to restore."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def restore_env(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
