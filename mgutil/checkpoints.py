"""Checkpoints of songs in progress, so that a new worker continues a song, not restarts it.

The worker (through :class:`mgutil.coordination.SongCoordinator`) saves the song so far
with :func:`save_checkpoint` after a window once ``checkpoint_every_s`` seconds have
passed since the last save, and at once on a spot interruption notice. Before generating
a song it calls :func:`load_checkpoint` and continues from ``windows_done``. Once the song
is stored it calls :func:`delete_checkpoint`. The song's record then counts
``generation_s`` of the checkpoint plus the time of the last attempt.

A checkpoint is one ``.npz`` file at ``partial/<output stem>.npz`` in the output store,
written in one piece (a renamed temporary file locally, a single PUT on S3), so a
reader finds either the previous checkpoint or the new one. It contains no pickled objects.
"""

from __future__ import annotations

import io
import logging
import posixpath
import zipfile
from dataclasses import dataclass

import numpy as np

from mgutil.storage import Store

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "partial/"
CHECKPOINT_CONTENT_TYPE = "application/octet-stream"
# Version of the file layout; a checkpoint of another version is ignored.
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A song in progress.

    Attributes:
        job_hash: Hash of the job (prompt, duration, model and settings), so that a
            checkpoint is never continued with other settings.
        audio: ``(channels, samples)`` float32 audio generated so far.
        sampling_rate: Samples per second of ``audio``.
        windows_done: Number of windows generated so far.
        frames_done: Number of codec frames generated so far.
        generation_s: Generation seconds of every attempt so far, for the song's cost.
        attempts: Number of worker attempts that contributed to the song.
    """

    job_hash: str
    audio: np.ndarray
    sampling_rate: int
    windows_done: int
    frames_done: int
    generation_s: float
    attempts: int = 1

    def __post_init__(self):
        self.audio = np.asarray(self.audio, dtype=np.float32)
        if self.audio.ndim != 2:
            raise ValueError(
                f"checkpoint audio must be (channels, samples), got shape {self.audio.shape}"
            )
        for name in ("sampling_rate", "windows_done", "frames_done", "attempts"):
            if int(getattr(self, name)) < 0:
                raise ValueError(
                    f"checkpoint {name} must not be negative, got {getattr(self, name)}"
                )
        if not self.generation_s >= 0:
            raise ValueError(f"checkpoint generation_s must be >= 0 s, got {self.generation_s}")

    @property
    def duration_s(self) -> float:
        """Seconds of audio generated so far."""
        return self.audio.shape[1] / self.sampling_rate if self.sampling_rate else 0.0


def checkpoint_key(output_key: str) -> str:
    """Return the store key of the checkpoint of ``output_key``: ``partial/<stem>.npz``."""
    stem, _ = posixpath.splitext(output_key)
    return f"{CHECKPOINT_PREFIX}{stem}.npz"


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    """Return ``checkpoint`` as the bytes of an ``.npz`` file."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        format_version=np.int64(FORMAT_VERSION),
        job_hash=np.array(checkpoint.job_hash),
        audio=checkpoint.audio,
        sampling_rate=np.int64(checkpoint.sampling_rate),
        windows_done=np.int64(checkpoint.windows_done),
        frames_done=np.int64(checkpoint.frames_done),
        generation_s=np.float64(checkpoint.generation_s),
        attempts=np.int64(checkpoint.attempts),
    )
    return buffer.getvalue()


def decode_checkpoint(data: bytes) -> Checkpoint:
    """Return the checkpoint in the bytes of an ``.npz`` file.

    Raises:
        ValueError: The bytes are not a checkpoint of this format version.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            version = int(arrays["format_version"])
            if version != FORMAT_VERSION:
                raise ValueError(f"format version {version}, expected {FORMAT_VERSION}")
            return Checkpoint(
                job_hash=str(arrays["job_hash"]),
                audio=arrays["audio"],
                sampling_rate=int(arrays["sampling_rate"]),
                windows_done=int(arrays["windows_done"]),
                frames_done=int(arrays["frames_done"]),
                generation_s=float(arrays["generation_s"]),
                attempts=int(arrays["attempts"]),
            )
    except (OSError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"not a checkpoint file: {error}") from error


def save_checkpoint(store: Store, output_key: str, checkpoint: Checkpoint) -> None:
    """Store ``checkpoint`` for the song ``output_key``, replacing any earlier one.

    Raises:
        StorageError: The store could not be written.
    """
    key = checkpoint_key(output_key)
    data = encode_checkpoint(checkpoint)
    store.put_bytes(data, key, CHECKPOINT_CONTENT_TYPE)
    logger.info(
        "saved checkpoint %s: %d windows, %.1f s of audio, %.1f s of generation (%d bytes)",
        store.location_of(key),
        checkpoint.windows_done,
        checkpoint.duration_s,
        checkpoint.generation_s,
        len(data),
    )


def load_checkpoint(store: Store, output_key: str, job_hash: str) -> Checkpoint | None:
    """Return the checkpoint of the song ``output_key``, or ``None`` to start it afresh.

    A checkpoint of another job hash, or one that cannot be read, is logged and ignored
    (and replaced by the next save), since starting over loses time but no song.

    Raises:
        StorageError: The store could not be read.
    """
    key = checkpoint_key(output_key)
    stored = store.get_versioned(key)
    if stored is None:
        return None
    try:
        checkpoint = decode_checkpoint(stored.data)
    except ValueError as error:
        logger.warning("ignoring invalid checkpoint %s: %s", store.location_of(key), error)
        return None
    if checkpoint.job_hash != job_hash:
        logger.warning(
            "ignoring checkpoint %s of job %s: the job is now %s",
            store.location_of(key),
            checkpoint.job_hash,
            job_hash,
        )
        return None
    if not np.isfinite(checkpoint.audio).all():
        logger.warning("ignoring checkpoint %s: its audio is not finite", store.location_of(key))
        return None
    logger.info(
        "resuming %s from checkpoint: %d windows, %.1f s of audio, %.1f s of generation",
        output_key,
        checkpoint.windows_done,
        checkpoint.duration_s,
        checkpoint.generation_s,
    )
    return checkpoint


def delete_checkpoint(store: Store, output_key: str) -> None:
    """Remove the checkpoint of the song ``output_key``; a missing one is not an error."""
    store.delete(checkpoint_key(output_key))
