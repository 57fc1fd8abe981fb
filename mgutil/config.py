"""Settings shared by every notebook and by the worker, read from the environment and ``.env``.

Values set in the process environment win over ``.env``, which wins over the defaults,
so a variable exported on an EC2 instance overrides a file copied along with the code.
All validation happens in :func:`load_settings`, which reports every invalid variable at
once, each with its value and the fix.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

from dotenv import dotenv_values

from mgutil.errors import ConfigError

# Repository root: mgutil is installed in editable mode by `uv sync`, so this is the
# checkout that holds notebooks/, prompts.txt and outputs/.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ENV_FILE = PROJECT_ROOT / ".env"

DEFAULT_REGION = "us-east-1"
DEFAULT_OUTPUT_URI = "outputs/"
DEFAULT_MODEL = "facebook/musicgen-small"
DEFAULT_INSTANCE_TYPE = "g4dn.xlarge"
# Instance types a fleet of several workers may use: single-GPU types with 16 GiB or more
# of GPU memory (T4, A10G, L4).
DEFAULT_INSTANCE_TYPES = ("g4dn.xlarge", "g5.xlarge", "g6.xlarge")
DEFAULT_MAX_SPOT_PRICE_USD = 0.40
# Public SSM parameter that AWS keeps pointed at the newest Deep Learning Base OSS
# Nvidia Driver GPU AMI on Ubuntu 22.04 (x86_64): driver and CUDA, no Python stack, since
# the worker installs its own with uv.
DEFAULT_AMI_SSM_PARAMETER = (
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
)
DEFAULT_INSTANCE_PROFILE = "musicgen-worker"
DEFAULT_SECURITY_GROUP_NAME = "musicgen-worker-sg"
DEFAULT_WORKER_TAG = "musicgen-batch-worker"
DEFAULT_MAX_DURATION_S = 600.0

_REGION_PATTERN = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-\d+$")
_INSTANCE_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
_AMI_PATTERN = re.compile(r"^ami-[0-9a-f]{8}([0-9a-f]{9})?$")
# Bucket naming rules: 3 to 63 characters of lowercase letters, digits, dots and hyphens,
# starting and ending with a letter or digit.
_BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Settings:
    """Validated settings. Prices are in USD per instance-hour, durations in seconds."""

    region: str = DEFAULT_REGION
    output_uri: str = DEFAULT_OUTPUT_URI
    model_id: str = DEFAULT_MODEL
    instance_type: str = DEFAULT_INSTANCE_TYPE
    max_spot_price_usd: float = DEFAULT_MAX_SPOT_PRICE_USD
    hourly_cost_usd: float = DEFAULT_MAX_SPOT_PRICE_USD
    ami_id: str | None = None
    ami_ssm_parameter: str = DEFAULT_AMI_SSM_PARAMETER
    instance_profile: str = DEFAULT_INSTANCE_PROFILE
    security_group_name: str = DEFAULT_SECURITY_GROUP_NAME
    key_pair_name: str | None = None
    worker_tag: str = DEFAULT_WORKER_TAG
    repo_url: str | None = None
    repo_commit: str | None = None
    max_duration_s: float = DEFAULT_MAX_DURATION_S
    instance_types: tuple[str, ...] = DEFAULT_INSTANCE_TYPES

    @property
    def is_s3(self) -> bool:
        return self.output_uri.startswith("s3://")

    def with_overrides(self, **overrides) -> Settings:
        """Return a copy with every override that is not ``None`` applied and validated."""
        values = {name: value for name, value in overrides.items() if value is not None}
        unknown = set(values) - {field.name for field in fields(self)}
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        updated = replace(self, **values)
        problems = _validate(updated)
        if problems:
            raise ConfigError(_format_problems(problems))
        return updated


# Environment variable -> (Settings field, parser). The parser returns the value or
# raises ValueError with the fix.
def _parse_price(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number of USD per hour, such as 0.40")
    return value


def _parse_seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number of seconds, such as 600")
    return value


def _parse_text(text: str) -> str:
    return text.strip()


def _parse_list(text: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise ValueError("must list one or more values separated by commas")
    return items


_VARIABLES: dict[str, tuple[str, object]] = {
    "AWS_REGION": ("region", _parse_text),
    "MUSICGEN_OUTPUT_URI": ("output_uri", _parse_text),
    "MUSICGEN_MODEL": ("model_id", _parse_text),
    "INSTANCE_TYPE": ("instance_type", _parse_text),
    "MAX_SPOT_PRICE_USD": ("max_spot_price_usd", _parse_price),
    "HOURLY_COST_USD": ("hourly_cost_usd", _parse_price),
    "AMI_ID": ("ami_id", _parse_text),
    "AMI_SSM_PARAMETER": ("ami_ssm_parameter", _parse_text),
    "INSTANCE_PROFILE": ("instance_profile", _parse_text),
    "SECURITY_GROUP_NAME": ("security_group_name", _parse_text),
    "KEY_PAIR_NAME": ("key_pair_name", _parse_text),
    "WORKER_TAG": ("worker_tag", _parse_text),
    "REPO_URL": ("repo_url", _parse_text),
    "REPO_COMMIT": ("repo_commit", _parse_text),
    "MUSICGEN_MAX_DURATION_S": ("max_duration_s", _parse_seconds),
    "INSTANCE_TYPES": ("instance_types", _parse_list),
}
_FIELD_TO_VARIABLE = {field: name for name, (field, _) in _VARIABLES.items()}


def read_environment(
    env_file: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Merge ``.env`` and the process environment, the environment winning.

    Only the variables that mgutil knows are returned, and empty values count as unset.
    """
    environ = os.environ if environ is None else environ
    if env_file is None:
        env_file = environ.get("MUSICGEN_ENV_FILE") or DEFAULT_ENV_FILE
    env_path = Path(env_file)
    merged: dict[str, str] = {}
    if env_path.is_file():
        for name, value in dotenv_values(env_path).items():
            if name in _VARIABLES and value not in (None, ""):
                merged[name] = value
    for name in _VARIABLES:
        value = environ.get(name)
        if value not in (None, ""):
            merged[name] = value
    return merged


def load_settings(
    env_file: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read, parse and validate every setting.

    Args:
        env_file: The ``.env`` file to read; defaults to ``MUSICGEN_ENV_FILE`` when set,
            else ``.env`` at the project root. A missing file is not an error.
        environ: The environment to read; defaults to ``os.environ``.

    Raises:
        ConfigError: One or more variables are invalid. The message lists each one with
            its value and the fix.
    """
    raw = read_environment(env_file, environ)
    values: dict[str, object] = {}
    problems: list[str] = []
    for name, text in raw.items():
        field, parse = _VARIABLES[name]
        try:
            values[field] = parse(text)
        except ValueError as error:
            reason = str(error)
            if reason.startswith("could not convert"):
                reason = "must be a number"
            problems.append(f"{name}={text!r} is invalid: {reason}.")

    # Cost estimates use the price the user pays at most unless told otherwise, so the
    # worker and the launcher read the same figure.
    if "hourly_cost_usd" not in values and "max_spot_price_usd" in values:
        values["hourly_cost_usd"] = values["max_spot_price_usd"]

    settings = Settings(**values)
    # Report parse errors and validation errors together; a variable that failed to
    # parse kept its default, so it adds no second message here.
    problems += _validate(settings)
    if problems:
        raise ConfigError(_format_problems(problems))
    return settings


def _validate(settings: Settings) -> list[str]:
    """Check values that each parser cannot check alone; return one message per problem."""
    problems = []

    def add(field: str, value: object, reason: str) -> None:
        problems.append(f"{_FIELD_TO_VARIABLE[field]}={value!r} is invalid: {reason}.")

    if not _REGION_PATTERN.match(settings.region):
        add("region", settings.region, "expected a region name such as us-east-1 or eu-west-1")
    if not _INSTANCE_TYPE_PATTERN.match(settings.instance_type):
        add(
            "instance_type", settings.instance_type, "expected an instance type such as g4dn.xlarge"
        )
    bad_types = [name for name in settings.instance_types if not _INSTANCE_TYPE_PATTERN.match(name)]
    if bad_types or not settings.instance_types:
        add(
            "instance_types",
            ",".join(settings.instance_types),
            "expected instance types separated by commas, such as g4dn.xlarge,g5.xlarge",
        )
    if settings.ami_id is not None and not _AMI_PATTERN.match(settings.ami_id):
        add("ami_id", settings.ami_id, "expected an AMI id such as ami-0123456789abcdef0")
    if not settings.model_id:
        add(
            "model_id",
            settings.model_id,
            "set a hub id such as facebook/musicgen-small or a folder",
        )
    for field in ("max_spot_price_usd", "hourly_cost_usd"):
        value = getattr(settings, field)
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            add(field, value, "must be a positive number of USD per hour, such as 0.40")
    if not (math.isfinite(settings.max_duration_s) and settings.max_duration_s > 0):
        add("max_duration_s", settings.max_duration_s, "must be a positive number of seconds")
    try:
        parse_output_uri(settings.output_uri)
    except ConfigError as error:
        problems.append(f"MUSICGEN_OUTPUT_URI: {error}")
    return problems


def _format_problems(problems: list[str]) -> str:
    header = "invalid configuration (set these in the environment or in .env, see .env.example):"
    return "\n".join([header, *(f"  - {problem}" for problem in problems)])


def parse_output_uri(uri: str) -> tuple[str, str, str]:
    """Split an output location into ``(scheme, bucket_or_folder, prefix)``.

    ``s3://bucket/some/prefix`` gives ``("s3", "bucket", "some/prefix/")``, and a folder
    gives ``("file", absolute_folder, "")``. A relative folder is resolved against the
    project root, so a notebook finds the same ``outputs/`` whether it runs in JupyterLab
    (working directory ``notebooks/``) or under papermill.

    Raises:
        ConfigError: The URI is empty, uses another scheme, or names an invalid bucket.
    """
    if not uri or not uri.strip():
        raise ConfigError(
            "the output location is empty: set a folder such as outputs/ or s3://bucket/prefix"
        )
    uri = uri.strip()
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not _BUCKET_PATTERN.match(bucket) or ".." in bucket:
            raise ConfigError(
                f"invalid S3 bucket name {bucket!r} in {uri!r}: bucket names have 3 to 63 "
                "lowercase letters, digits, dots or hyphens, for example s3://my-music-bucket/songs"
            )
        prefix = prefix.strip("/")
        return "s3", bucket, f"{prefix}/" if prefix else ""
    if "://" in uri:
        raise ConfigError(
            f"unsupported output location {uri!r}: use a local folder or an s3://bucket/prefix URI"
        )
    return "file", str(resolve_project_path(uri)), ""


def resolve_project_path(path: str | Path) -> Path:
    """Resolve a relative path against the project root; keep absolute paths."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else (PROJECT_ROOT / path).resolve()


def git_repo_source(root: Path = PROJECT_ROOT) -> tuple[str | None, str | None]:
    """Return the ``origin`` URL and ``HEAD`` commit of the local repository.

    Either is ``None`` when git is missing, the folder is not a repository, or no
    ``origin`` remote is set. No network call is made.
    """

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() or None if result.returncode == 0 else None

    return git("remote", "get-url", "origin"), git("rev-parse", "HEAD")
