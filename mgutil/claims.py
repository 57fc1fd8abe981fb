"""Claims: which worker generates which song, when several share one job file and output.

The worker claims each song right before it enters generation (through
:class:`mgutil.coordination.SongCoordinator`), renews the claim with a
:class:`ClaimKeeper` while the song is generated, skips songs that another worker has
claimed, and releases the claim once the song is stored.

A claim is a small JSON object at ``claims/<output key>`` in the output store. It names
the worker, a random token and an expiry time. It is created with a conditional write
that succeeds for exactly one worker (S3 ``If-None-Match: *``, or an atomic link in a
local folder). The holder renews it before it expires. A claim past its expiry belongs
to a worker that died, and any worker may take it over with a compare-and-swap on the
version it read (S3 ``If-Match`` on the ETag, or a digest compared under a file lock),
so two workers that find the same stale claim never both win.

Expiry times are Unix times from each worker's clock, so the clocks of the workers must
agree to well within the claim's time to live (EC2 instances sync with NTP).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from mgutil.errors import ClaimLostError, StorageError
from mgutil.storage import Store

logger = logging.getLogger(__name__)

CLAIM_PREFIX = "claims/"
CLAIM_CONTENT_TYPE = "application/json"
# Seconds a claim lasts without renewal. A worker that dies leaves its songs blocked for
# at most this long.
DEFAULT_TTL_S = 300.0
# Attempts to create or take over a claim when it vanishes or changes between reads.
_CLAIM_ATTEMPTS = 3


@dataclass(frozen=True)
class Claim:
    """A worker's hold on one song.

    Attributes:
        key: Output key of the song, such as ``song-1a2b3c4d.wav``.
        worker_id: Id of the worker that owns the claim.
        expires_at: Unix time in seconds after which other workers may take the claim over.
        token: Random id of this acquisition, so that two claims never have equal content.
        version: Store version of the claim object (ETag or digest), for renewal and release.
    """

    key: str
    worker_id: str
    expires_at: float
    token: str
    version: str = ""

    @property
    def claim_key(self) -> str:
        return claim_key(self.key)

    def expired(self, now: float | None = None) -> bool:
        """Return whether the claim has expired at Unix time ``now`` (default: the clock)."""
        return (time.time() if now is None else now) >= self.expires_at

    def to_json(self) -> bytes:
        body = {
            "key": self.key,
            "worker_id": self.worker_id,
            "expires_at": self.expires_at,
            "token": self.token,
        }
        return json.dumps(body, sort_keys=True).encode("utf-8")


def claim_key(output_key: str) -> str:
    """Return the store key of the claim on ``output_key``."""
    return f"{CLAIM_PREFIX}{output_key}"


def new_worker_id() -> str:
    """Return an id for this worker process: host name, process id and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _parse(output_key: str, data: bytes, version: str) -> Claim | None:
    """Return the claim stored in ``data``, or ``None`` when it cannot be read."""
    try:
        body = json.loads(data.decode("utf-8"))
        return Claim(
            key=str(body["key"]),
            worker_id=str(body["worker_id"]),
            expires_at=float(body["expires_at"]),
            token=str(body["token"]),
            version=version,
        )
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        logger.warning("invalid claim on %s (%s); it will be taken over", output_key, error)
        return None


def read_claim(store: Store, output_key: str) -> Claim | None:
    """Return the current claim on ``output_key``, or ``None`` when there is none.

    An unreadable claim object is returned as an expired claim of worker ``"?"``.
    """
    current = store.get_versioned(claim_key(output_key))
    if current is None:
        return None
    claim = _parse(output_key, current.data, current.version)
    if claim is None:
        return Claim(output_key, "?", 0.0, "", current.version)
    return claim


def try_claim(
    store: Store, output_key: str, worker_id: str, ttl_s: float, now: float | None = None
) -> Claim | None:
    """Claim the song ``output_key`` for ``worker_id``, or find that another worker has it.

    Args:
        store: The output store that all workers share.
        output_key: Output key of the song.
        worker_id: Id of the calling worker.
        ttl_s: Seconds until the claim expires unless renewed.
        now: Unix time in seconds; the clock when ``None``.

    Returns:
        The new claim, or ``None`` when another worker owns a claim that has not expired.

    Raises:
        StorageError: The store could not be read or written.
    """
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s!r} seconds")
    key = claim_key(output_key)
    for _ in range(_CLAIM_ATTEMPTS):
        moment = time.time() if now is None else now
        claim = Claim(output_key, worker_id, moment + ttl_s, uuid.uuid4().hex)
        data = claim.to_json()
        version = store.put_if_absent(key, data, CLAIM_CONTENT_TYPE)
        if version is not None:
            logger.info(
                "claimed %s as worker %s until %.0f", output_key, worker_id, claim.expires_at
            )
            return _with_version(claim, version)
        current = read_claim(store, output_key)
        if current is None:
            # Released between our write and our read: try to create it again.
            continue
        if not current.expired(moment):
            logger.info(
                "%s is claimed by worker %s for %.0f s more",
                output_key,
                current.worker_id,
                current.expires_at - moment,
            )
            return None
        version = store.replace_if_version(key, data, CLAIM_CONTENT_TYPE, current.version)
        if version is not None:
            logger.warning(
                "took over %s from worker %s, whose claim expired %.0f s ago",
                output_key,
                current.worker_id,
                moment - current.expires_at,
            )
            return _with_version(claim, version)
        # Another worker renewed or took over the claim first; read it again.
    logger.info("%s changed hands %d times while claiming; leaving it", output_key, _CLAIM_ATTEMPTS)
    return None


def _with_version(claim: Claim, version: str) -> Claim:
    return Claim(claim.key, claim.worker_id, claim.expires_at, claim.token, version)


def renew_claim(store: Store, claim: Claim, ttl_s: float, now: float | None = None) -> Claim:
    """Extend ``claim`` to ``ttl_s`` seconds from now.

    Returns:
        The renewed claim, with its new version.

    Raises:
        ClaimLostError: The claim was taken over or removed; the caller must stop work
            on the song, because another worker may be generating it.
        StorageError: The store could not be read or written.
    """
    moment = time.time() if now is None else now
    renewed = Claim(claim.key, claim.worker_id, moment + ttl_s, claim.token)
    version = store.replace_if_version(
        claim.claim_key, renewed.to_json(), CLAIM_CONTENT_TYPE, claim.version
    )
    if version is None:
        current = read_claim(store, claim.key)
        holder = current.worker_id if current is not None else "nobody"
        raise ClaimLostError(
            f"claim on {claim.key} lost by worker {claim.worker_id}: it is now held by "
            f"{holder}. Renew claims more often than their time to live ({ttl_s:.0f} s), "
            "or raise the time to live"
        )
    logger.debug("renewed claim on %s until %.0f", claim.key, renewed.expires_at)
    return _with_version(renewed, version)


def release_claim(store: Store, claim: Claim) -> bool:
    """Remove ``claim`` if it is still the caller's.

    Returns:
        ``True`` if it was removed, ``False`` when another worker had taken it over or it
        was gone (logged, since the song may then be generated twice).
    """
    if store.delete_if_version(claim.claim_key, claim.version):
        logger.info("released claim on %s", claim.key)
        return True
    logger.warning(
        "claim on %s was no longer held by worker %s when released", claim.key, claim.worker_id
    )
    return False


class ClaimKeeper:
    """Renew one claim in a background thread while its song is generated.

    Use as a context manager. ``lost`` is set when a renewal finds the claim taken over,
    and the caller should then stop work on the song. A renewal that fails with a storage
    error is logged and tried again at the next interval, because the claim lasts ``ttl_s``.

    Args:
        store: The output store.
        claim: The claim to keep, as returned by :func:`try_claim`.
        ttl_s: Seconds each renewal extends the claim to.
        interval_s: Seconds between renewals; must be shorter than ``ttl_s``.
    """

    def __init__(self, store: Store, claim: Claim, ttl_s: float, interval_s: float):
        if not 0 < interval_s < ttl_s:
            raise ValueError(
                f"interval_s ({interval_s!r} s) must be positive and shorter than ttl_s "
                f"({ttl_s!r} s), or the claim expires between renewals"
            )
        self.store = store
        self.claim = claim
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self.lost = threading.Event()
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"claim-keeper-{claim.key}", daemon=True
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.claim = renew_claim(self.store, self.claim, self.ttl_s)
                self.renewals += 1
            except ClaimLostError as error:
                logger.error("%s", error)
                self.lost.set()
                return
            except StorageError as error:
                logger.warning("renewing claim on %s failed, will retry: %s", self.claim.key, error)

    def start(self) -> ClaimKeeper:
        self._thread.start()
        return self

    def stop(self) -> Claim:
        """Stop renewing and return the latest claim, for :func:`release_claim`."""
        self._stop.set()
        if self._thread.is_alive():
            # A renewal in flight finishes first; botocore's retries bound its length.
            self._thread.join(timeout=max(self.interval_s, 1.0) + 30.0)
        return self.claim

    def __enter__(self) -> ClaimKeeper:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
