"""The worker's UserData: a bash script rendered from ``templates/bootstrap.sh``.

Every behaviour of the script is a field of :class:`BootstrapConfig`, rendered into
shell-quoted variables at the top of the template, so a drill can run the same script
on another machine with a ``file://`` repository and a harmless shutdown command.

The job file reaches the instance through the output location: the launcher uploads it
to ``runs/<run id>/prompts.txt`` and the script downloads it after ``uv sync``.

Run as ``python -m mgutil.aws.bootstrap copy SOURCE TARGET``, this module copies one
file between the local disk and ``s3://``; the script uses it to fetch the job file
and to upload its log, the executed notebook and the failure marker.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import shlex
import string
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath

from mgutil.errors import BootstrapError, ConfigError

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "bootstrap.sh"
# EC2 accepts at most 16 KB of UserData, counted before base64 encoding.
MAX_USER_DATA_BYTES = 16 * 1024
# The variable that tells the worker it runs on EC2; only this script exports it.
EC2_WORKER_VARIABLE = "MUSICGEN_EC2_WORKER"
DEFAULT_WORK_DIR = "/opt/musicgen"
DEFAULT_HOME_DIR = "/root"
DEFAULT_LOG_FILE = "/var/log/musicgen-bootstrap.log"
DEFAULT_MAX_RUNTIME_MINUTES = 240
DEFAULT_SHUTDOWN_COMMAND = "shutdown -h now"
DEFAULT_UV_INSTALL_COMMAND = "curl -LsSf https://astral.sh/uv/install.sh | sh"
JOB_FILE_NAME = "prompts.txt"
RUNS_PREFIX = "runs/"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Variable names that may carry a credential; the instance uses its IAM role instead.
_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
# Text that looks like a credential anywhere in the rendered script.
_SECRET_PATTERNS = (
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"aws_secret_access_key|aws_session_token", re.I),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
)


class _Template(string.Template):
    # "@@{NAME}" never occurs in bash, unlike "${NAME}".
    delimiter = "@@"


@dataclass(frozen=True)
class BootstrapConfig:
    """Settings of the bootstrap script. Durations in minutes, prices in USD per hour.

    Attributes:
        run_id: Id of the run; names ``runs/<run id>/`` and is passed to the worker.
        repo_url: Any git URL the instance can clone, ``file://`` included.
        repo_commit: Commit (or tag) to check out.
        output_uri: ``s3://bucket/prefix`` where songs, records and run files go.
        model_id: Hub id or folder of the MusicGen checkpoint.
        hourly_cost_usd: Rate the worker's cost records use; the maximum spot price.
        region: AWS region, exported as ``AWS_REGION`` and ``AWS_DEFAULT_REGION``.
        max_runtime_minutes: Hard cap; the hard-cap command is armed before anything else.
        auto_shutdown: Run ``shutdown_command`` when the script exits, success or not.
        shutdown_command: Command run on exit when ``auto_shutdown`` is on.
        hard_cap_command: Command that arms the cap; ``None`` means
            ``shutdown -h +<max_runtime_minutes>``.
        work_dir: Folder for the clone, the job file, the executed notebook and caches.
        home_dir: ``HOME`` for the script; cloud-init sets none.
        log_file: Where the script logs everything.
        uv_install_command: Command that installs uv into ``$HOME/.local/bin`` when
            ``uv`` is not on the ``PATH``.
        extra_env: More variables to export, such as ``AWS_ENDPOINT_URL`` in a drill.
            Names that look like credentials are refused.
    """

    run_id: str
    repo_url: str
    repo_commit: str
    output_uri: str
    model_id: str
    hourly_cost_usd: float
    region: str
    max_runtime_minutes: int = DEFAULT_MAX_RUNTIME_MINUTES
    auto_shutdown: bool = True
    shutdown_command: str = DEFAULT_SHUTDOWN_COMMAND
    hard_cap_command: str | None = None
    work_dir: str = DEFAULT_WORK_DIR
    home_dir: str = DEFAULT_HOME_DIR
    log_file: str = DEFAULT_LOG_FILE
    uv_install_command: str = DEFAULT_UV_INSTALL_COMMAND
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def runs_uri(self) -> str:
        """``s3://`` URI of this run's folder, without a trailing slash."""
        return f"{self.output_uri.rstrip('/')}/{RUNS_PREFIX}{self.run_id}"

    @property
    def jobs_uri(self) -> str:
        """``s3://`` URI the launcher uploads the job file to."""
        return f"{self.runs_uri}/{JOB_FILE_NAME}"

    @property
    def prompts_path(self) -> str:
        """Where the script stores the job file on the instance."""
        return str(PurePosixPath(self.work_dir) / "runs" / self.run_id / JOB_FILE_NAME)

    @property
    def effective_hard_cap_command(self) -> str:
        if self.hard_cap_command is not None:
            return self.hard_cap_command
        return f"shutdown -h +{self.max_runtime_minutes}"

    def papermill_parameters(self) -> dict:
        """Parameters of ``03_generate.ipynb``; passed as YAML (JSON) so types survive."""
        return {
            "prompts_path": self.prompts_path,
            "output_uri": self.output_uri,
            "model_id": self.model_id,
            "hourly_cost_usd": float(self.hourly_cost_usd),
            "run_id": self.run_id,
        }


def _validate(config: BootstrapConfig) -> list[str]:
    problems = []
    if not config.output_uri.startswith("s3://"):
        problems.append(
            f"output_uri={config.output_uri!r}: a worker instance can only write to S3; "
            "set MUSICGEN_OUTPUT_URI or -p output_uri to s3://bucket/prefix"
        )
    if not re.fullmatch(r"[A-Za-z0-9._-]+", config.run_id or ""):
        problems.append(f"run_id={config.run_id!r}: use letters, digits, '.', '_' and '-' only")
    if not config.repo_url:
        problems.append(
            "repo_url is empty: set REPO_URL to a git URL the instance can clone "
            "(the default is this checkout's origin remote)"
        )
    if not config.repo_commit:
        problems.append("repo_commit is empty: set REPO_COMMIT to a pushed commit")
    if (
        not isinstance(config.max_runtime_minutes, int)
        or isinstance(config.max_runtime_minutes, bool)
        or config.max_runtime_minutes < 1
    ):
        problems.append(
            f"max_runtime_minutes={config.max_runtime_minutes!r}: expected a whole number of "
            "minutes >= 1, such as 240"
        )
    for name in ("work_dir", "home_dir", "log_file"):
        value = getattr(config, name)
        if not value.startswith("/") or value.rstrip("/") == "":
            problems.append(f"{name}={value!r}: expected an absolute path other than /")
    for name, value in config.extra_env.items():
        if not _ENV_NAME.match(name):
            problems.append(f"extra_env name {name!r} is not a valid shell variable name")
        elif _SECRET_NAME.search(name):
            problems.append(
                f"extra_env {name!r} looks like a credential; the instance uses its IAM role, "
                "so pass no keys or tokens"
            )
        if not isinstance(value, str):
            problems.append(f"extra_env {name!r}: the value must be a string, got {value!r}")
    return problems


def render_user_data(config: BootstrapConfig) -> str:
    """Render the bootstrap script for ``config`` and check it.

    Returns:
        The script as text, starting with ``#!``.

    Raises:
        ConfigError: A setting is invalid; the message lists each one with the fix.
        BootstrapError: The rendered script fails :func:`check_user_data`.
    """
    problems = _validate(config)
    if problems:
        raise ConfigError("invalid bootstrap settings:\n" + "\n".join(f"  - {p}" for p in problems))
    template = _Template(
        resources.files("mgutil.aws").joinpath("templates", TEMPLATE_NAME).read_text("utf-8")
    )
    extra_env = "\n".join(
        f"export {name}={shlex.quote(value)}" for name, value in sorted(config.extra_env.items())
    )
    values = {
        "RUN_ID": config.run_id,
        "REPO_URL": config.repo_url,
        "REPO_COMMIT": config.repo_commit,
        "WORK_DIR": config.work_dir,
        "HOME_DIR": config.home_dir,
        "OUTPUT_URI": config.output_uri,
        "RUNS_URI": config.runs_uri,
        "JOBS_URI": config.jobs_uri,
        "MODEL_ID": config.model_id,
        "REGION": config.region,
        "PAPERMILL_PARAMETERS": json.dumps(config.papermill_parameters(), sort_keys=True),
        "MAX_RUNTIME_MINUTES": str(config.max_runtime_minutes),
        "HARD_CAP_COMMAND": config.effective_hard_cap_command,
        "AUTO_SHUTDOWN": "1" if config.auto_shutdown else "0",
        "SHUTDOWN_COMMAND": config.shutdown_command,
        "UV_INSTALL_COMMAND": config.uv_install_command,
        "LOG_FILE": config.log_file,
    }
    quoted = {name: shlex.quote(str(value)) for name, value in values.items()}
    quoted["EXTRA_ENV"] = extra_env or ": # none"
    script = template.substitute(quoted)
    check_user_data(script)
    return script


def check_user_data(script: str) -> None:
    """Check a UserData script before it is sent.

    Raises:
        BootstrapError: The script does not start with ``#!``, is 16 KB or more, or
            contains something that looks like a credential.
    """
    if not script.startswith("#!"):
        raise BootstrapError("the UserData must start with '#!' so cloud-init runs it as a script")
    size = len(script.encode("utf-8"))
    if size >= MAX_USER_DATA_BYTES:
        raise BootstrapError(
            f"the UserData is {size} bytes; EC2 accepts less than {MAX_USER_DATA_BYTES}. "
            "Shorten the extra environment or the commands"
        )
    for pattern in _SECRET_PATTERNS:
        if pattern.search(script):
            raise BootstrapError(
                f"the UserData contains text that looks like a credential (pattern "
                f"{pattern.pattern!r}); remove it, since the instance uses its IAM role"
            )


def encode_user_data(script: str) -> str:
    """Return ``script`` as base64 text, for APIs that take encoded UserData."""
    return base64.b64encode(script.encode("utf-8")).decode("ascii")


def decode_user_data(encoded: str) -> str:
    """Return the script from base64 UserData."""
    return base64.b64decode(encoded).decode("utf-8")


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ValueError(f"expected s3://bucket/key, got {uri!r}")
    return bucket, key


def copy_file(source: str, target: str, s3_client=None) -> None:
    """Copy a local file to ``s3://`` or an ``s3://`` object to a local file.

    Raises:
        ValueError: Neither or both sides are ``s3://`` URIs.
        botocore.exceptions.ClientError: S3 refused the transfer.
    """
    from mgutil.aws.clients import make_client

    to_s3 = target.startswith("s3://")
    from_s3 = source.startswith("s3://")
    if to_s3 == from_s3:
        raise ValueError(f"copy needs exactly one s3:// side, got {source!r} -> {target!r}")
    s3 = s3_client if s3_client is not None else make_client("s3")
    if to_s3:
        bucket, key = _split_s3(target)
        s3.upload_file(source, bucket, key)
    else:
        bucket, key = _split_s3(source)
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, target)
    logger.info("copied %s to %s", source, target)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``copy SOURCE TARGET``. Returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if len(argv) != 3 or argv[0] != "copy":
        logger.error("usage: python -m mgutil.aws.bootstrap copy SOURCE TARGET")
        return 2
    try:
        copy_file(argv[1], argv[2])
    except Exception as error:  # report any failure as a status for the shell script
        logger.error("copy %s -> %s failed: %s", argv[1], argv[2], error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
