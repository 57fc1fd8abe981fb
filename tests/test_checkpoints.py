"""Checkpoints of songs in progress on a local folder, moto and SeaweedFS."""

from __future__ import annotations

import io

import numpy as np
import pytest

from mgutil.checkpoints import (
    CHECKPOINT_CONTENT_TYPE,
    Checkpoint,
    checkpoint_key,
    decode_checkpoint,
    delete_checkpoint,
    encode_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

SONG = "calm-piano-1a2b3c4d.wav"
JOB_HASH = "1a2b3c4d"


def _checkpoint(windows: int = 2, channels: int = 2, generation_s: float = 12.5) -> Checkpoint:
    rng = np.random.default_rng(7)
    samples = windows * 640 * 10
    audio = rng.uniform(-0.5, 0.5, size=(channels, samples)).astype(np.float32)
    return Checkpoint(JOB_HASH, audio, 32000, windows, windows * 10, generation_s, attempts=1)


def test_key_under_partial():
    assert checkpoint_key(SONG) == "partial/calm-piano-1a2b3c4d.npz"
    assert checkpoint_key("batch/song.wav") == "partial/batch/song.npz"


def test_save_load_delete(any_store):
    saved = _checkpoint()
    save_checkpoint(any_store, SONG, saved)
    assert any_store.list_keys("partial/") == ["partial/calm-piano-1a2b3c4d.npz"]

    loaded = load_checkpoint(any_store, SONG, JOB_HASH)
    assert loaded is not None
    assert loaded.audio.dtype == np.float32
    assert loaded.audio.shape == (2, 12800)
    assert np.array_equal(loaded.audio, saved.audio)
    assert loaded.windows_done == 2
    assert loaded.frames_done == 20
    assert loaded.generation_s == 12.5
    assert loaded.sampling_rate == 32000
    assert loaded.attempts == 1

    # A later save replaces the earlier one.
    save_checkpoint(any_store, SONG, _checkpoint(windows=3, generation_s=20.0))
    assert load_checkpoint(any_store, SONG, JOB_HASH).windows_done == 3

    delete_checkpoint(any_store, SONG)
    assert load_checkpoint(any_store, SONG, JOB_HASH) is None
    delete_checkpoint(any_store, SONG)  # a missing checkpoint is not an error
    assert any_store.list_keys() == []


def test_other_job_ignored(any_store, caplog):
    save_checkpoint(any_store, SONG, _checkpoint())
    assert load_checkpoint(any_store, SONG, "ffffffff") is None
    assert "ffffffff" in caplog.text


def test_invalid_file_ignored(any_store, caplog):
    any_store.put_bytes(b"half a zip", checkpoint_key(SONG), CHECKPOINT_CONTENT_TYPE)
    assert load_checkpoint(any_store, SONG, JOB_HASH) is None
    assert "invalid checkpoint" in caplog.text


def test_truncated_file_ignored(tmp_path):
    from mgutil.storage import LocalStore

    store = LocalStore(tmp_path)
    data = encode_checkpoint(_checkpoint())
    store.put_bytes(data[: len(data) // 2], checkpoint_key(SONG), CHECKPOINT_CONTENT_TYPE)
    assert load_checkpoint(store, SONG, JOB_HASH) is None


def test_non_finite_audio_ignored(tmp_path):
    from mgutil.storage import LocalStore

    store = LocalStore(tmp_path)
    bad = _checkpoint()
    bad.audio[0, 5] = np.nan
    save_checkpoint(store, SONG, bad)
    assert load_checkpoint(store, SONG, JOB_HASH) is None


def _with_field(name: str, value) -> bytes:
    """Return a valid checkpoint file with one field replaced."""
    with np.load(io.BytesIO(encode_checkpoint(_checkpoint()))) as arrays:
        fields = dict(arrays)
    fields[name] = value
    buffer = io.BytesIO()
    np.savez(buffer, **fields)
    return buffer.getvalue()


def test_pickled_audio_rejected():
    data = _with_field("audio", np.array([[{"a": 1}]], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_checkpoint(data)


def test_other_format_version_rejected():
    with pytest.raises(ValueError, match="format version 99"):
        decode_checkpoint(_with_field("format_version", np.int64(99)))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"audio": np.zeros(10, dtype=np.float32)}, "channels, samples"),
        ({"windows_done": -1}, "windows_done"),
        ({"generation_s": float("nan")}, "generation_s"),
    ],
)
def test_invalid_checkpoint_rejected(changes, message):
    fields = {
        "job_hash": JOB_HASH,
        "audio": np.zeros((1, 10), dtype=np.float32),
        "sampling_rate": 32000,
        "windows_done": 1,
        "frames_done": 1,
        "generation_s": 1.0,
    }
    fields.update(changes)
    with pytest.raises(ValueError, match=message):
        Checkpoint(**fields)
