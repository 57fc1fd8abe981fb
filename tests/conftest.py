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
