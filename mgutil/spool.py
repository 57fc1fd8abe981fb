"""A local spool of finished songs, so that a failed upload never costs a song.

The worker writes each finished song into the spool before it uploads it, together with
the song's record (a JSON sidecar). Once the song and its record are stored, the entry
is removed. An entry left behind belongs to a song whose upload failed, or to a worker
that died between generation and storage. The next run on the same machine into the
same output location finds it and uploads the file instead of generating the song again.
If the song was stored but its record was not, that run writes the record from the sidecar.

Each output location has its own folder, named by a hash of its URI:
``<root>/<16 hex digits>/``. The root is ``MUSICGEN_SPOOL_DIR`` when set, else
``musicgen-batch-spool`` in the system's temporary folder (``tempfile.gettempdir()``,
usually ``/tmp``). A spool in ``/tmp`` does not survive a reboot; set
``MUSICGEN_SPOOL_DIR`` to a persistent disk to keep it across one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SPOOL_DIR_VARIABLE = "MUSICGEN_SPOOL_DIR"
SPOOL_FOLDER_NAME = "musicgen-batch-spool"
# Prefix of files being written; entries() never returns them.
_TEMP_PREFIX = ".tmp-"
_RECORD_SUFFIX = ".record.json"


def default_spool_root() -> Path:
    """Return ``MUSICGEN_SPOOL_DIR``, else ``musicgen-batch-spool`` in the temporary folder."""
    configured = os.environ.get(SPOOL_DIR_VARIABLE, "").strip()
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / SPOOL_FOLDER_NAME


def spool_folder(store_uri: str, root: str | Path | None = None) -> Path:
    """Return the spool folder of the output location ``store_uri``."""
    root = Path(root) if root is not None else default_spool_root()
    digest = hashlib.sha256(store_uri.encode("utf-8")).hexdigest()[:16]
    return root / digest


@dataclass(frozen=True)
class SpoolEntry:
    """A finished song waiting in the spool.

    Attributes:
        key: Output key of the song, such as ``song-1a2b3c4d.wav``.
        wav_path: The song's WAV file.
        record: The song's record as a JSON object, as the worker would store it.
    """

    key: str
    wav_path: Path
    record: dict


class Spool:
    """The spool folder of one output location.

    Args:
        store_uri: URI or path of the output location, as ``Store.uri`` gives it.
        root: Folder that contains the spools of all locations; :func:`default_spool_root`
            when ``None``.
    """

    def __init__(self, store_uri: str, root: str | Path | None = None):
        self.store_uri = store_uri
        self.folder = spool_folder(store_uri, root)

    def wav_path(self, key: str) -> Path:
        return self.folder / _safe_name(key)

    def record_path(self, key: str) -> Path:
        return self.folder / f"{_safe_name(key)}{_RECORD_SUFFIX}"

    def _prepare(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # Names the location for a person who finds the folder. Written once.
        marker = self.folder / "output_uri.txt"
        if not marker.exists():
            _write_atomically(marker, self.store_uri.encode("utf-8"))

    def put(self, key: str, audio: np.ndarray, sampling_rate: int, record: dict) -> Path:
        """Write a finished song and its record into the spool; return the WAV's path.

        The WAV is written first, the record second, each to a temporary file that is
        then renamed, so an entry with a record always has a whole WAV.

        Raises:
            OSError: The spool folder cannot be written.
        """
        from mgutil.generation import write_wav

        self._prepare()
        target = self.wav_path(key)
        fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".wav", dir=self.folder)
        os.close(fd)
        try:
            write_wav(temp_name, audio, sampling_rate)
            os.replace(temp_name, target)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        self.update_record(key, record)
        logger.debug("spooled %s at %s", key, target)
        return target

    def update_record(self, key: str, record: dict) -> None:
        """Replace the record of a spooled song."""
        data = json.dumps(record, indent=2, ensure_ascii=False).encode("utf-8")
        _write_atomically(self.record_path(key), data)

    def entries(self) -> list[SpoolEntry]:
        """Return the complete entries, sorted by key; unreadable records are logged and skipped."""
        if not self.folder.is_dir():
            return []
        entries = []
        for record_path in sorted(self.folder.glob(f"*{_RECORD_SUFFIX}")):
            if record_path.name.startswith(_TEMP_PREFIX):
                continue
            wav_path = record_path.with_name(record_path.name.removesuffix(_RECORD_SUFFIX))
            try:
                record = json.loads(record_path.read_text(encoding="utf-8"))
                key = str(record["output_key"])
            except (OSError, ValueError, KeyError, TypeError) as error:
                logger.warning("skipping unreadable spool record %s: %s", record_path, error)
                continue
            if not wav_path.is_file():
                logger.warning(
                    "skipping spool record %s: its WAV %s is missing", record_path, wav_path
                )
                continue
            entries.append(SpoolEntry(key, wav_path, record))
        return entries

    def get(self, key: str) -> SpoolEntry | None:
        """Return the entry of ``key``, or ``None`` when the spool has no complete one."""
        for entry in self.entries():
            if entry.key == key:
                return entry
        return None

    def remove(self, key: str) -> None:
        """Remove the entry of ``key``, record first; a missing entry is not an error."""
        self.record_path(key).unlink(missing_ok=True)
        self.wav_path(key).unlink(missing_ok=True)


def _safe_name(key: str) -> str:
    # Output keys are flat file names; a "/" would escape the spool folder.
    if "/" in key or key in ("", ".", ".."):
        raise ValueError(f"cannot spool {key!r}: expected a plain file name such as song.wav")
    return key


def _write_atomically(path: Path, data: bytes) -> None:
    fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
