"""One worker's hold on its songs: claims, checkpoints of songs in progress, and their cost.

The worker calls :class:`SongCoordinator` for each song right before the song enters
generation. The coordinator claims it (``claims/<key>``, see :mod:`mgutil.claims`), so
no other worker generates it meanwhile, and keeps the claim renewed in a background
thread. A song that another worker has claimed, or has stored since the run started, is
skipped. A claimed song with a checkpoint (``partial/<stem>.npz``, see
:mod:`mgutil.checkpoints`) continues from it, and its generation time and attempts so far
count toward its record.

While a song is generated, the coordinator saves a checkpoint after a window when
``checkpoint_every_s`` seconds have passed since the song's last one, and at once when
the worker stops early (a spot interruption notice). Once the song is stored, the
checkpoint is deleted and the claim released.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from mgutil.checkpoints import Checkpoint, delete_checkpoint, load_checkpoint, save_checkpoint
from mgutil.claims import (
    DEFAULT_TTL_S,
    Claim,
    ClaimKeeper,
    read_claim,
    release_claim,
    try_claim,
)
from mgutil.errors import StorageError
from mgutil.jobs import Job
from mgutil.storage import Store

logger = logging.getLogger(__name__)

# Seconds of generation between two checkpoints of one song. A checkpoint of a long song
# is large (4 bytes per sample and channel: 7.7 MB per minute of mono audio at 32 kHz),
# so it is not saved after every window.
DEFAULT_CHECKPOINT_EVERY_S = 60.0
# Renewals per time to live: a claim survives two failed renewals in a row.
_RENEWALS_PER_TTL = 3


@dataclass
class SongState:
    """A song this worker has claimed.

    Attributes:
        job: The song's job.
        keeper: Renews the song's claim in the background.
        prior_generation_s: Generation seconds of earlier attempts, from the checkpoint.
        prior_attempts: Attempts before this one, from the checkpoint.
        resumed_windows: Windows the checkpoint held when this attempt started.
        resume_audio: ``(channels, samples)`` audio of those windows, or ``None`` for a
            song that starts afresh.
        latest: The song so far after this attempt's latest window, not yet saved as a
            checkpoint, or ``None``.
        saved_at: ``time.monotonic()`` of the song's claim or latest checkpoint.
    """

    job: Job
    keeper: ClaimKeeper
    prior_generation_s: float = 0.0
    prior_attempts: int = 0
    resumed_windows: int = 0
    resume_audio: np.ndarray | None = None
    latest: Checkpoint | None = None
    saved_at: float = field(default_factory=time.monotonic)

    @property
    def attempts(self) -> int:
        """Attempts at the song, this one included."""
        return self.prior_attempts + 1


class SongCoordinator:
    """Claims, checkpoints and time accounting of the songs of one worker's run.

    Args:
        store: The output store shared by all workers.
        worker_id: Id of this worker, written into its claims and records.
        sampling_rate: Samples per second of the model's audio, for checkpoints; set it
            once the model is loaded.
        claim_ttl_s: Seconds a claim lasts without renewal; a dead worker's songs wait
            this long before another worker takes them over.
        checkpoint_every_s: Seconds of generation between two checkpoints of one song;
            0 saves one after every window.
    """

    def __init__(
        self,
        store: Store,
        worker_id: str,
        sampling_rate: int | None = None,
        claim_ttl_s: float = DEFAULT_TTL_S,
        checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S,
    ):
        if not claim_ttl_s > 0:
            raise ValueError(f"claim_ttl_s={claim_ttl_s!r} is invalid: expected seconds > 0")
        if not checkpoint_every_s >= 0:
            raise ValueError(
                f"checkpoint_every_s={checkpoint_every_s!r} is invalid: expected seconds >= 0"
            )
        self.store = store
        self.worker_id = worker_id
        self.sampling_rate = sampling_rate
        self.claim_ttl_s = claim_ttl_s
        self.checkpoint_every_s = checkpoint_every_s
        self.songs: dict[str, SongState] = {}
        # Songs skipped because another worker had claimed them, or had stored them.
        self.claimed_elsewhere: list[str] = []
        self.stored_elsewhere: list[str] = []
        self.checkpoints_saved = 0

    # --- claims ---------------------------------------------------------------------

    def claim(self, job: Job) -> SongState | None:
        """Claim ``job``'s song for this worker and load its checkpoint.

        Returns:
            The song's state, or ``None`` when another worker holds a valid claim on it
            or has already stored it.

        Raises:
            StorageError: The store could not be read or written.
        """
        key = job.output_name
        claim = try_claim(self.store, key, self.worker_id, self.claim_ttl_s)
        if claim is None:
            self.claimed_elsewhere.append(key)
            return None
        # The previous holder may have stored the song and released its claim after
        # this run planned, so the claim alone does not prove the song is missing.
        if self.store.exists(key):
            logger.info("skip %s: another worker stored it", key)
            release_claim(self.store, claim)
            self.stored_elsewhere.append(key)
            return None
        keeper = ClaimKeeper(
            self.store, claim, self.claim_ttl_s, self.claim_ttl_s / _RENEWALS_PER_TTL
        ).start()
        state = SongState(job, keeper)
        try:
            checkpoint = load_checkpoint(self.store, key, job.job_hash)
        except StorageError as error:
            logger.warning("cannot read the checkpoint of %s, starting it over: %s", key, error)
            checkpoint = None
        if checkpoint is not None:
            if self.sampling_rate is not None and checkpoint.sampling_rate != self.sampling_rate:
                logger.warning(
                    "ignoring the checkpoint of %s: %d Hz, the model makes %d Hz",
                    key,
                    checkpoint.sampling_rate,
                    self.sampling_rate,
                )
            else:
                state.prior_generation_s = checkpoint.generation_s
                state.prior_attempts = checkpoint.attempts
                state.resumed_windows = checkpoint.windows_done
                state.resume_audio = checkpoint.audio
        self.songs[key] = state
        return state

    def lost(self, key: str) -> bool:
        """Return whether another worker took over the claim on ``key`` meanwhile."""
        state = self.songs.get(key)
        return state is not None and state.keeper.lost.is_set()

    def release(self, key: str) -> None:
        """Stop renewing the claim on ``key`` and remove it; a storage error is logged."""
        state = self.songs.pop(key, None)
        if state is None:
            return
        claim = state.keeper.stop()
        if state.keeper.lost.is_set():
            return
        try:
            release_claim(self.store, claim)
        except StorageError as error:
            logger.warning(
                "could not release the claim on %s; it expires in %.0f s: %s",
                key,
                max(claim.expires_at - time.time(), 0.0),
                error,
            )

    def drop(self, key: str) -> None:
        """Forget ``key`` without releasing its claim, which another worker now holds."""
        state = self.songs.pop(key, None)
        if state is not None:
            state.keeper.stop()

    def holder(self, key: str) -> str:
        """Return the id of the worker that holds the claim on ``key``, for logs."""
        try:
            claim: Claim | None = read_claim(self.store, key)
        except StorageError:
            return "unknown"
        return claim.worker_id if claim is not None else "nobody"

    # --- checkpoints ----------------------------------------------------------------

    def progress(
        self,
        key: str,
        audio: np.ndarray,
        windows_done: int,
        frames_done: int,
        generation_s: float,
    ) -> None:
        """Note a song's progress after a window; save a checkpoint when one is due.

        Args:
            key: Output key of the song.
            audio: ``(channels, samples)`` audio of the song so far.
            windows_done: Windows generated so far, earlier attempts included.
            frames_done: Codec frames generated so far.
            generation_s: This attempt's generation seconds for the song so far.
        """
        state = self.songs.get(key)
        if state is None:
            return
        state.latest = Checkpoint(
            job_hash=state.job.job_hash,
            audio=audio,
            sampling_rate=self.sampling_rate,
            windows_done=windows_done,
            frames_done=frames_done,
            generation_s=state.prior_generation_s + generation_s,
            attempts=state.attempts,
        )
        if time.monotonic() - state.saved_at >= self.checkpoint_every_s:
            self._save(state)

    def _save(self, state: SongState) -> bool:
        checkpoint = state.latest
        if checkpoint is None:
            return True
        try:
            save_checkpoint(self.store, state.job.output_name, checkpoint)
        except StorageError as error:
            # Only time is lost: the song restarts from an older checkpoint or from scratch.
            logger.warning("could not save the checkpoint of %s: %s", state.job.output_name, error)
            return False
        state.latest = None
        state.saved_at = time.monotonic()
        self.checkpoints_saved += 1
        return True

    def save_in_progress(self) -> list[str]:
        """Save a checkpoint of every song in progress and release its claim.

        Called when the worker stops early, so another worker continues each song at
        once instead of waiting for the claims to expire.

        Returns:
            The output keys of the songs handed on.
        """
        handed_on = []
        for key in list(self.songs):
            state = self.songs[key]
            if state.keeper.lost.is_set():
                self.drop(key)
                continue
            saved = self._save(state)
            if saved:
                logger.info("handed on %s: checkpoint stored, claim released", key)
            else:
                logger.warning("handed on %s without its latest windows", key)
            self.release(key)
            handed_on.append(key)
        return handed_on

    def finish(self, key: str) -> None:
        """Delete the checkpoint of a stored song and release its claim."""
        try:
            delete_checkpoint(self.store, key)
        except StorageError as error:
            logger.warning("could not delete the checkpoint of %s: %s", key, error)
        self.release(key)
