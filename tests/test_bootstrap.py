"""The worker's UserData: rendering, checks, shellcheck, and a real run under ``env -i``.

The run executes the rendered script as cloud-init would (no HOME, no PATH), with a
``file://`` repository, harmless hard-cap and shutdown commands, a stand-in ``uv`` that
runs the real ``python -m mgutil.aws.bootstrap copy`` for transfers, and the moto
server on 127.0.0.1 as S3.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import boto3
import pytest

from mgutil.aws.bootstrap import (
    EC2_WORKER_VARIABLE,
    MAX_USER_DATA_BYTES,
    BootstrapConfig,
    check_user_data,
    decode_user_data,
    encode_user_data,
    render_user_data,
)
from mgutil.errors import BootstrapError, ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BASE = BootstrapConfig(
    run_id="20260101T000000Z-abcd",
    repo_url="https://git.example.com/musicgen-batch.git",
    repo_commit="0123456789abcdef0123456789abcdef01234567",
    output_uri="s3://musicgen-test-bucket/songs",
    model_id="facebook/musicgen-small",
    hourly_cost_usd=0.4,
    region="us-east-1",
)


def _settings_of(script: str) -> dict[str, str]:
    """Evaluate the script's settings block in bash and return the variables."""
    header = script.split("\nexport HOME=", 1)[0]
    names = [
        "RUN_ID", "REPO_URL", "REPO_COMMIT", "WORK_DIR", "HOME_DIR", "OUTPUT_URI", "RUNS_URI",
        "JOBS_URI", "MODEL_ID", "REGION", "PAPERMILL_PARAMETERS", "MAX_RUNTIME_MINUTES",
        "HARD_CAP_COMMAND", "AUTO_SHUTDOWN", "SHUTDOWN_COMMAND", "UV_INSTALL_COMMAND", "LOG_FILE",
    ]  # fmt: skip
    dump = "".join(f'printf "%s\\0" "${name}";' for name in names)
    done = subprocess.run(
        ["bash", "-c", header.replace("set -euo pipefail", "") + "\n" + dump],
        capture_output=True,
        check=True,
    )
    values = done.stdout.decode().split("\0")[:-1]
    return dict(zip(names, values, strict=True))


def test_script_passes_shellcheck(tmp_path):
    script = render_user_data(replace(BASE, extra_env={"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}))
    path = tmp_path / "user-data.sh"
    path.write_text(script)
    assert script.startswith("#!/bin/bash\n")
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian package shellcheck; .ci/run installs it)")
    checked = subprocess.run([shellcheck, "--severity=style", str(path)], capture_output=True)
    assert checked.returncode == 0, checked.stdout.decode()


def test_settings_rendered_quoted():
    config = replace(
        BASE,
        repo_url="file:///srv/repo with space",
        model_id="it's/a model",
        max_runtime_minutes=17,
        auto_shutdown=False,
        shutdown_command="touch /tmp/down; echo 'done'",
        work_dir="/srv/work dir",
        home_dir="/srv/home",
        log_file="/srv/log/boot.log",
        uv_install_command="echo install uv",
        extra_env={"AWS_ENDPOINT_URL": "http://127.0.0.1:5000", "QUOTED": "a b$c'd"},
    )
    script = render_user_data(config)
    values = _settings_of(script)
    assert values["REPO_URL"] == "file:///srv/repo with space"
    assert values["REPO_COMMIT"] == config.repo_commit
    assert values["MODEL_ID"] == "it's/a model"
    assert values["MAX_RUNTIME_MINUTES"] == "17"
    assert values["HARD_CAP_COMMAND"] == "shutdown -h +17"
    assert values["AUTO_SHUTDOWN"] == "0"
    assert values["SHUTDOWN_COMMAND"] == "touch /tmp/down; echo 'done'"
    assert values["WORK_DIR"] == "/srv/work dir"
    assert values["HOME_DIR"] == "/srv/home"
    assert values["LOG_FILE"] == "/srv/log/boot.log"
    assert values["UV_INSTALL_COMMAND"] == "echo install uv"
    assert values["RUNS_URI"] == f"s3://musicgen-test-bucket/songs/runs/{config.run_id}"
    assert values["JOBS_URI"] == values["RUNS_URI"] + "/prompts.txt"
    parameters = json.loads(values["PAPERMILL_PARAMETERS"])
    assert parameters == {
        "prompts_path": f"/srv/work dir/runs/{config.run_id}/prompts.txt",
        "output_uri": "s3://musicgen-test-bucket/songs",
        "model_id": "it's/a model",
        "hourly_cost_usd": 0.4,
        "run_id": config.run_id,
    }
    assert "export QUOTED='a b$c'\"'\"'d'" in script
    assert f"export {EC2_WORKER_VARIABLE}=1" in script
    # The defaults: cap from the minutes, shutdown on, the documented commands.
    defaults = _settings_of(render_user_data(BASE))
    assert defaults["HARD_CAP_COMMAND"] == "shutdown -h +240"
    assert defaults["AUTO_SHUTDOWN"] == "1"
    assert defaults["SHUTDOWN_COMMAND"] == "shutdown -h now"
    assert defaults["WORK_DIR"] == "/opt/musicgen"
    hard_cap = render_user_data(replace(BASE, hard_cap_command="echo cap"))
    assert _settings_of(hard_cap)["HARD_CAP_COMMAND"] == "echo cap"


def test_template_step_order():
    script = render_user_data(BASE)
    body = script.split("trap on_exit EXIT", 1)[1]
    steps = [
        '/bin/sh -c "$HARD_CAP_COMMAND"',
        "UV_BIN=$(command -v uv)",
        "git clone",
        '"$UV_BIN" sync --frozen',
        'transfer "$JOBS_URI"',
        "export MUSICGEN_EC2_WORKER=1",
        "papermill notebooks/03_generate.ipynb",
    ]
    positions = [body.index(step) for step in steps]
    assert positions == sorted(positions)
    assert "set -euo pipefail" in script.split("RUN_ID=", 1)[0]
    assert "-k python3 --log-output -y" in script


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"output_uri": "outputs/"}, "can only write to S3"),
        ({"repo_url": ""}, "repo_url is empty"),
        ({"repo_commit": ""}, "repo_commit is empty"),
        ({"max_runtime_minutes": 0}, "max_runtime_minutes=0"),
        ({"work_dir": "relative"}, "work_dir='relative'"),
        ({"run_id": "a b"}, "run_id='a b'"),
        ({"extra_env": {"AWS_SECRET_ACCESS_KEY": "x"}}, "looks like a credential"),
        ({"extra_env": {"HF_TOKEN": "x"}}, "looks like a credential"),
        ({"extra_env": {"1BAD": "x"}}, "not a valid shell variable name"),
    ],
)
def test_invalid_settings_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        render_user_data(replace(BASE, **change))


def test_user_data_checks():
    with pytest.raises(BootstrapError, match="#!"):
        check_user_data("echo no shebang\n")
    with pytest.raises(BootstrapError, match="bytes"):
        check_user_data("#!/bin/bash\n" + "#" * MAX_USER_DATA_BYTES)
    for secret in ("AKIAABCDEFGHIJKLMNOP", "aws_secret_access_key = x"):
        with pytest.raises(BootstrapError, match="credential"):
            check_user_data(f"#!/bin/bash\necho {secret}\n")
    with pytest.raises(BootstrapError, match="credential"):
        render_user_data(replace(BASE, extra_env={"NOTE": "AKIAABCDEFGHIJKLMNOP"}))
    script = render_user_data(BASE)
    assert decode_user_data(encode_user_data(script)) == script
    assert base64.b64decode(encode_user_data(script)).startswith(b"#!")


# --- A real run under env -i ----------------------------------------------------------

FAKE_UV = """#!/bin/bash
# Stand-in for uv: "sync" links the test's interpreter, "run python" runs it, and
# "run papermill" records its arguments and environment, writes a notebook and exits
# with FAKE_PAPERMILL_EXIT.
set -eu
case "$1" in
    --version) echo "uv 0.0.0 (test stand-in)" ;;
    sync) mkdir -p .venv/bin && ln -sf "{python}" .venv/bin/python ;;
    run)
        shift
        while [[ "$1" == --* ]]; do
            if [[ "$1" == --with ]]; then shift; fi
            shift
        done
        if [[ "$1" == python ]]; then shift; exec "{python}" "$@"; fi
        shift
        printf '%s\\n' "$@" >"{record}/papermill-args"
        env >"{record}/papermill-env"
        echo '{{"cells": []}}' >"$2"
        exit "${{FAKE_PAPERMILL_EXIT:-0}}"
        ;;
esac
"""


@pytest.fixture
def drill(aws, s3_bucket, tmp_path):
    """A file:// repository of this checkout, a home with a stand-in uv, S3 in moto."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(
        PROJECT_ROOT / "mgutil", repo / "mgutil", ignore=shutil.ignore_patterns("__pycache__")
    )
    (repo / "notebooks").mkdir()
    shutil.copy(PROJECT_ROOT / "notebooks" / "03_generate.ipynb", repo / "notebooks")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "snapshot"], check=True)
    commit = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".aws").mkdir()
    # Dummy keys for the moto server, in the test's home, never in the UserData.
    (home / ".aws" / "credentials").write_text(
        "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
    )
    record = tmp_path / "record"
    record.mkdir()
    uv = home / ".local" / "bin" / "uv"
    uv.write_text(FAKE_UV.format(python=sys.executable, record=record))
    uv.chmod(0o755)
    s3 = boto3.client("s3")
    s3.put_object(
        Bucket=s3_bucket, Key="songs/runs/drill/prompts.txt", Body=b"calm piano ; 5 ; p\n"
    )
    config = BootstrapConfig(
        run_id="drill",
        repo_url=f"file://{repo}",
        repo_commit=commit,
        output_uri=f"s3://{s3_bucket}/songs",
        model_id="facebook/musicgen-small",
        hourly_cost_usd=0.4,
        region="us-east-1",
        max_runtime_minutes=7,
        hard_cap_command=f"echo armed >{record}/hard-cap",
        shutdown_command=f"echo down >{record}/shutdown",
        work_dir=str(tmp_path / "work"),
        home_dir=str(home),
        log_file=str(tmp_path / "log" / "bootstrap.log"),
        uv_install_command="echo 'uv must not be installed here' >&2; exit 1",
        extra_env={"AWS_ENDPOINT_URL": aws, "AWS_EC2_METADATA_DISABLED": "true"},
    )
    return {"config": config, "record": record, "s3": s3, "bucket": s3_bucket, "tmp": tmp_path}


def _run(config: BootstrapConfig, tmp_path: Path, papermill_exit: int = 0):
    config = replace(
        config, extra_env={**config.extra_env, "FAKE_PAPERMILL_EXIT": str(papermill_exit)}
    )
    script = tmp_path / "user-data.sh"
    script.write_text(render_user_data(config))
    script.chmod(0o755)
    return subprocess.run(
        ["env", "-i", "/bin/bash", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _keys(drill):
    listed = drill["s3"].list_objects_v2(Bucket=drill["bucket"], Prefix="songs/runs/drill/")
    return {item["Key"].rsplit("/", 1)[-1] for item in listed.get("Contents", [])}


def test_run_uploads_files(drill):
    config, record = drill["config"], drill["record"]
    done = _run(config, drill["tmp"])

    assert done.returncode == 0, done.stdout + done.stderr
    assert (record / "hard-cap").read_text() == "armed\n"
    assert (record / "shutdown").read_text() == "down\n"
    args = (record / "papermill-args").read_text().splitlines()
    assert args[:2] == [
        "notebooks/03_generate.ipynb",
        f"{config.work_dir}/runs/drill/03_generate.ipynb",
    ]
    assert args[2:6] == ["-k", "python3", "--log-output", "-y"]
    assert json.loads(args[6]) == config.papermill_parameters()
    env = dict(
        line.split("=", 1)
        for line in (record / "papermill-env").read_text().splitlines()
        if "=" in line
    )
    assert env[EC2_WORKER_VARIABLE] == "1"
    assert env["HOME"] == config.home_dir
    assert env["PATH"].startswith(f"{config.home_dir}/.local/bin:")
    assert env["AWS_REGION"] == "us-east-1"
    assert "AWS_ACCESS_KEY_ID" not in env
    prompts = Path(config.prompts_path).read_text()
    assert prompts == "calm piano ; 5 ; p\n"
    assert _keys(drill) == {"prompts.txt", "bootstrap.log", "03_generate.ipynb"}
    log = drill["s3"].get_object(Bucket=drill["bucket"], Key="songs/runs/drill/bootstrap.log")
    text = log["Body"].read().decode()
    assert "arming a hard cap of 7 minute(s)" in text and "checked out" in text
    assert "finished: step done succeeded" in text


def test_failure_writes_marker(drill):
    done = _run(drill["config"], drill["tmp"], papermill_exit=3)

    assert done.returncode == 3
    assert "FAILED" in _keys(drill)
    marker = drill["s3"].get_object(Bucket=drill["bucket"], Key="songs/runs/drill/FAILED")
    text = marker["Body"].read().decode()
    assert "exit_code=3" in text and "step=run notebooks/03_generate.ipynb" in text
    assert {"bootstrap.log", "03_generate.ipynb"} <= _keys(drill)
    assert (drill["record"] / "shutdown").exists()


def test_clone_failure_without_shutdown(drill):
    config = replace(drill["config"], repo_commit="f" * 40, auto_shutdown=False)
    done = _run(config, drill["tmp"])

    assert done.returncode != 0
    marker = Path(config.work_dir) / "runs" / "drill" / "FAILED"
    assert "step=clone" in marker.read_text()
    # Without a synced environment (and with no AWS CLI on the PATH) nothing is uploaded.
    log = Path(config.log_file).read_text()
    assert "auto_shutdown is off" in log
    assert not (drill["record"] / "shutdown").exists()
    assert (drill["record"] / "hard-cap").exists()
