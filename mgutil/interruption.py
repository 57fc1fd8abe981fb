"""Watch the instance metadata service for a spot interruption notice.

The worker starts the watcher with :func:`watcher_from_environment` at the start of a
run and checks ``interrupted`` before each batch of windows. On a notice it starts no new
window, checkpoints the songs in progress, releases their claims, writes the records and
the reports, and returns; a bootstrapped worker then uploads its log and notebook.

EC2 announces that it will take a spot instance back about two minutes ahead at
``/latest/meta-data/spot/instance-action`` (404 until then, then JSON such as
``{"action": "terminate", "time": "2026-01-01T12:00:00Z"}``), and recommends moving work
off an instance at risk at ``/latest/meta-data/events/recommendations/rebalance``
(``{"noticeTime": ...}``). The watcher polls both every few seconds in a daemon thread.

The watcher runs only when the bootstrap started the worker on EC2 and set
``MUSICGEN_EC2_WORKER=1``. Anywhere else :func:`watcher_from_environment` returns
``None`` and nothing is sent to the metadata address.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from mgutil.instance import EC2_WORKER_VARIABLE, ENDPOINT_VARIABLE, MetadataClient, MetadataError

logger = logging.getLogger(__name__)

INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
# Seconds between two polls. EC2 gives two minutes' notice; a 5 s poll leaves almost all
# of it to the worker.
DEFAULT_INTERVAL_S = 5.0
# Seconds of notice EC2 gives before it acts, assumed when the notice has no valid time.
NOTICE_LEAD_S = 120.0


def _parse_time(text: object) -> datetime | None:
    """Return the UTC time in an ISO 8601 string such as ``2026-01-01T12:00:00Z``."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _parse_json(text: str) -> dict:
    try:
        body = json.loads(text)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


@dataclass(frozen=True)
class InterruptionNotice:
    """A spot interruption notice.

    Attributes:
        action: What EC2 will do: ``terminate``, ``stop`` or ``hibernate`` (``unknown``
            when the notice cannot be read).
        action_time: UTC time at which EC2 acts; two minutes after ``received_at`` when
            the notice has no valid time.
        received_at: UTC time at which the watcher read the notice.
        raw: The notice as the service returned it, for the log.
    """

    action: str
    action_time: datetime
    received_at: datetime
    raw: str

    @classmethod
    def parse(cls, text: str, received_at: datetime) -> InterruptionNotice:
        """Build a notice from the body of ``spot/instance-action``; an unreadable body still counts."""
        body = _parse_json(text)
        action = body.get("action") if isinstance(body.get("action"), str) else "unknown"
        action_time = _parse_time(body.get("time"))
        if action_time is None:
            action_time = received_at + timedelta(seconds=NOTICE_LEAD_S)
        return cls(action, action_time, received_at, text)

    def seconds_left(self, now: datetime | None = None) -> float:
        """Return the seconds from ``now`` (default: the clock) to the action, at least 0."""
        now = now if now is not None else datetime.now(UTC)
        return max((self.action_time - now).total_seconds(), 0.0)


@dataclass(frozen=True)
class RebalanceRecommendation:
    """A rebalance recommendation: EC2 rates the risk of interruption as raised.

    Attributes:
        notice_time: UTC time of the recommendation, or ``None`` when it cannot be read.
        raw: The recommendation as the service returned it.
    """

    notice_time: datetime | None
    raw: str


class InterruptionWatcher:
    """Poll the metadata service in a daemon thread until a spot interruption notice.

    Args:
        client: The IMDSv2 client; one for ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` when
            ``None``.
        interval_s: Seconds between two polls.

    Attributes:
        interrupted: Set once an interruption notice has been read.
        rebalance_recommended: Set once a rebalance recommendation has been read.
        notice: The interruption notice, or ``None`` before one arrives.
        rebalance: The rebalance recommendation, or ``None`` before one arrives.
        polls: Number of completed polls, for tests and logs.
        failures: Number of polls that failed because the service did not respond.
    """

    def __init__(
        self, client: MetadataClient | None = None, interval_s: float = DEFAULT_INTERVAL_S
    ):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r} seconds")
        self.client = client if client is not None else MetadataClient()
        self.interval_s = interval_s
        self.interrupted = threading.Event()
        self.rebalance_recommended = threading.Event()
        self.notice: InterruptionNotice | None = None
        self.rebalance: RebalanceRecommendation | None = None
        self.polls = 0
        self.failures = 0
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="interruption-watcher", daemon=True)

    def poll_once(self) -> None:
        """Read both paths once and record what they announce.

        Raises:
            MetadataError: The service did not respond or rejected a request.
        """
        if not self.rebalance_recommended.is_set():
            text = self.client.get(REBALANCE_PATH)
            if text is not None:
                self.rebalance = RebalanceRecommendation(
                    _parse_time(_parse_json(text).get("noticeTime")), text
                )
                logger.warning(
                    "EC2 recommends a rebalance: the spot instance is at risk (%s)", text
                )
                self.rebalance_recommended.set()
        text = self.client.get(INSTANCE_ACTION_PATH)
        if text is not None:
            notice = InterruptionNotice.parse(text, datetime.now(UTC))
            self.notice = notice
            logger.warning(
                "spot interruption notice: %s at %s, %.0f s left (%s)",
                notice.action,
                notice.action_time.isoformat(),
                notice.seconds_left(notice.received_at),
                text,
            )
            self.interrupted.set()
        self.polls += 1

    def _run(self) -> None:
        logger.info(
            "watching %s for spot interruption notices every %.1f s",
            self.client.endpoint,
            self.interval_s,
        )
        while not self._stop.is_set() and not self.interrupted.is_set():
            try:
                self.poll_once()
                if self._failing:
                    logger.info("the metadata service responds again")
                    self._failing = False
            except MetadataError as error:
                self.failures += 1
                # Logged once per streak of failures, so a flaky service does not flood
                # the log. The watcher keeps polling.
                if not self._failing:
                    logger.warning("polling for spot interruption notices failed: %s", error)
                    self._failing = True
            self._stop.wait(self.interval_s)

    def start(self) -> InterruptionWatcher:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop polling; wait up to ``timeout_s`` seconds for the thread to end."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def __enter__(self) -> InterruptionWatcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def watcher_from_environment(
    environ: Mapping[str, str] | None = None, interval_s: float = DEFAULT_INTERVAL_S
) -> InterruptionWatcher | None:
    """Return a started watcher when the bootstrap started this worker on EC2, else ``None``.

    Only ``MUSICGEN_EC2_WORKER=1`` leads to a request; the endpoint comes from
    ``AWS_EC2_METADATA_SERVICE_ENDPOINT``.
    """
    environ = environ if environ is not None else os.environ
    if environ.get(EC2_WORKER_VARIABLE, "") != "1":
        logger.debug("not an EC2 worker: no spot interruption watcher")
        return None
    client = MetadataClient(environ.get(ENDPOINT_VARIABLE))
    return InterruptionWatcher(client, interval_s).start()
