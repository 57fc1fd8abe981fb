"""AWS readiness check: whether a spot launch and a worker run will work, and the fixes.

:func:`run_readiness_checks` runs every check of :mod:`mgutil.aws.readiness_checks`
and returns one :class:`CheckResult` row per check. Each check runs in a thread with a
deadline, and any unexpected error becomes a ``fail`` row with the error text, so the
table is always complete. :func:`results_table` shows the rows with pandas and
:func:`raise_for_failures` raises :class:`~mgutil.errors.ReadinessError` after the table
was shown, which makes papermill exit non-zero.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from pathlib import Path

import pandas as pd

from mgutil.aws.readiness_checks import (
    CREDENTIALS_FIX,
    FAIL,
    PASS,
    WARN,
    CheckResult,
    check_ami,
    check_credentials,
    check_ec2_permissions,
    check_instance_profile,
    check_instance_type,
    check_job_file,
    check_output,
    check_source,
    check_spot_price,
    check_spot_quota,
    error_code,
    is_access_denied,
    is_credentials_error,
)
from mgutil.config import PROJECT_ROOT, Settings, load_settings
from mgutil.errors import ConfigError, ReadinessError

__all__ = [
    "CheckResult",
    "FAIL",
    "PASS",
    "WARN",
    "check_configuration",
    "make_readiness_clients",
    "raise_for_failures",
    "results_table",
    "run_readiness_checks",
    "summary_line",
]

logger = logging.getLogger(__name__)

# Seconds one stage of checks may take before its unfinished rows become timeout
# failures. Against a healthy account each check takes well under a second.
DEFAULT_TIMEOUT_S = 20.0
# Per-call limits of the check clients: a check fails fast instead of retrying for
# minutes like the launcher's clients do.
CHECK_CONNECT_TIMEOUT_S = 3
CHECK_MAX_ATTEMPTS = 2
SERVICES = ("sts", "ec2", "ssm", "service-quotas", "iam", "s3")
TABLE_COLUMNS = ["check", "status", "found", "fix"]

# Every row that the checks produce, in table order; a check that is not run still
# gets its row.
CONFIGURATION = "Configuration"
# Each configuration problem already states the expected form of its value, so the fix
# only names where to set it.
CONFIGURATION_FIX = (
    "correct each value named here in .env or the environment (see .env.example), or pass "
    "a valid notebook parameter"
)
CREDENTIALS = "AWS credentials"
AWS_CHECKS = (
    "AMI",
    "EC2 permissions",
    "Instance type",
    "Spot price",
    "Spot vCPU quota",
    "IAM instance profile",
)
OUTPUT_CHECKS = ("S3 bucket", "S3 public access", "S3 write probe")


def check_configuration(
    overrides: Mapping[str, object] | None = None, env_file: str | Path | None = None
) -> tuple[CheckResult, Settings | None]:
    """Load the settings and apply notebook parameters; return the row and the settings.

    Args:
        overrides: Settings fields to replace, such as ``{"region": "eu-west-1"}``;
            ``None`` values keep the configured value.
        env_file: The ``.env`` file; the default of :func:`mgutil.config.load_settings`
            when ``None``.

    Returns:
        The ``Configuration`` row, and the settings (``None`` when they are invalid).
    """
    try:
        settings = load_settings(env_file).with_overrides(**dict(overrides or {}))
    except ConfigError as error:
        problems = [line.strip(" -") for line in str(error).splitlines()[1:]] or [str(error)]
        return CheckResult(CONFIGURATION, FAIL, "; ".join(problems), CONFIGURATION_FIX), None
    found = (
        f"region {settings.region}, output {settings.output_uri}, {settings.instance_type} "
        f"at most ${settings.max_spot_price_usd:g}/h, instance profile "
        f"{settings.instance_profile!r}"
    )
    return CheckResult(CONFIGURATION, PASS, found), settings


def make_readiness_clients(region: str, timeout_s: float = DEFAULT_TIMEOUT_S, session=None) -> dict:
    """Create the boto3 clients of the checks, with short timeouts and few retries.

    Clients are created here, in one thread, because creating clients from one boto3
    session in several threads at once is not safe; using them from threads is.

    Args:
        region: AWS region name.
        timeout_s: Read timeout of each call, in seconds.
        session: A ``boto3.session.Session``; a new default one when ``None``.

    Returns:
        Clients by service name: ``sts``, ``ec2``, ``ssm``, ``service-quotas``, ``iam``
        and ``s3``.
    """
    import boto3

    from mgutil.aws.clients import make_client

    session = session if session is not None else boto3.session.Session()
    return {
        service: make_client(
            service,
            region,
            session=session,
            connect_timeout=CHECK_CONNECT_TIMEOUT_S,
            read_timeout=max(1, int(timeout_s)),
            retries={"mode": "standard", "total_max_attempts": CHECK_MAX_ATTEMPTS},
        )
        for service in SERVICES
    }


def _unexpected_row(check: str, error: BaseException) -> CheckResult:
    """Turn an unexpected exception into a ``fail`` row with the error text and a hint."""
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

    text = " ".join(f"{type(error).__name__}: {error}".split())[:500]
    if is_credentials_error(error):
        fix = CREDENTIALS_FIX
    elif is_access_denied(error):
        operation = getattr(error, "operation_name", "this operation")
        fix = f"allow {operation} ({error_code(error)}) in the IAM policy of the user or role you run as"
    elif isinstance(error, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
        fix = "check the network connection, a proxy, and that AWS_REGION is a real region"
    else:
        fix = "unexpected error: read the text, fix its cause, and run the check again"
    return CheckResult(check, FAIL, text, fix)


def _as_rows(value: CheckResult | list[CheckResult]) -> list[CheckResult]:
    return list(value) if isinstance(value, list | tuple) else [value]


def run_guarded(
    tasks: Mapping[tuple[str, ...], Callable[[], CheckResult | list[CheckResult]]],
    timeout_s: float,
) -> list[CheckResult]:
    """Run each task in its own thread and wait at most ``timeout_s`` seconds for all.

    Args:
        tasks: Callables keyed by the names of the rows each one returns; the names
            label the ``fail`` rows of a task that raises or runs past the deadline.
        timeout_s: Deadline in seconds, counted from the start of all tasks.

    Returns:
        The rows of every task, in the order of ``tasks``.
    """
    if not tasks:
        return []
    executor = ThreadPoolExecutor(max_workers=len(tasks), thread_name_prefix="readiness")
    started = time.monotonic()
    try:
        futures = {names: executor.submit(task) for names, task in tasks.items()}
        rows: list[CheckResult] = []
        for names, future in futures.items():
            remaining = max(0.0, started + timeout_s - time.monotonic())
            try:
                rows.extend(_as_rows(future.result(timeout=remaining)))
            except FutureTimeoutError:
                logger.warning("check %s ran past %s s", ", ".join(names), timeout_s)
                rows.extend(
                    CheckResult(
                        name,
                        FAIL,
                        f"no answer within {timeout_s:g} s",
                        "check the network connection and the AWS service health for the "
                        "region, then run the check again",
                    )
                    for name in names
                )
            except Exception as error:
                logger.warning("check %s raised %r", ", ".join(names), error, exc_info=True)
                rows.extend(_unexpected_row(name, error) for name in names)
        return rows
    finally:
        # A thread past its deadline is left to end on its client's read timeout; the
        # table does not wait for it.
        executor.shutdown(wait=False, cancel_futures=True)


def run_readiness_checks(
    settings: Settings | None = None,
    *,
    overrides: Mapping[str, object] | None = None,
    clients: Mapping[str, object] | None = None,
    prompts_path: str | Path = "prompts.txt",
    repo_root: str | Path = PROJECT_ROOT,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[CheckResult]:
    """Run every readiness check and return one row per check.

    The configuration is checked first, then the credentials; the other checks run in
    parallel. When the configuration or the credentials fail, the checks that need
    them get a ``warn`` row saying they were not run.

    Args:
        settings: Validated settings; loaded from the environment and ``.env`` (with
            ``overrides`` applied) when ``None``.
        overrides: Settings fields to replace when loading, such as notebook parameters;
            ``None`` values keep the configured value. Ignored when ``settings`` is given.
        clients: boto3 clients by service name (see :func:`make_readiness_clients`);
            the missing ones are created with short timeouts.
        prompts_path: The job file, relative to the project root or absolute.
        repo_root: The git checkout that the instance's bootstrap clones.
        timeout_s: Deadline of each stage of checks, in seconds.

    Returns:
        The rows in table order.
    """
    if settings is None:
        configuration, settings = check_configuration(overrides)
    else:
        configuration = CheckResult(CONFIGURATION, PASS, "settings passed in by the caller")
    rows = [configuration]
    if settings is None:
        reason = "not run: the configuration is invalid"
        names = (CREDENTIALS, *AWS_CHECKS, *OUTPUT_CHECKS, "Job file", "Source for the bootstrap")
        return rows + [
            CheckResult(name, WARN, reason, "fix the Configuration row") for name in names
        ]

    started = time.monotonic()
    all_clients = dict(clients or {})
    missing = [service for service in SERVICES if service not in all_clients]
    if missing:
        defaults = make_readiness_clients(settings.region, timeout_s)
        all_clients.update({service: defaults[service] for service in missing})

    # Local checks need no credentials; they run alongside the credentials check.
    first = run_guarded(
        {
            (CREDENTIALS,): lambda: check_credentials(all_clients["sts"]),
            ("AMI",): lambda: check_ami(all_clients["ec2"], all_clients["ssm"], settings),
            ("Job file",): lambda: check_job_file(prompts_path, settings),
            ("Source for the bootstrap",): lambda: check_source(settings, repo_root),
        },
        timeout_s,
    )
    by_name = {row.check: row for row in first}
    credentials, ami = by_name[CREDENTIALS], by_name["AMI"]
    rows.append(credentials)
    remote_names = (*AWS_CHECKS, *OUTPUT_CHECKS)
    if credentials.failed:
        reason = "not run: no working AWS credentials"
        rows.extend(
            CheckResult(name, WARN, reason, "fix the AWS credentials row") for name in remote_names
        )
    else:
        ec2 = all_clients["ec2"]
        image_id = ami.details.get("image_id")
        second = run_guarded(
            {
                ("EC2 permissions",): lambda: check_ec2_permissions(ec2, settings, image_id),
                ("Instance type",): lambda: check_instance_type(ec2, settings),
                ("Spot price",): lambda: check_spot_price(ec2, settings),
                ("Spot vCPU quota",): lambda: check_spot_quota(
                    all_clients["service-quotas"], ec2, settings
                ),
                ("IAM instance profile",): lambda: check_instance_profile(
                    all_clients["iam"], settings
                ),
                OUTPUT_CHECKS: lambda: check_output(all_clients["s3"], settings),
            },
            timeout_s,
        )
        order = {name: index for index, name in enumerate(remote_names)}
        # With a local output folder, its row takes the place of the S3 write probe.
        order["Output folder"] = order["S3 write probe"]
        rows.append(ami)
        rows.extend(sorted(second, key=lambda row: order.get(row.check, len(order))))
    rows.extend(by_name[name] for name in ("Job file", "Source for the bootstrap"))
    logger.info(
        "readiness: %d checks in %.1f s, %d failed",
        len(rows),
        time.monotonic() - started,
        sum(row.failed for row in rows),
    )
    return rows


def results_table(results: list[CheckResult]) -> pd.DataFrame:
    """Return the rows as a table with columns check, status, found and fix."""
    return pd.DataFrame(
        [[row.check, row.status, row.found, row.fix] for row in results], columns=TABLE_COLUMNS
    )


def summary_line(results: list[CheckResult]) -> str:
    """Return ``"ready to launch"`` or ``"N checks failed: ..."``, with the warning count."""
    failed = [row.check for row in results if row.status == FAIL]
    warnings = sum(row.status == WARN for row in results)
    note = f" ({warnings} warning{'s' if warnings != 1 else ''})" if warnings else ""
    if failed:
        plural = "check" if len(failed) == 1 else "checks"
        return f"{len(failed)} {plural} failed: {', '.join(failed)}{note}"
    return f"ready to launch{note}"


def raise_for_failures(results: list[CheckResult]) -> None:
    """Raise :class:`ReadinessError` listing every failed row, if there is one."""
    failures = [row for row in results if row.status == FAIL]
    if failures:
        raise ReadinessError(failures)
