"""Claims on a local folder, moto and SeaweedFS: one winner per song, expiry, renewal."""

from __future__ import annotations

import threading

import pytest

from mgutil.claims import (
    CLAIM_CONTENT_TYPE,
    ClaimKeeper,
    claim_key,
    read_claim,
    release_claim,
    renew_claim,
    try_claim,
)
from mgutil.errors import ClaimLostError

SONG = "song-1a2b3c4d.wav"
# Seconds a wait for a background thread may take before the test fails.
WAIT_S = 20.0


def _race(store, workers: int, now: float) -> list:
    """Let ``workers`` threads call try_claim on SONG at once; return each result."""
    barrier = threading.Barrier(workers, timeout=WAIT_S)
    results: list = [None] * workers
    errors: list = []

    def attempt(index: int) -> None:
        try:
            barrier.wait()
            results[index] = try_claim(store, SONG, f"worker-{index}", 60.0, now=now)
        except Exception as error:  # reported below, so no failure goes unnoticed
            errors.append(error)

    threads = [threading.Thread(target=attempt, args=(index,)) for index in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_S)
    assert not errors
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_first_claim_wins(any_store):
    first = try_claim(any_store, SONG, "worker-a", 60.0, now=1000.0)
    assert first is not None
    assert first.worker_id == "worker-a"
    assert first.expires_at == 1060.0
    assert try_claim(any_store, SONG, "worker-b", 60.0, now=1010.0) is None
    stored = read_claim(any_store, SONG)
    assert stored.worker_id == "worker-a"
    assert stored.token == first.token
    assert any_store.list_keys("claims/") == [claim_key(SONG)]


def test_racing_threads_one_winner(any_store):
    results = _race(any_store, workers=6, now=1000.0)
    winners = [claim for claim in results if claim is not None]
    assert len(winners) == 1
    assert read_claim(any_store, SONG).worker_id == winners[0].worker_id


def test_racing_takeover_one_winner(any_store):
    assert try_claim(any_store, SONG, "dead-worker", 60.0, now=1000.0) is not None
    # Long after the dead worker's claim expired, six workers find it at once.
    results = _race(any_store, workers=6, now=5000.0)
    winners = [claim for claim in results if claim is not None]
    assert len(winners) == 1
    assert read_claim(any_store, SONG).worker_id == winners[0].worker_id


def test_expired_claim_taken_over(any_store):
    old = try_claim(any_store, SONG, "worker-a", 60.0, now=1000.0)
    assert try_claim(any_store, SONG, "worker-b", 60.0, now=1059.0) is None
    new = try_claim(any_store, SONG, "worker-b", 60.0, now=1061.0)
    assert new is not None
    assert new.worker_id == "worker-b"
    assert read_claim(any_store, SONG).worker_id == "worker-b"
    # The old holder learns that it lost the claim, and cannot remove the new one.
    with pytest.raises(ClaimLostError, match="worker-b"):
        renew_claim(any_store, old, 60.0, now=1062.0)
    assert release_claim(any_store, old) is False
    assert read_claim(any_store, SONG).worker_id == "worker-b"


def test_renewal_extends_claim(any_store):
    claim = try_claim(any_store, SONG, "worker-a", 60.0, now=1000.0)
    renewed = renew_claim(any_store, claim, 60.0, now=1050.0)
    assert renewed.expires_at == 1110.0
    assert renewed.version != claim.version
    # Past the first expiry but before the renewed one, no other worker can take it.
    assert try_claim(any_store, SONG, "worker-b", 60.0, now=1070.0) is None
    # A second renewal works from the renewed version.
    assert renew_claim(any_store, renewed, 60.0, now=1100.0).expires_at == 1160.0


def test_release_frees_song(any_store):
    claim = try_claim(any_store, SONG, "worker-a", 60.0, now=1000.0)
    assert release_claim(any_store, claim) is True
    assert read_claim(any_store, SONG) is None
    assert release_claim(any_store, claim) is False
    assert try_claim(any_store, SONG, "worker-b", 60.0, now=1001.0).worker_id == "worker-b"


def test_invalid_claim_taken_over(any_store):
    any_store.put_bytes(b"not json", claim_key(SONG), CLAIM_CONTENT_TYPE)
    claim = try_claim(any_store, SONG, "worker-b", 60.0, now=1000.0)
    assert claim is not None
    assert read_claim(any_store, SONG).worker_id == "worker-b"


def test_ttl_must_be_positive(tmp_path):
    from mgutil.storage import LocalStore

    with pytest.raises(ValueError, match="ttl_s"):
        try_claim(LocalStore(tmp_path), SONG, "worker-a", 0.0)


def test_keeper_renews_then_sees_loss(any_store):
    claim = try_claim(any_store, SONG, "worker-a", 30.0)
    keeper = ClaimKeeper(any_store, claim, ttl_s=30.0, interval_s=0.05)
    with keeper:
        # Wait, bounded, for two renewals.
        for _ in range(400):
            if keeper.renewals >= 2:
                break
            threading.Event().wait(0.05)
        assert keeper.renewals >= 2
        assert read_claim(any_store, SONG).expires_at == keeper.claim.expires_at
        # Another worker overwrites the claim: the next renewal must notice.
        any_store.put_bytes(
            b'{"key": "%s", "worker_id": "worker-b", "expires_at": 1e12, "token": "t"}'
            % SONG.encode(),
            claim_key(SONG),
            CLAIM_CONTENT_TYPE,
        )
        assert keeper.lost.wait(WAIT_S)
    assert read_claim(any_store, SONG).worker_id == "worker-b"


def test_keeper_stop_without_start(tmp_path):
    from mgutil.storage import LocalStore

    store = LocalStore(tmp_path)
    claim = try_claim(store, SONG, "worker-a", 10.0)
    keeper = ClaimKeeper(store, claim, ttl_s=10.0, interval_s=1.0)
    assert keeper.stop() == claim
    assert keeper.renewals == 0
    assert release_claim(store, keeper.stop()) is True


def test_keeper_rejects_slow_interval(tmp_path):
    from mgutil.storage import LocalStore

    claim = try_claim(LocalStore(tmp_path), SONG, "worker-a", 10.0)
    with pytest.raises(ValueError, match="interval_s"):
        ClaimKeeper(LocalStore(tmp_path), claim, ttl_s=10.0, interval_s=10.0)
