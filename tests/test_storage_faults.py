"""Uploads through a proxy that fails a share of requests: nothing lost, retries logged.

The proxy listens on 127.0.0.1 in front of the moto server. For a set share of requests
it returns 500 InternalError, 503 SlowDown, or closes the connection without a response,
up to a bounded number of faults. It forwards every other request unchanged.
"""

from __future__ import annotations

import http.client
import threading
from urllib.parse import urlsplit

import pytest
from botocore.config import Config
from loopback import LoopbackServer, QuietHandler

from mgutil.errors import StorageError
from mgutil.storage import S3Store, is_transient_error, make_s3_client

_FAULT_BODIES = {
    500: b"<Error><Code>InternalError</Code><Message>injected</Message></Error>",
    503: b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>",
}
# Hop-by-hop headers that a proxy must not forward.
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultProxy(LoopbackServer):
    """A reverse proxy to ``upstream`` that fails every ``every``-th request.

    Args:
        upstream: Base URL of the real server.
        every: Fail requests number ``every``, ``2 * every`` and so on (counted from 1).
        kinds: Faults used in turn: ``500``, ``503`` or ``"drop"``.
        max_faults: Stop injecting after this many faults.
        match: ``match(method, path)`` selects the requests that count and may fail;
            ``None`` selects every request.
    """

    def __init__(
        self, upstream: str, every: int, kinds=(500, 503, "drop"), max_faults=50, match=None
    ):
        self.upstream = urlsplit(upstream)
        self.every = every
        self.match = match
        self.kinds = list(kinds)
        self.max_faults = max_faults
        self.lock = threading.Lock()
        self.requests = 0
        self.faults: list = []
        proxy = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size)
                        self.rfile.readline()
                        if size == 0:
                            break
                        chunks.append(chunk)
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _handle(self):
                body = self._read_body()
                fault = proxy._next_fault(self.command, self.path)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault is not None:
                    payload = _FAULT_BODIES[fault]
                    self.send_response(fault)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                headers = {
                    name: value
                    for name, value in self.headers.items()
                    if name.lower() not in _HOP_HEADERS and name.lower() != "content-length"
                }
                headers["Content-Length"] = str(len(body))
                connection = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=30
                )
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                    self.send_response(response.status)
                    for name, value in response.getheaders():
                        if name.lower() not in _HOP_HEADERS and name.lower() != "content-length":
                            self.send_header(name, value)
                    # A HEAD response has no body but names the object's length.
                    length = str(len(payload))
                    if self.command == "HEAD":
                        length = response.getheader("Content-Length", length)
                    self.send_header("Content-Length", length)
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                finally:
                    connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        super().__init__(Handler)

    def _next_fault(self, method: str, path: str):
        if self.match is not None and not self.match(method, path):
            return None
        with self.lock:
            self.requests += 1
            if self.requests % self.every or len(self.faults) >= self.max_faults:
                return None
            fault = self.kinds[len(self.faults) % len(self.kinds)]
            self.faults.append(fault)
            return fault


def _client(endpoint: str, attempts: int):
    """Return an S3 client for ``endpoint`` with ``attempts`` tries a request in all."""
    import boto3

    # total_max_attempts counts the first try; max_attempts would count retries only.
    retries = {"mode": "standard", "total_max_attempts": attempts}
    config = Config(retries=retries, connect_timeout=5, read_timeout=10)
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)


def _songs(tmp_path, count: int) -> list:
    """Write ``count`` small files of different sizes and contents."""
    songs = []
    for index in range(count):
        path = tmp_path / f"song-{index}.wav"
        path.write_bytes(b"RIFF" + bytes([index]) * (2000 + 37 * index))
        songs.append(path)
    return songs


def _assert_all_stored(aws_endpoint: str, bucket: str, songs: list) -> None:
    """Check, past the proxy, that every song is stored whole under ``batch/``."""
    direct = S3Store(bucket, "batch/", _client(aws_endpoint, 1))
    assert direct.list_keys() == sorted(path.name for path in songs)
    for path in songs:
        assert direct.get_bytes(path.name) == path.read_bytes()


def test_client_retries_absorb_faults(aws, s3_bucket, tmp_path, monkeypatch):
    with FaultProxy(aws, every=3) as proxy:
        # The project's own client, with its retry settings, pointed at the proxy.
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        store = S3Store(s3_bucket, "batch/", make_s3_client(), upload_backoff_s=0.01)
        songs = _songs(tmp_path, 8)
        for path in songs:
            store.put_file(path, path.name, "audio/wav")
    assert len(proxy.faults) >= 5
    assert set(proxy.faults) == {500, 503, "drop"}
    # botocore sent each faulted request again, and the store counted every retry.
    assert store.request_retries == len(proxy.faults)
    assert store.upload_retries == 0
    _assert_all_stored(aws, s3_bucket, songs)


def test_upload_retried_and_logged(aws, s3_bucket, tmp_path, caplog):
    caplog.set_level("INFO", logger="mgutil.storage")
    with FaultProxy(aws, every=3) as proxy:
        # One try a request, so that every fault reaches put_file's own retry.
        store = S3Store(s3_bucket, "batch/", _client(proxy.endpoint, 1), upload_backoff_s=0.01)
        songs = _songs(tmp_path, 8)
        for path in songs:
            store.put_file(path, path.name, "audio/wav")
    assert len(proxy.faults) >= 5
    assert set(proxy.faults) == {500, 503, "drop"}
    assert store.upload_retries == len(proxy.faults)
    assert caplog.text.count("retrying in") == len(proxy.faults)
    assert "on attempt 2 of 4" in caplog.text
    _assert_all_stored(aws, s3_bucket, songs)


def test_upload_gives_up_keeps_file(aws, s3_bucket, tmp_path, caplog):
    (path,) = _songs(tmp_path, 1)
    with FaultProxy(aws, every=1, kinds=(503,)) as proxy:
        store = S3Store(
            s3_bucket,
            "batch/",
            _client(proxy.endpoint, 1),
            upload_attempts=3,
            upload_backoff_s=0.01,
        )
        with pytest.raises(StorageError, match="failed 3 times") as raised:
            store.put_file(path, "song-0.wav", "audio/wav")
    assert "run again" in str(raised.value)
    assert proxy.faults == [503, 503, 503]
    assert store.upload_retries == 2
    assert path.is_file()
    assert S3Store(s3_bucket, "batch/", _client(aws, 1)).list_keys() == []


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "PutObject")


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_client_error("SlowDown", 503), True),
        (_client_error("InternalError", 500), True),
        (_client_error("500", 500), True),
        (_client_error("RequestTimeout", 400), True),
        (_client_error("AccessDenied", 403), False),
        (_client_error("NoSuchBucket", 404), False),
        (_client_error("PreconditionFailed", 412), False),
    ],
)
def test_transient_client_errors(error, transient):
    assert is_transient_error(error) is transient


def test_transient_connection_errors():
    from botocore.exceptions import (
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    assert is_transient_error(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))
    assert is_transient_error(ConnectionClosedError(endpoint_url="http://127.0.0.1:9"))
    assert is_transient_error(ReadTimeoutError(endpoint_url="http://127.0.0.1:9"))
    assert not is_transient_error(NoCredentialsError())
    assert not is_transient_error(ValueError("not from botocore"))
