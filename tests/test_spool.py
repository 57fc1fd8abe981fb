"""The local spool of songs whose upload failed."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from mgutil.spool import SPOOL_DIR_VARIABLE, Spool, default_spool_root, spool_folder

AUDIO = np.linspace(-0.5, 0.5, 32_000, dtype=np.float32).reshape(1, -1)
RECORD = {"output_key": "song-1a2b3c4d.wav", "job_hash": "1a2b3c4d", "status": "done"}


def test_put_then_entries(tmp_path):
    spool = Spool("s3://bucket/songs", tmp_path)
    path = spool.put("song-1a2b3c4d.wav", AUDIO, 32_000, RECORD)
    assert path.parent == spool_folder("s3://bucket/songs", tmp_path)
    assert soundfile.info(str(path)).frames == 32_000
    (entry,) = spool.entries()
    assert entry.key == "song-1a2b3c4d.wav"
    assert entry.wav_path == path
    assert entry.record == RECORD
    assert spool.get("song-1a2b3c4d.wav") == entry
    assert spool.get("other.wav") is None


def test_remove_entry(tmp_path):
    spool = Spool("outputs/", tmp_path)
    spool.put("song-1a2b3c4d.wav", AUDIO, 32_000, RECORD)
    spool.remove("song-1a2b3c4d.wav")
    spool.remove("song-1a2b3c4d.wav")
    assert spool.entries() == []
    assert list(spool.folder.glob("*.wav")) == []


def test_locations_apart(tmp_path):
    first = Spool("s3://bucket/a", tmp_path)
    second = Spool("s3://bucket/b", tmp_path)
    first.put("song-1a2b3c4d.wav", AUDIO, 32_000, RECORD)
    assert first.folder != second.folder
    assert second.entries() == []


def test_wav_without_record_ignored(tmp_path):
    spool = Spool("outputs/", tmp_path)
    spool.put("song-1a2b3c4d.wav", AUDIO, 32_000, RECORD)
    spool.record_path("song-1a2b3c4d.wav").unlink()
    assert spool.entries() == []


def test_unreadable_record_skipped(tmp_path, caplog):
    spool = Spool("outputs/", tmp_path)
    spool.put("song-1a2b3c4d.wav", AUDIO, 32_000, RECORD)
    spool.record_path("song-1a2b3c4d.wav").write_text("{not json", encoding="utf-8")
    assert spool.entries() == []
    assert "unreadable spool record" in caplog.text


def test_key_with_folder_rejected(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        Spool("outputs/", tmp_path).put("../escape.wav", AUDIO, 32_000, RECORD)


def test_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(SPOOL_DIR_VARIABLE, str(tmp_path / "spool"))
    assert default_spool_root() == tmp_path / "spool"
    monkeypatch.delenv(SPOOL_DIR_VARIABLE)
    assert default_spool_root().name == "musicgen-batch-spool"
