"""Factory for boto3 clients with the project's retry configuration."""

from __future__ import annotations

# Tries per call, the first included (botocore's total_max_attempts), retried by its
# standard retry mode with backoff for throttling and transient errors.
MAX_ATTEMPTS = 10
# Seconds; a call that hangs this long fails instead of stalling a notebook cell.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30


def make_client(service: str, region: str | None = None, session=None, **config_overrides):
    """Create a boto3 client for ``service``.

    Credentials, profiles and ``AWS_ENDPOINT_URL`` come from boto3's usual sources.

    Args:
        service: Service name, such as ``"ec2"`` or ``"s3"``.
        region: Region name; defaults to the session's region.
        session: A ``boto3.session.Session``; a new default one when ``None``.
        **config_overrides: Extra ``botocore.config.Config`` arguments, such as a
            shorter ``read_timeout`` or ``retries`` for a quick check.
    """
    import boto3
    from botocore.config import Config

    session = session if session is not None else boto3.session.Session()
    options = {
        "retries": {"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
        "connect_timeout": CONNECT_TIMEOUT_S,
        "read_timeout": READ_TIMEOUT_S,
    }
    options.update(config_overrides)
    return session.client(
        service, region_name=region or session.region_name, config=Config(**options)
    )
