"""Local and S3 stores: existence, atomic writes, verified uploads, error codes."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber

from mgutil.errors import StorageError, StoragePermissionError
from mgutil.storage import LocalStore, S3Store, make_s3_client, open_store


def test_local_put_and_exists(tmp_path):
    store = LocalStore(tmp_path / "out")
    store.check_ready()
    assert not store.exists("records/a.json")
    store.put_bytes(b"{}", "records/a.json", "application/json")
    assert store.exists("records/a.json")
    assert store.get_bytes("records/a.json") == b"{}"
    assert store.list_keys() == ["records/a.json"]
    assert store.list_keys("records/") == ["records/a.json"]
    store.delete("records/a.json")
    assert not store.exists("records/a.json")


def test_local_put_file_leaves_no_temp(tmp_path):
    source = tmp_path / "source.wav"
    source.write_bytes(b"RIFF" + b"\0" * 5000)
    store = LocalStore(tmp_path / "out")
    store.put_file(source, "song.wav", "audio/wav")
    assert (tmp_path / "out" / "song.wav").read_bytes() == source.read_bytes()
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["song.wav"]


def test_local_failed_write_keeps_old(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes(b"old", "song.wav", "audio/wav")

    def failing_write(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store._write_atomically("song.wav", failing_write)
    assert store.get_bytes("song.wav") == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["song.wav"]


def test_local_temp_files_not_listed(tmp_path):
    (tmp_path / ".tmp-abc").write_bytes(b"partial")
    store = LocalStore(tmp_path)
    assert store.list_keys() == []


def test_local_key_outside_root_rejected(tmp_path):
    store = LocalStore(tmp_path / "out")
    with pytest.raises(ValueError, match="outside the output folder"):
        store.exists("../escape.wav")


def test_open_store_picks_backend(tmp_path, s3_bucket):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    store = open_store(f"s3://{s3_bucket}/songs")
    assert isinstance(store, S3Store)
    assert store.prefix == "songs/"


def test_s3_roundtrip_with_prefix(tmp_path, s3_bucket):
    store = open_store(f"s3://{s3_bucket}/batch/one")
    store.check_ready()
    assert not store.exists("song.wav")

    source = tmp_path / "song.wav"
    source.write_bytes(b"RIFF" + b"\1" * 10_000)
    store.put_file(source, "song.wav", "audio/wav")
    assert store.exists("song.wav")

    client = boto3.client("s3", region_name="us-east-1")
    head = client.head_object(Bucket=s3_bucket, Key="batch/one/song.wav")
    assert head["ContentType"] == "audio/wav"
    assert head["ContentLength"] == 10_004

    store.put_bytes(b"a,b\n", "cost_report.csv", "text/csv")
    assert store.list_keys() == ["cost_report.csv", "song.wav"]
    assert store.get_bytes("cost_report.csv") == b"a,b\n"
    store.delete("song.wav")
    assert store.list_keys() == ["cost_report.csv"]


def test_s3_missing_bucket_named(aws):
    store = open_store("s3://no-such-bucket-here/x")
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        store.check_ready()


def test_s3_retry_mode_standard(aws):
    client = make_s3_client()
    assert client.meta.config.retries["mode"] == "standard"


def _stubbed_store():
    client = boto3.client("s3", region_name="us-east-1")
    return S3Store("stub-bucket", "p/", client), Stubber(client)


def test_s3_head_404_means_missing():
    store, stubber = _stubbed_store()
    stubber.add_client_error("head_object", "404", "Not Found", 404)
    with stubber:
        assert store.exists("song.wav") is False


def test_s3_head_403_explains_list_bucket():
    store, stubber = _stubbed_store()
    stubber.add_client_error("head_object", "403", "Forbidden", 403)
    with stubber, pytest.raises(StoragePermissionError) as raised:
        store.exists("song.wav")
    message = str(raised.value)
    assert "s3:ListBucket" in message
    assert "stub-bucket" in message


@pytest.mark.parametrize(("code", "status"), [("500", 500), ("SlowDown", 503), ("400", 400)])
def test_s3_unknown_error_raises(code, status):
    store, stubber = _stubbed_store()
    stubber.add_client_error("head_object", code, "boom", status)
    with stubber, pytest.raises(StorageError) as raised:
        store.exists("song.wav")
    assert not isinstance(raised.value, StoragePermissionError)


def test_s3_size_mismatch_rejected():
    store, stubber = _stubbed_store()
    stubber.add_response("put_object", {})
    stubber.add_response("head_object", {"ContentLength": 3})
    with stubber, pytest.raises(StorageError, match="incomplete"):
        store.put_bytes(b"12345", "report.csv", "text/csv")


def test_s3_put_denied_is_permission_error():
    store, stubber = _stubbed_store()
    stubber.add_client_error("put_object", "AccessDenied", "denied", 403)
    with stubber, pytest.raises(StoragePermissionError, match="stub-bucket"):
        store.put_bytes(b"x", "report.csv", "text/csv")
