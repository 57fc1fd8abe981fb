"""The IMDSv2 client and the instance facts, against a metadata server on 127.0.0.1."""

from __future__ import annotations

import time

import pytest
from loopback import LoopbackServer, QuietHandler

from mgutil.instance import (
    EC2_WORKER_VARIABLE,
    ENDPOINT_VARIABLE,
    InstanceFacts,
    MetadataClient,
    instance_facts_from_environment,
    read_instance_facts,
)

FACTS = {
    "/latest/meta-data/instance-id": "i-0abc1234def567890",
    "/latest/meta-data/instance-type": "g4dn.xlarge",
    "/latest/meta-data/placement/availability-zone": "us-east-1b",
    "/latest/meta-data/placement/region": "us-east-1",
}


class FakeMetadataServer(LoopbackServer):
    """An IMDSv2 look-alike: PUT a token, then GET with it; ``requests`` logs every call."""

    def __init__(self, paths: dict[str, str]):
        self.paths = dict(paths)
        self.requests: list[tuple[str, str]] = []
        self.tokens: set[str] = set()
        self.issued = 0
        server = self

        class Handler(QuietHandler):
            def do_PUT(self):
                server.requests.append(("PUT", self.path))
                if self.path != "/latest/api/token" or not self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                ):
                    self._reply(400)
                    return
                server.issued += 1
                token = f"token-{server.issued}"
                server.tokens.add(token)
                self._reply(200, token)

            def do_GET(self):
                server.requests.append(("GET", self.path))
                if self.headers.get("X-aws-ec2-metadata-token") not in server.tokens:
                    self._reply(401)
                elif self.path in server.paths:
                    self._reply(200, server.paths[self.path])
                else:
                    self._reply(404)

        super().__init__(Handler)


@pytest.fixture
def metadata_server():
    with FakeMetadataServer(FACTS) as server:
        yield server


def test_facts_read_under_bootstrap(metadata_server):
    facts = instance_facts_from_environment(
        {EC2_WORKER_VARIABLE: "1", ENDPOINT_VARIABLE: metadata_server.endpoint}
    )
    assert facts == InstanceFacts("i-0abc1234def567890", "g4dn.xlarge", "us-east-1b", "us-east-1")
    assert facts.on_ec2
    # One token for all four facts, asked for before any GET.
    assert metadata_server.requests[0] == ("PUT", "/latest/api/token")
    assert [method for method, _ in metadata_server.requests].count("PUT") == 1
    assert {path for method, path in metadata_server.requests if method == "GET"} == set(FACTS)


@pytest.mark.parametrize("value", [None, "", "0", "true", "yes"])
def test_no_request_unless_variable_is_1(metadata_server, monkeypatch, value):
    # The endpoint points at our server, so any request would be seen there.
    monkeypatch.setenv(ENDPOINT_VARIABLE, metadata_server.endpoint)
    if value is None:
        monkeypatch.delenv(EC2_WORKER_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(EC2_WORKER_VARIABLE, value)
    facts = instance_facts_from_environment()
    assert facts == InstanceFacts()
    assert not facts.on_ec2
    assert metadata_server.requests == []


def test_endpoint_read_from_environment(metadata_server, monkeypatch):
    monkeypatch.setenv(ENDPOINT_VARIABLE, metadata_server.endpoint + "/")
    assert MetadataClient().endpoint == metadata_server.endpoint
    assert MetadataClient().get("/latest/meta-data/instance-type") == "g4dn.xlarge"


def test_rejected_token_is_refreshed(metadata_server):
    client = MetadataClient(metadata_server.endpoint)
    assert client.get("/latest/meta-data/instance-id") == "i-0abc1234def567890"
    metadata_server.tokens.clear()  # the service forgets the token, as after a reboot
    assert client.get("/latest/meta-data/instance-type") == "g4dn.xlarge"
    puts = [request for request in metadata_server.requests if request[0] == "PUT"]
    assert len(puts) == 2


def test_missing_path_is_none(metadata_server):
    client = MetadataClient(metadata_server.endpoint)
    assert client.get("/latest/meta-data/spot/instance-action") is None


def test_region_from_zone_when_service_lacks_it():
    paths = {k: v for k, v in FACTS.items() if not k.endswith("/region")}
    with FakeMetadataServer(paths) as server:
        facts = read_instance_facts(MetadataClient(server.endpoint))
    assert facts.region == "us-east-1"


def test_unreachable_service_gives_empty_facts_quickly(caplog):
    from conftest import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    facts = instance_facts_from_environment({EC2_WORKER_VARIABLE: "1", ENDPOINT_VARIABLE: endpoint})
    assert facts == InstanceFacts()
    assert time.monotonic() - started < 5
    assert "cannot read the instance facts" in caplog.text
