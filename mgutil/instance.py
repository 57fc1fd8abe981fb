"""Facts about the EC2 instance the worker runs on, from the instance metadata service.

The worker reads the instance id, type, availability zone and region once at the start
of a run, and only when the bootstrap script started it on EC2 and set
``MUSICGEN_EC2_WORKER=1``. Anywhere else nothing is sent to the metadata address and the
facts stay empty.

:class:`MetadataClient` speaks IMDSv2: it asks for a session token with a PUT, sends the
token with every GET, and asks for a new token when the service answers 401. It uses
short timeouts, so a machine without the service fails fast instead of stalling a run.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

# Set to "1" by the bootstrap script that starts the worker on an EC2 instance.
EC2_WORKER_VARIABLE = "MUSICGEN_EC2_WORKER"
# The variable boto3 and the AWS CLI read for the metadata endpoint; tests point it at a
# server on 127.0.0.1.
ENDPOINT_VARIABLE = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
# Seconds per request. The service answers within milliseconds on an instance.
DEFAULT_TIMEOUT_S = 2.0
# Seconds a token stays valid; a new one is requested a minute before it expires.
DEFAULT_TOKEN_TTL_S = 21600
_TOKEN_MARGIN_S = 60.0

_FACT_PATHS = {
    "instance_id": "/latest/meta-data/instance-id",
    "instance_type": "/latest/meta-data/instance-type",
    "availability_zone": "/latest/meta-data/placement/availability-zone",
    "region": "/latest/meta-data/placement/region",
}


class MetadataError(Exception):
    """The instance metadata service could not be reached or refused a request."""


class MetadataClient:
    """A small IMDSv2 client.

    Args:
        endpoint: Base URL of the service; ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` when
            ``None``, else ``http://169.254.169.254``.
        timeout_s: Seconds to wait for each request.
        token_ttl_s: Seconds each session token is requested for.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        token_ttl_s: int = DEFAULT_TOKEN_TTL_S,
    ):
        self.endpoint = (endpoint or os.environ.get(ENDPOINT_VARIABLE) or DEFAULT_ENDPOINT).rstrip(
            "/"
        )
        self.timeout_s = timeout_s
        self.token_ttl_s = token_ttl_s
        self._token: str | None = None
        self._token_expires = 0.0
        # Direct connections only: a proxy from the environment must never see these calls.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _open(self, request: urllib.request.Request) -> bytes:
        with self._opener.open(request, timeout=self.timeout_s) as response:
            return response.read()

    def token(self, refresh: bool = False) -> str:
        """Return a session token, requesting a new one when needed.

        Raises:
            MetadataError: The service did not answer or refused the token request.
        """
        if not refresh and self._token is not None and time.monotonic() < self._token_expires:
            return self._token
        request = urllib.request.Request(
            self.endpoint + TOKEN_PATH,
            method="PUT",
            headers={TOKEN_TTL_HEADER: str(self.token_ttl_s)},
        )
        try:
            token = self._open(request).decode("ascii").strip()
        except (urllib.error.URLError, OSError, UnicodeDecodeError) as error:
            raise MetadataError(
                f"no IMDSv2 token from {self.endpoint}: {error}. On EC2, check that the "
                "metadata service is enabled with a hop limit of at least 1"
            ) from error
        self._token = token
        self._token_expires = time.monotonic() + max(self.token_ttl_s - _TOKEN_MARGIN_S, 1.0)
        return token

    def get(self, path: str) -> str | None:
        """Return the text at ``path`` (such as ``/latest/meta-data/instance-id``).

        Returns:
            The text, or ``None`` when the service answers 404 (for example the spot
            interruption notice while none is scheduled).

        Raises:
            MetadataError: The service did not answer, or refused the request twice.
        """
        for attempt in range(2):
            request = urllib.request.Request(
                self.endpoint + path, headers={TOKEN_HEADER: self.token(refresh=attempt > 0)}
            )
            try:
                return self._open(request).decode("utf-8").strip()
            except urllib.error.HTTPError as error:
                if error.code == 404:
                    return None
                if error.code == 401 and attempt == 0:
                    logger.debug("metadata token rejected; requesting a new one")
                    continue
                raise MetadataError(
                    f"GET {self.endpoint}{path} failed: HTTP {error.code}"
                ) from error
            except (urllib.error.URLError, OSError, UnicodeDecodeError) as error:
                raise MetadataError(f"GET {self.endpoint}{path} failed: {error}") from error
        raise MetadataError(f"GET {self.endpoint}{path} failed: token rejected twice")


@dataclass(frozen=True)
class InstanceFacts:
    """Where the worker runs; every field is ``None`` off EC2."""

    instance_id: str | None = None
    instance_type: str | None = None
    availability_zone: str | None = None
    region: str | None = None

    @property
    def on_ec2(self) -> bool:
        return self.instance_id is not None

    def to_dict(self) -> dict:
        return asdict(self)


def read_instance_facts(client: MetadataClient | None = None) -> InstanceFacts:
    """Read the instance facts from the metadata service.

    A failure is logged and gives empty facts, since the songs matter more than their
    provenance; the cost analysis then shows estimates only.
    """
    client = client if client is not None else MetadataClient()
    values = {}
    try:
        for name, path in _FACT_PATHS.items():
            values[name] = client.get(path)
    except MetadataError as error:
        logger.warning("cannot read the instance facts, records will lack them: %s", error)
        return InstanceFacts()
    if values.get("region") is None and values.get("availability_zone"):
        # Older services lack placement/region; the zone is the region plus a letter.
        values["region"] = values["availability_zone"][:-1]
    facts = InstanceFacts(**values)
    logger.info(
        "running on EC2 instance %s (%s) in %s",
        facts.instance_id,
        facts.instance_type,
        facts.availability_zone,
    )
    return facts


def instance_facts_from_environment(environ: Mapping[str, str] | None = None) -> InstanceFacts:
    """Return the instance facts when the bootstrap started this worker on EC2, else empty ones.

    Only ``MUSICGEN_EC2_WORKER=1`` leads to a request; otherwise nothing is sent.
    """
    environ = environ if environ is not None else os.environ
    if environ.get(EC2_WORKER_VARIABLE, "") != "1":
        return InstanceFacts()
    return read_instance_facts(MetadataClient(environ.get(ENDPOINT_VARIABLE)))
