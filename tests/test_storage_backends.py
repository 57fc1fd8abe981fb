"""The S3 store against two servers: moto and a real SeaweedFS, with the same results.

Each test runs once per backend through the ``s3_backend`` fixture, which gives an empty
bucket and points AWS_ENDPOINT_URL at the server.
"""

from __future__ import annotations

import pytest

from mgutil.storage import LocalStore, S3Store, open_store


@pytest.fixture
def store(s3_backend) -> S3Store:
    store = open_store(f"s3://{s3_backend.bucket}/batch")
    store.check_ready()
    return store


def test_roundtrip_bytes(store, s3_backend):
    store.put_bytes(b"a,b\n1,2\n", "cost_report.csv", "text/csv")
    assert store.get_bytes("cost_report.csv") == b"a,b\n1,2\n"
    head = s3_backend.client().head_object(Bucket=s3_backend.bucket, Key="batch/cost_report.csv")
    assert head["ContentType"] == "text/csv"


def test_missing_key_is_not_stored(store):
    assert store.exists("song-00000000.wav") is False
    assert store.get_versioned("song-00000000.wav") is None


def test_put_file_keeps_type_and_size(store, s3_backend, tmp_path):
    source = tmp_path / "song.wav"
    source.write_bytes(b"RIFF" + bytes(range(256)) * 300)
    store.put_file(source, "song.wav", "audio/wav")
    assert store.exists("song.wav")
    head = s3_backend.client().head_object(Bucket=s3_backend.bucket, Key="batch/song.wav")
    assert head["ContentType"] == "audio/wav"
    assert head["ContentLength"] == source.stat().st_size
    copy = tmp_path / "copy.wav"
    store.download_file("song.wav", copy)
    assert copy.read_bytes() == source.read_bytes()


def test_list_with_prefix(store, s3_backend):
    for key in ("records/b.json", "records/a.json", "song.wav", "claims/song.wav"):
        store.put_bytes(b"{}", key, "application/json")
    # An object beside the store's prefix must not appear in its listing.
    s3_backend.client().put_object(Bucket=s3_backend.bucket, Key="other/x.json", Body=b"{}")
    assert store.list_keys("records/") == ["records/a.json", "records/b.json"]
    assert store.list_keys() == ["claims/song.wav", "records/a.json", "records/b.json", "song.wav"]


def test_delete(store):
    store.put_bytes(b"x", "song.wav", "audio/wav")
    store.delete("song.wav")
    assert not store.exists("song.wav")
    store.delete("song.wav")  # a missing key is not an error
    assert store.list_keys() == []


def test_conditional_create(store):
    assert store.create_exclusive("claims/song.wav", b"first", "application/json") is True
    assert store.create_exclusive("claims/song.wav", b"second", "application/json") is False
    assert store.get_bytes("claims/song.wav") == b"first"


def test_create_retry_finds_own_bytes(store):
    # The same bytes again look like a retried request whose response was lost.
    version = store.put_if_absent("claims/song.wav", b"token-1", "application/json")
    assert version is not None
    assert store.put_if_absent("claims/song.wav", b"token-1", "application/json") == version


def test_replace_delete_if_version(store):
    version = store.put_if_absent("claims/song.wav", b"one", "application/json")
    assert store.get_versioned("claims/song.wav").version == version
    newer = store.replace_if_version("claims/song.wav", b"two", "application/json", version)
    assert newer is not None
    assert newer != version
    # The old version no longer matches: neither replace nor delete may act on it.
    assert (
        store.replace_if_version("claims/song.wav", b"three", "application/json", version) is None
    )
    assert store.delete_if_version("claims/song.wav", version) is False
    assert store.get_bytes("claims/song.wav") == b"two"
    assert store.delete_if_version("claims/song.wav", newer) is True
    assert not store.exists("claims/song.wav")
    assert store.replace_if_version("claims/song.wav", b"four", "application/json", newer) is None
    assert not store.exists("claims/song.wav")


def test_local_conditional_writes(tmp_path):
    store = LocalStore(tmp_path)
    version = store.put_if_absent("claims/song.wav", b"one", "application/json")
    assert version is not None
    assert store.create_exclusive("claims/song.wav", b"two", "application/json") is False
    newer = store.replace_if_version("claims/song.wav", b"two", "application/json", version)
    assert newer is not None
    assert store.replace_if_version("claims/song.wav", b"x", "application/json", version) is None
    assert store.delete_if_version("claims/song.wav", version) is False
    assert store.delete_if_version("claims/song.wav", newer) is True
    # The lock and temporary files stay hidden from listings.
    assert store.list_keys() == []
