"""Full-cycle drills: launch, bootstrap, generation, report and shutdown on this machine.

A moto server on 127.0.0.1 stands in for the AWS account, and a scratch directory run
through ``env -i`` stands in for the instance. The launch notebook starts a worker in
moto; the drill then reads that worker's UserData back from moto and executes it as
cloud-init would: as root, with no ``HOME`` and cloud-init's minimal ``PATH``, and with
the credentials in the environment as an instance role would provide them. Every
difference from a real instance is a documented bootstrap setting passed through the
launch notebook's ``bootstrap_options``: a ``file://`` repository, the tiny model, a
local uv cache, marker files in place of the hard cap and the shutdown, and endpoints
on 127.0.0.1 for S3 and the instance metadata service.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import nbformat
import pandas as pd
import papermill
import pytest
import soundfile
from loopback import LoopbackServer, QuietHandler

from mgutil.config import PROJECT_ROOT

SONGS = {"drill-short": 3.0, "drill-medium": 4.0, "drill-long": 35.0}
JOBS = "".join(
    f"drill song {name} with soft synths ; {seconds:g} ; {name}\n"
    for name, seconds in SONGS.items()
)
PREFIX = "drill"
WORKER_TAG = "musicgen-drill-worker"
# cloud-init runs user scripts with systemd's default PATH and no HOME.
CLOUD_INIT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHARTS = ["cost_per_song", "generation_time", "cumulative_cost", "spot_price"]
# Seconds the bootstrap may take: uv sync from the local cache, papermill, three songs.
BOOTSTRAP_TIMEOUT_S = 900


class MetadataHandler(QuietHandler):
    """IMDSv2 on 127.0.0.1 with the facts of the instance that moto started."""

    facts: dict[str, str] = {}
    token = "drill-token"

    def do_PUT(self):  # noqa: N802 (http.server's naming)
        if self.path == "/latest/api/token":
            self._reply(200, self.token)
        else:
            self._reply(404, "")

    def do_GET(self):  # noqa: N802
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            self._reply(401, "")
        elif self.path in self.facts:
            self._reply(200, self.facts[self.path])
        else:
            self._reply(404, "")


@pytest.fixture
def metadata_server():
    handler = type("Handler", (MetadataHandler,), {"facts": {}})
    with LoopbackServer(handler) as server:
        yield server.endpoint, handler.facts


def _uv_binary() -> str:
    """Return the real uv executable; `uv run` exports its own path as UV."""
    candidate = os.environ.get("UV") or shutil.which("uv")
    if not candidate:
        pytest.fail("uv not found: run the tests with `uv run pytest`")
    resolved = Path(candidate).resolve()
    with open(resolved, "rb") as handle:
        if handle.read(4) != b"\x7fELF":
            pytest.fail(f"{resolved} is a wrapper script, not uv itself: run `uv run pytest`")
    return str(resolved)


def _uv_cache_dir(uv: str) -> str:
    done = subprocess.run([uv, "cache", "dir"], capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def account(aws, monkeypatch, tmp_path):
    """A healthy emulated account and a bare repository of this project at HEAD."""
    region = "us-east-1"
    s3 = boto3.client("s3", region_name=region)
    bucket = "musicgen-drill-bucket"
    s3.create_bucket(Bucket=bucket)
    s3.put_public_access_block(
        Bucket=bucket,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )

    iam = boto3.client("iam", region_name=region)
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "ec2.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ],
    }
    iam.create_role(RoleName="musicgen-drill-role", AssumeRolePolicyDocument=json.dumps(trust))
    iam.create_instance_profile(InstanceProfileName="musicgen-drill-profile")
    iam.add_role_to_instance_profile(
        InstanceProfileName="musicgen-drill-profile", RoleName="musicgen-drill-role"
    )

    ec2 = boto3.client("ec2", region_name=region)
    images = ec2.describe_images(
        Filters=[{"Name": "architecture", "Values": ["x86_64"]}], Owners=["amazon"]
    )["Images"]
    ami_id = sorted(image["ImageId"] for image in images)[0]

    bare = tmp_path / "musicgen-batch.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(PROJECT_ROOT), str(bare)], check=True)
    head = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(JOBS, encoding="utf-8")

    for name, value in {
        "AMI_ID": ami_id,
        "INSTANCE_PROFILE": "musicgen-drill-profile",
        "WORKER_TAG": WORKER_TAG,
        "REPO_URL": f"file://{bare}",
        "REPO_COMMIT": head,
        "MAX_SPOT_PRICE_USD": "0.40",
    }.items():
        monkeypatch.setenv(name, value)
    return {
        "s3": s3,
        "ec2": ec2,
        "bucket": bucket,
        "output_uri": f"s3://{bucket}/{PREFIX}",
        "prompts": prompts,
        "head": head,
    }


def _bootstrap_options(instance_root: Path, endpoint: str, metadata_endpoint: str) -> dict:
    """Bootstrap settings that make the scratch directory stand in for the instance."""
    uv = _uv_binary()
    markers = instance_root / "markers"
    return {
        "work_dir": str(instance_root / "opt" / "musicgen"),
        "home_dir": str(instance_root / "root"),
        "log_file": str(instance_root / "var" / "log" / "musicgen-bootstrap.log"),
        "hard_cap_command": f"mkdir -p {markers} && echo armed >{markers}/hard-cap",
        "shutdown_command": f"mkdir -p {markers} && echo shutdown >{markers}/shutdown",
        "uv_install_command": f'install -D -m 0755 {uv} "$HOME/.local/bin/uv"',
        "extra_env": {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": metadata_endpoint,
            "HF_HUB_OFFLINE": "1",
            "UV_CACHE_DIR": _uv_cache_dir(uv),
            "UV_OFFLINE": "1",
            # The interpreter the test environment was synced with, so the lock resolves
            # to the wheels already in the cache.
            "UV_PYTHON": str(Path(sys.executable).resolve()),
        },
    }


def _run_launch_notebook(tmp_path: Path, name: str, **parameters):
    output = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(
        str(PROJECT_ROOT / "notebooks" / "02_launch.ipynb"),
        str(output),
        parameters={
            "wait_timeout_s": 30.0,
            "poll_interval_s": 0.5,
            "artifacts_dir": str(tmp_path / "launch"),
            **parameters,
        },
        kernel_name="python3",
        progress_bar=False,
    )
    return nbformat.read(str(output), as_version=4)


def _tagged_instances(ec2, states=("pending", "running", "stopping", "stopped")) -> list[dict]:
    reservations = ec2.describe_instances(
        Filters=[
            {"Name": "tag:Name", "Values": [WORKER_TAG]},
            {"Name": "instance-state-name", "Values": list(states)},
        ]
    )["Reservations"]
    return [instance for reservation in reservations for instance in reservation["Instances"]]


def _launch_and_read_user_data(account, tmp_path, options, model_id) -> tuple[dict, str]:
    _run_launch_notebook(
        tmp_path,
        "launch",
        confirm=True,
        prompts_path=str(account["prompts"]),
        output_uri=account["output_uri"],
        model_id=model_id,
        max_runtime_minutes=30,
        bootstrap_options=options,
    )
    (instance,) = _tagged_instances(account["ec2"])
    attribute = account["ec2"].describe_instance_attribute(
        InstanceId=instance["InstanceId"], Attribute="userData"
    )
    script = base64.b64decode(attribute["UserData"]["Value"]).decode("utf-8")
    return instance, script


def _run_as_cloud_init(script: str, instance_root: Path) -> subprocess.CompletedProcess:
    """Execute the UserData as cloud-init does: as root, no HOME, the minimal PATH."""
    instance_root.mkdir(parents=True, exist_ok=True)
    path = instance_root / "user-data"
    path.write_text(script, encoding="utf-8")
    path.chmod(0o700)
    environment = [
        f"PATH={CLOUD_INIT_PATH}",
        # An instance role's credentials, as the SDK would read them on the instance.
        "AWS_ACCESS_KEY_ID=testing",
        "AWS_SECRET_ACCESS_KEY=testing",
    ]
    return subprocess.run(
        ["env", "-i", *environment, "/bin/bash", str(path)],
        cwd=instance_root,
        capture_output=True,
        text=True,
        timeout=BOOTSTRAP_TIMEOUT_S,
        check=False,
    )


def _run_id_of(instance: dict) -> str:
    tags = {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}
    return tags["musicgen-batch:run-id"]


def _keys(account) -> set[str]:
    paginator = account["s3"].get_paginator("list_objects_v2")
    keys = set()
    for page in paginator.paginate(Bucket=account["bucket"], Prefix=f"{PREFIX}/"):
        keys.update(item["Key"].removeprefix(f"{PREFIX}/") for item in page.get("Contents", []))
    return keys


def _get(account, key: str) -> bytes:
    response = account["s3"].get_object(Bucket=account["bucket"], Key=f"{PREFIX}/{key}")
    return response["Body"].read()


def _stream_text(notebook) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream"
    )


def test_full_cycle(account, metadata_server, tiny_model_dir, tmp_path):
    metadata_endpoint, metadata_facts = metadata_server
    instance_root = tmp_path / "instance"
    options = _bootstrap_options(instance_root, os.environ["AWS_ENDPOINT_URL"], metadata_endpoint)

    instance, script = _launch_and_read_user_data(account, tmp_path, options, str(tiny_model_dir))
    run_id = _run_id_of(instance)
    metadata_facts.update(
        {
            "/latest/meta-data/instance-id": instance["InstanceId"],
            "/latest/meta-data/instance-type": instance["InstanceType"],
            "/latest/meta-data/placement/availability-zone": instance["Placement"][
                "AvailabilityZone"
            ],
            "/latest/meta-data/placement/region": "us-east-1",
        }
    )
    assert script.startswith("#!")
    assert "testing" not in script  # the credentials never enter the UserData

    done = _run_as_cloud_init(script, instance_root)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    # Songs of exact lengths, their records and the report, in the bucket.
    keys = _keys(account)
    report = pd.read_csv(io.BytesIO(_get(account, "cost_report.csv")))
    assert sorted(report["s3_filename"]) == sorted(
        key for key in keys if key.endswith(".wav") and "/" not in key
    )
    assert len(report) == len(SONGS)
    for key in report["s3_filename"]:
        stem = key.rsplit("-", 1)[0]
        info = soundfile.info(io.BytesIO(_get(account, key)))
        assert info.frames == round(SONGS[stem] * 32_000), key
        record = json.loads(_get(account, f"records/{key.removesuffix('.wav')}.json"))
        assert record["status"] == "done"
        assert record["run_id"] == run_id
        assert record["instance_id"] == instance["InstanceId"]
        assert record["hourly_cost_usd"] == 0.40

    # The run's folder: executed notebook, bootstrap log, no failure marker.
    assert f"runs/{run_id}/03_generate.ipynb" in keys
    assert f"runs/{run_id}/bootstrap.log" in keys
    assert f"runs/{run_id}/FAILED" not in keys
    executed = nbformat.reads(_get(account, f"runs/{run_id}/03_generate.ipynb").decode(), 4)
    assert "generated 3, skipped 0, failed 0" in _stream_text(executed)
    log = _get(account, f"runs/{run_id}/bootstrap.log").decode()
    assert "arming a hard cap of 30 minute(s)" in log
    assert f"checked out {account['head']}" in log

    # The hard cap was armed first, and the instance shut itself down at the end.
    assert (instance_root / "markers" / "hard-cap").read_text() == "armed\n"
    assert (instance_root / "markers" / "shutdown").read_text() == "shutdown\n"

    # The analysis notebook reads the bucket: charts written, totals equal the records.
    papermill.execute_notebook(
        str(PROJECT_ROOT / "notebooks" / "04_cost_analysis.ipynb"),
        str(tmp_path / "analysis.ipynb"),
        parameters={"output_uri": account["output_uri"], "cache_dir": str(tmp_path / "cache")},
        kernel_name="python3",
        progress_bar=False,
    )
    for chart in CHARTS:
        assert _get(account, f"reports/{chart}.png")[:8] == b"\x89PNG\r\n\x1a\n"
    totals_table = pd.read_csv(io.BytesIO(_get(account, "reports/totals.csv")))
    totals = dict(zip(totals_table["quantity"].str.strip(), totals_table["value"], strict=True))
    records = [
        json.loads(_get(account, f"records/{key.removesuffix('.wav')}.json"))
        for key in report["s3_filename"]
    ]
    assert int(totals["songs done"]) == len(SONGS)
    assert float(totals["minutes of audio"]) == pytest.approx(sum(SONGS.values()) / 60)
    assert float(totals["generation hours"]) == pytest.approx(
        sum(record["generation_time_s"] for record in records) / 3600
    )
    assert float(totals["estimated cost (USD, at the hourly rate)"]) == pytest.approx(
        sum(record["estimated_cost_usd"] for record in records)
    )

    # The launch notebook's shutdown cell leaves no tagged instance and no open request.
    _run_launch_notebook(
        tmp_path,
        "shutdown",
        shutdown=True,
        prompts_path=str(account["prompts"]),
        output_uri=account["output_uri"],
        model_id=str(tiny_model_dir),
    )
    assert _tagged_instances(account["ec2"]) == []
    requests = account["ec2"].describe_spot_instance_requests(
        Filters=[
            {"Name": "tag:Name", "Values": [WORKER_TAG]},
            {"Name": "state", "Values": ["open", "active"]},
        ]
    )["SpotInstanceRequests"]
    assert requests == []


def test_broken_commit_still_reports(
    account, metadata_server, tiny_model_dir, tmp_path, monkeypatch
):
    missing_commit = "0" * 40
    monkeypatch.setenv("REPO_COMMIT", missing_commit)
    metadata_endpoint, _ = metadata_server
    instance_root = tmp_path / "instance"
    options = _bootstrap_options(instance_root, os.environ["AWS_ENDPOINT_URL"], metadata_endpoint)

    instance, script = _launch_and_read_user_data(account, tmp_path, options, str(tiny_model_dir))
    run_id = _run_id_of(instance)
    done = _run_as_cloud_init(script, instance_root)
    assert done.returncode != 0

    # No song, but the log and the failure marker reached the bucket, and the instance
    # still shut itself down.
    keys = _keys(account)
    assert not any(key.endswith(".wav") for key in keys)
    assert f"runs/{run_id}/bootstrap.log" in keys
    marker = _get(account, f"runs/{run_id}/FAILED").decode()
    assert "step=clone" in marker
    assert "exit_code=" in marker
    log = _get(account, f"runs/{run_id}/bootstrap.log").decode()
    assert missing_commit in log
    assert (instance_root / "markers" / "hard-cap").exists()
    assert (instance_root / "markers" / "shutdown").read_text() == "shutdown\n"

    # The launch notebook's status cell shows the failure and where its log is.
    status = _run_launch_notebook(
        tmp_path,
        "status",
        prompts_path=str(account["prompts"]),
        output_uri=account["output_uri"],
        model_id=str(tiny_model_dir),
        run_id=run_id,
    )
    text = _stream_text(status)
    markdown = "".join(
        "".join(output.get("data", {}).get("text/markdown", ""))
        for cell in status.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert "The bootstrap failed" in markdown
    assert "step=clone" in markdown
    assert f"runs/{run_id}/bootstrap.log" in text + markdown
