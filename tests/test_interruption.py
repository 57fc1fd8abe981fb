"""The spot interruption watcher, against a metadata server on 127.0.0.1."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from loopback import LoopbackServer, QuietHandler

from mgutil.instance import EC2_WORKER_VARIABLE, ENDPOINT_VARIABLE, MetadataClient
from mgutil.interruption import (
    INSTANCE_ACTION_PATH,
    NOTICE_LEAD_S,
    REBALANCE_PATH,
    InterruptionNotice,
    InterruptionWatcher,
    watcher_from_environment,
)

ACTION = '{"action": "terminate", "time": "2026-12-04T21:00:00Z"}'
REBALANCE = '{"noticeTime": "2026-12-04T20:55:00Z"}'
# Seconds a test waits for the watcher thread before it fails.
WAIT_S = 20.0
# Seconds between polls in tests.
FAST_INTERVAL_S = 0.02


class SpotMetadataServer(LoopbackServer):
    """An IMDSv2 look-alike that announces a rebalance and then an interruption.

    Args:
        action_after: GETs of the instance-action path that return 404 before the notice.
        rebalance_after: GETs of the rebalance path that return 404 before the recommendation.
        token_uses: GETs each token is good for before the server rejects it with 401.
    """

    def __init__(self, action_after: int, rebalance_after: int = 10**9, token_uses: int = 10**9):
        self.action_after = action_after
        self.rebalance_after = rebalance_after
        self.token_uses = token_uses
        self.lock = threading.Lock()
        self.requests = 0
        self.action_gets = 0
        self.rebalance_gets = 0
        self.rejected = 0
        self.tokens: dict[str, int] = {}
        server = self

        class Handler(QuietHandler):
            def do_PUT(self):
                with server.lock:
                    server.requests += 1
                    token = f"token-{len(server.tokens)}"
                    server.tokens[token] = 0
                self._reply(200, token)

            def do_GET(self):
                with server.lock:
                    server.requests += 1
                    token = self.headers.get("X-aws-ec2-metadata-token")
                    if token not in server.tokens or server.tokens[token] >= server.token_uses:
                        server.rejected += 1
                        status, body = 401, ""
                    else:
                        server.tokens[token] += 1
                        status, body = server._respond(self.path)
                self._reply(status, body)

        super().__init__(Handler)

    def _respond(self, path: str) -> tuple[int, str]:
        if path == INSTANCE_ACTION_PATH:
            self.action_gets += 1
            return (200, ACTION) if self.action_gets > self.action_after else (404, "")
        if path == REBALANCE_PATH:
            self.rebalance_gets += 1
            return (200, REBALANCE) if self.rebalance_gets > self.rebalance_after else (404, "")
        return 404, ""


def test_notice_after_some_polls(caplog):
    caplog.set_level("INFO", logger="mgutil.interruption")
    with SpotMetadataServer(action_after=3, rebalance_after=1) as server:
        watcher = InterruptionWatcher(MetadataClient(server.endpoint), FAST_INTERVAL_S)
        with watcher:
            assert watcher.interrupted.wait(WAIT_S)
            # The thread ends by itself after the notice, without stop().
            watcher._thread.join(WAIT_S)
            assert not watcher._thread.is_alive()
        assert server.action_gets == 4
        assert watcher.polls == 4
        assert watcher.rebalance_recommended.is_set()
        assert watcher.rebalance.notice_time == datetime(2026, 12, 4, 20, 55, tzinfo=UTC)
    notice = watcher.notice
    assert notice.action == "terminate"
    assert notice.action_time == datetime(2026, 12, 4, 21, 0, tzinfo=UTC)
    assert "spot interruption notice: terminate" in caplog.text
    assert "rebalance" in caplog.text


def test_token_refreshed_on_401():
    with SpotMetadataServer(action_after=5, token_uses=2) as server:
        watcher = InterruptionWatcher(MetadataClient(server.endpoint), FAST_INTERVAL_S)
        with watcher:
            assert watcher.interrupted.wait(WAIT_S)
        assert server.rejected >= 1
        assert len(server.tokens) >= 2
    assert watcher.notice.action == "terminate"


def test_unreachable_service_keeps_polling(caplog):
    # A port with no server: every poll fails, and the failure is logged once.
    with SpotMetadataServer(action_after=0) as server:
        endpoint = server.endpoint
    client = MetadataClient(endpoint, timeout_s=0.5)
    watcher = InterruptionWatcher(client, FAST_INTERVAL_S)
    with watcher:
        for _ in range(500):
            if watcher.failures >= 3:
                break
            threading.Event().wait(FAST_INTERVAL_S)
    assert watcher.failures >= 3
    assert not watcher.interrupted.is_set()
    assert watcher.notice is None
    assert caplog.text.count("polling for spot interruption notices failed") == 1


@pytest.mark.parametrize("value", [None, "", "0", "true"])
def test_no_request_off_ec2(monkeypatch, value):
    with SpotMetadataServer(action_after=0) as server:
        environ = {ENDPOINT_VARIABLE: server.endpoint}
        if value is not None:
            environ[EC2_WORKER_VARIABLE] = value
        assert watcher_from_environment(environ, FAST_INTERVAL_S) is None
        # The process environment alone must not start it either.
        monkeypatch.setenv(ENDPOINT_VARIABLE, server.endpoint)
        monkeypatch.delenv(EC2_WORKER_VARIABLE, raising=False)
        assert watcher_from_environment(interval_s=FAST_INTERVAL_S) is None
        assert server.requests == 0


def test_started_under_bootstrap():
    with SpotMetadataServer(action_after=2) as server:
        environ = {EC2_WORKER_VARIABLE: "1", ENDPOINT_VARIABLE: server.endpoint}
        watcher = watcher_from_environment(environ, FAST_INTERVAL_S)
        try:
            assert watcher is not None
            assert watcher.client.endpoint == server.endpoint
            assert watcher.interrupted.wait(WAIT_S)
        finally:
            watcher.stop()
        assert server.requests > 0


def test_unreadable_notice_counts():
    received = datetime(2026, 12, 4, 20, 0, tzinfo=UTC)
    notice = InterruptionNotice.parse("not json", received)
    assert notice.action == "unknown"
    assert notice.seconds_left(received) == NOTICE_LEAD_S
    assert notice.seconds_left(datetime(2026, 12, 4, 21, 0, tzinfo=UTC)) == 0.0


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval_s"):
        InterruptionWatcher(MetadataClient("http://127.0.0.1:9"), 0.0)
