"""Launch, wait, find and shut down workers against a moto server on 127.0.0.1.

botocore's Stubber stands in only where moto cannot produce a state: spot request
holding codes, a request id unknown right after creation, and quota errors.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs

import boto3
import pandas as pd
import pytest
from botocore.stub import Stubber
from conftest import LAUNCH_PROMPTS

from mgutil.aws import launch as launcher
from mgutil.aws.bootstrap import render_user_data
from mgutil.aws.clients import make_client
from mgutil.aws.pricing import PriceSummary, spot_price_history, summarize_prices
from mgutil.aws.workers import find_workers, shut_down_workers
from mgutil.config import load_settings
from mgutil.errors import QuotaError, SpotPriceTooLowError, SpotRequestError, WorkerRunningError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TAG = "musicgen-batch-worker"
PROMPTS = LAUNCH_PROMPTS


def _plan(worker_env, ec2, run_id="20260101T000000Z-test", max_price=None, **options):
    settings = load_settings()
    if max_price is not None:
        settings = settings.with_overrides(max_spot_price_usd=max_price)
    history = spot_price_history(ec2, settings.instance_type, datetime(2000, 1, 1, tzinfo=UTC))
    prices = summarize_prices(history, settings.instance_type, settings.max_spot_price_usd)
    return launcher.plan_launch(
        settings,
        prices,
        worker_env["prompts"],
        songs=2,
        audio_s=30.0,
        run_id=run_id,
        ec2=ec2,
        ssm=make_client("ssm"),
        **options,
    )


def _capture(client, operation):
    """Record the query parameters of every ``operation`` request sent to the server."""
    sent = []

    def before_send(request, **_):
        body = request.body.decode() if isinstance(request.body, bytes) else request.body
        sent.append({k: v[0] for k, v in parse_qs(body).items()})

    client.meta.events.register(f"before-send.ec2.{operation}", before_send)
    return sent


def _instances(ec2, states=("pending", "running")):
    found = ec2.describe_instances(
        Filters=[
            {"Name": "tag:Name", "Values": [TAG]},
            {"Name": "instance-state-name", "Values": list(states)},
        ]
    )
    return [i for r in found["Reservations"] for i in r["Instances"]]


def test_launch_request_and_tagged_worker(worker_env):
    ec2 = make_client("ec2")
    s3 = make_client("s3")
    plan = _plan(worker_env, ec2, root_volume_gb=100, max_runtime_minutes=90)
    sent = _capture(ec2, "RunInstances")

    result = launcher.launch(plan, ec2, s3_client=s3, poll_interval_s=0.01, timeout_s=5)

    assert len(sent) == 1
    body = sent[0]
    assert body["InstanceType"] == "g4dn.xlarge"
    assert body["InstanceMarketOptions.MarketType"] == "spot"
    assert float(body["InstanceMarketOptions.SpotOptions.MaxPrice"]) == 0.40
    assert body["InstanceMarketOptions.SpotOptions.SpotInstanceType"] == "one-time"
    assert body["MetadataOptions.HttpTokens"] == "required"
    assert body["IamInstanceProfile.Name"] == "musicgen-worker"
    assert body["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert body["BlockDeviceMapping.1.Ebs.VolumeSize"] == "100"
    assert body["BlockDeviceMapping.1.Ebs.VolumeType"] == "gp3"
    assert body["BlockDeviceMapping.1.Ebs.Encrypted"] == "true"
    assert body["BlockDeviceMapping.1.DeviceName"] == worker_env["image"]["RootDeviceName"]
    resources = {v for k, v in body.items() if k.endswith(".ResourceType")}
    assert resources == {"instance", "volume", "spot-instances-request"}
    for index in (1, 2, 3):
        assert body[f"TagSpecification.{index}.Tag.1.Key"] == "Name"
        assert body[f"TagSpecification.{index}.Tag.1.Value"] == TAG
    user_data = base64.b64decode(body["UserData"]).decode()
    assert user_data == render_user_data(plan.bootstrap)
    assert "shutdown -h +90" in user_data

    # What the server holds.
    (instance,) = _instances(ec2)
    assert instance["InstanceId"] == result.instance_id
    assert result.instance_state == "running"
    assert instance["InstanceLifecycle"] == "spot"
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert instance["IamInstanceProfile"]["Arn"].endswith("/musicgen-worker")
    group = instance["SecurityGroups"][0]
    described = ec2.describe_security_groups(GroupIds=[group["GroupId"]])["SecurityGroups"][0]
    assert described["GroupName"] == "musicgen-worker-sg"
    assert described["IpPermissions"] == []
    (volume,) = ec2.describe_volumes(
        VolumeIds=[instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]]
    )["Volumes"]
    assert (volume["Size"], volume["VolumeType"], volume["Encrypted"]) == (100, "gp3", True)
    assert {"Key": "Name", "Value": TAG} in volume["Tags"]
    attribute = ec2.describe_instance_attribute(InstanceId=result.instance_id, Attribute="userData")
    stored = base64.b64decode(attribute["UserData"]["Value"]).decode()
    assert stored == user_data
    checked = subprocess.run(["bash", "-n"], input=stored, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr
    shutdown = ec2.describe_instance_attribute(
        InstanceId=result.instance_id, Attribute="instanceInitiatedShutdownBehavior"
    )
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    # The job file went to the run's folder, where the bootstrap fetches it.
    uploaded = s3.get_object(
        Bucket=worker_env["bucket"], Key=f"songs/runs/{plan.run_id}/prompts.txt"
    )["Body"].read()
    assert uploaded.decode() == PROMPTS
    workers = find_workers(ec2, TAG)
    assert list(workers.instances["max_price_usd"]) == [0.4]
    assert list(workers.instances["run_id"]) == [plan.run_id]


def test_dry_run_creates_nothing(worker_env):
    ec2 = make_client("ec2")
    plan = _plan(worker_env, ec2)
    sent = _capture(ec2, "RunInstances")

    lines = launcher.dry_run(plan, ec2)

    assert [body["DryRun"] for body in sent] == ["true"]
    assert any("RunInstances" in line for line in lines)
    assert any("CreateSecurityGroup" in line for line in lines)
    assert _instances(ec2, ("pending", "running", "stopping", "stopped")) == []
    groups = ec2.describe_security_groups()["SecurityGroups"]
    assert "musicgen-worker-sg" not in {g["GroupName"] for g in groups}
    listed = make_client("s3").list_objects_v2(Bucket=worker_env["bucket"])
    assert listed.get("KeyCount", 0) == 0


def test_second_launch_needs_force(worker_env):
    ec2 = make_client("ec2")
    first = _plan(worker_env, ec2, run_id="run-1")
    launcher.launch(first, ec2, poll_interval_s=0.01, timeout_s=5)
    second = _plan(worker_env, ec2, run_id="run-2")
    sent = _capture(ec2, "RunInstances")

    with pytest.raises(WorkerRunningError, match="already pending or running"):
        launcher.launch(second, ec2, poll_interval_s=0.01, timeout_s=5)
    assert sent == []
    assert len(_instances(ec2)) == 1

    launcher.launch(second, ec2, force=True, poll_interval_s=0.01, timeout_s=5)
    assert len(_instances(ec2)) == 2


def test_low_max_price_rejected_early(worker_env):
    ec2 = make_client("ec2")
    plan = _plan(worker_env, ec2)
    # Prices above the maximum in every zone (moto's own history is far below it).
    current = pd.DataFrame(
        {
            "availability_zone": ["us-east-1a", "us-east-1b"],
            "price_usd": [0.52, 0.61],
            "timestamp": [pd.Timestamp.now(tz="UTC")] * 2,
        }
    )
    plan.prices = PriceSummary("g4dn.xlarge", 0.40, current)
    sent = _capture(ec2, "RunInstances")

    with pytest.raises(SpotPriceTooLowError, match="us-east-1a at \\$0.5200"):
        launcher.dry_run(plan, ec2)
    with pytest.raises(SpotPriceTooLowError):
        launcher.launch(plan, ec2)
    assert sent == []
    listed = make_client("s3").list_objects_v2(Bucket=worker_env["bucket"])
    assert listed.get("KeyCount", 0) == 0


def test_shutdown_leaves_nothing(worker_env):
    ec2 = make_client("ec2")
    launcher.launch(_plan(worker_env, ec2), ec2, poll_interval_s=0.01, timeout_s=5)
    # A tagged spot request made elsewhere (moto fulfils it with an untagged instance).
    request = ec2.request_spot_instances(
        SpotPrice="0.4",
        InstanceCount=1,
        Type="one-time",
        LaunchSpecification={"ImageId": worker_env["image"]["ImageId"]},
        TagSpecifications=[
            {"ResourceType": "spot-instances-request", "Tags": [{"Key": "Name", "Value": TAG}]}
        ],
    )["SpotInstanceRequests"][0]
    before = find_workers(ec2, TAG)
    assert len(before.instances) == 1 and len(before.requests) == 1
    assert before.busy

    result = shut_down_workers(ec2, TAG)

    assert result.remaining.empty
    assert find_workers(ec2, TAG).empty
    assert request["SpotInstanceRequestId"] in result.cancelled_requests
    assert request["InstanceId"] in result.terminated_instances
    states = ec2.describe_instances(InstanceIds=result.terminated_instances)["Reservations"]
    assert {i["State"]["Name"] for r in states for i in r["Instances"]} == {"terminated"}


def test_find_workers_skips_terminated(worker_env):
    ec2 = make_client("ec2")
    ids = []
    for run in ("a", "b", "c"):
        plan = _plan(worker_env, ec2, run_id=f"run-{run}")
        ids.append(launcher.launch(plan, ec2, force=True, poll_interval_s=0.01).instance_id)
    ec2.stop_instances(InstanceIds=[ids[1]])
    ec2.terminate_instances(InstanceIds=[ids[2]])

    workers = find_workers(ec2, TAG, zone_prices={"us-east-1a": 0.1234})

    states = dict(zip(workers.instances["instance_id"], workers.instances["state"], strict=True))
    assert set(states) == {ids[0], ids[1]}
    assert states[ids[1]] in ("stopping", "stopped")
    row = workers.instances[workers.instances["instance_id"] == ids[0]].iloc[0]
    assert row["availability_zone"] == "us-east-1a" and row["spot_price_usd"] == 0.1234
    assert row["instance_type"] == "g4dn.xlarge" and row["private_ip"]


# --- States moto cannot produce: botocore Stubber ---------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def _stubbed_ec2():
    client = boto3.client("ec2", region_name="us-east-1")
    return client, Stubber(client)


def _request(state, code, instance_id=None):
    item = {
        "SpotInstanceRequestId": "sir-123",
        "State": state,
        "Status": {"Code": code, "Message": code},
    }
    if instance_id:
        item["InstanceId"] = instance_id
    return {"SpotInstanceRequests": [item]}


def _instance(state):
    return {
        "Reservations": [
            {
                "Instances": [
                    {
                        "InstanceId": "i-0123456789abcdef0",
                        "State": {"Name": state},
                        "Placement": {"AvailabilityZone": "us-east-1b"},
                    }
                ]
            }
        ]
    }


def _prices():
    current = pd.DataFrame(
        {"availability_zone": ["us-east-1b"], "price_usd": [0.2345], "timestamp": [None]}
    )
    return PriceSummary("g4dn.xlarge", 0.40, current)


def test_wait_reports_holding_codes():
    ec2, stub = _stubbed_ec2()
    ids = {"SpotInstanceRequestIds": ["sir-123"]}
    stub.add_client_error(
        "describe_spot_instance_requests",
        "InvalidSpotInstanceRequestID.NotFound",
        expected_params=ids,
    )
    stub.add_response("describe_spot_instance_requests", _request("open", "price-too-low"), ids)
    stub.add_response(
        "describe_spot_instance_requests", _request("open", "capacity-not-available"), ids
    )
    stub.add_response(
        "describe_spot_instance_requests",
        _request("active", "fulfilled", "i-0123456789abcdef0"),
        ids,
    )
    stub.add_response("describe_instances", _instance("pending"))
    stub.add_response(
        "describe_spot_instance_requests",
        _request("active", "fulfilled", "i-0123456789abcdef0"),
        ids,
    )
    stub.add_response("describe_instances", _instance("running"))
    clock = FakeClock()
    result = launcher.LaunchResult(run_id="r", spot_request_id="sir-123")

    with stub:
        launcher.wait_for_worker(
            ec2, result, _prices(), timeout_s=300, poll_interval_s=5, sleep=clock.sleep, clock=clock
        )
        stub.assert_no_pending_responses()

    assert result.instance_state == "running" and result.zone == "us-east-1b"
    text = "\n".join(result.messages)
    assert "not visible yet" in text
    assert "price-too-low" in text and "maximum price is below" in text and "$0.2345" in text
    assert "capacity-not-available" in text and "no spare capacity" in text


@pytest.mark.parametrize(
    ("responses", "reason"),
    [
        ([("open", "capacity-oversubscribed")] * 4, "no running instance after 15 s"),
        ([("closed", "bad-parameters")], r"closed \(bad-parameters"),
        (["not-found"] * 3, "still unknown to EC2"),
    ],
)
def test_wait_cancels_on_failure(responses, reason):
    ec2, stub = _stubbed_ec2()
    ids = {"SpotInstanceRequestIds": ["sir-123"]}
    for response in responses:
        if response == "not-found":
            stub.add_client_error(
                "describe_spot_instance_requests", "InvalidSpotInstanceRequestID.NotFound"
            )
        else:
            stub.add_response("describe_spot_instance_requests", _request(*response), ids)
    stub.add_response("cancel_spot_instance_requests", {"CancelledSpotInstanceRequests": []}, ids)
    stub.add_response(
        "terminate_instances",
        {"TerminatingInstances": []},
        {"InstanceIds": ["i-0123456789abcdef0"]},
    )
    clock = FakeClock()
    result = launcher.LaunchResult(
        run_id="r", spot_request_id="sir-123", instance_id="i-0123456789abcdef0"
    )
    # The instance id from RunInstances is polled too; it stays pending here.
    original = launcher._instance_state
    launcher._instance_state = lambda client, instance_id: ("pending", "us-east-1b")
    try:
        with stub, pytest.raises(SpotRequestError, match=reason):
            launcher.wait_for_worker(
                ec2,
                result,
                _prices(),
                timeout_s=15,
                poll_interval_s=5,
                not_found_grace_s=8,
                sleep=clock.sleep,
                clock=clock,
            )
        stub.assert_no_pending_responses()
    finally:
        launcher._instance_state = original
    assert result.messages[-1].startswith("cancelled:")


@pytest.mark.parametrize("code", ["MaxSpotInstanceCountExceeded", "VcpuLimitExceeded"])
def test_quota_error_names_quota(worker_env, code):
    plan = _plan(worker_env, make_client("ec2"))
    ec2, stub = _stubbed_ec2()
    stub.add_client_error("run_instances", code, "quota reached")
    stub.add_response(
        "describe_instance_types",
        {"InstanceTypes": [{"InstanceType": "g4dn.xlarge", "VCpuInfo": {"DefaultVCpus": 4}}]},
        {"InstanceTypes": ["g4dn.xlarge"]},
    )
    with stub, pytest.raises(QuotaError) as raised:
        launcher.submit_request(plan, ec2, "sg-12345678")
    stub.assert_no_pending_responses()
    message = str(raised.value)
    assert code in message and "4 vCPUs" in message
    assert "All G and VT Spot Instance Requests (L-3819A6DF)" in message


@pytest.mark.parametrize(
    ("instance_type", "quota"),
    [
        ("g5.xlarge", "L-3819A6DF"),
        ("p3.2xlarge", "L-7212CCBC"),
        ("inf2.xlarge", "L-B5D1601B"),
        ("c5.large", "L-34B43A08"),
        ("i3.large", "L-34B43A08"),
    ],
)
def test_spot_quota_name_by_family(instance_type, quota):
    assert quota in launcher.spot_quota_name(instance_type)


# --- The notebook under papermill --------------------------------------------------------


def _papermill(tmp_path, *parameters):
    output = tmp_path / "launch.ipynb"
    command = [
        sys.executable,
        "-m",
        "papermill",
        str(PROJECT_ROOT / "notebooks" / "02_launch.ipynb"),
        str(output),
        "-k",
        "python3",
        "-p",
        "artifacts_dir",
        str(tmp_path / "artifacts"),
        "-p",
        "poll_interval_s",
        "0.1",
        "-p",
        "run_id",
        "nbtest",
        *parameters,
    ]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    import nbformat

    return nbformat.read(output, as_version=4)


def _outputs(notebook, kind):
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and kind == "text":
                found.append(output["text"])
            elif kind in output.get("data", {}):
                found.append(output["data"][kind])
    return found


def test_notebook_dry_run(worker_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    notebook = _papermill(tmp_path, "-p", "prompts_path", str(worker_env["prompts"]))

    ec2 = make_client("ec2")
    assert _instances(ec2, ("pending", "running", "stopping", "stopped")) == []
    assert ec2.describe_spot_instance_requests()["SpotInstanceRequests"] == []
    listed = make_client("s3").list_objects_v2(Bucket=worker_env["bucket"])
    assert listed.get("KeyCount", 0) == 0
    chart = tmp_path / "artifacts" / "nbtest" / "spot-prices.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _outputs(notebook, "image/png")
    html = "\n".join(_outputs(notebook, "text/html"))
    assert "us-east-1a" in html and "max_price_usd" in html
    assert "expected run time (h)" in html and "cost at maximum price (USD)" in html
    text = "\n".join(_outputs(notebook, "text"))
    assert "RunInstances: EC2 would accept it (DryRun)" in text
    assert "nothing was created" in text


def test_notebook_confirm_and_shutdown(worker_env, tmp_path):
    prompts = ["-p", "prompts_path", str(worker_env["prompts"])]
    notebook = _papermill(tmp_path, *prompts, "-p", "confirm", "true")

    ec2 = make_client("ec2")
    (instance,) = _instances(ec2)
    assert instance["InstanceLifecycle"] == "spot"
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["Name"] == TAG and tags["musicgen-batch:max-price-usd"] == "0.4"
    attribute = ec2.describe_instance_attribute(
        InstanceId=instance["InstanceId"], Attribute="userData"
    )
    script = base64.b64decode(attribute["UserData"]["Value"]).decode()
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "RUN_ID=nbtest" in script
    assert "songs done: 0 of 2" in "\n".join(_outputs(notebook, "text"))

    # A second confirmed run launches nothing while the first runs.
    _papermill(tmp_path, *prompts, "-p", "confirm", "true", "-p", "run_id", "nbtest2")
    assert len(_instances(ec2)) == 1

    notebook = _papermill(tmp_path, *prompts, "-p", "shutdown", "true")
    assert _instances(ec2, ("pending", "running", "stopping", "stopped")) == []
    assert "0 tagged resource(s) left" in "\n".join(_outputs(notebook, "text"))


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("https://github.com/example/musicgen-batch.git", False),
        ("git@github.com:example/musicgen-batch.git", False),
        ("ssh://git@example.com/musicgen-batch.git", False),
        ("file:///srv/git/musicgen-batch.git", True),
        ("/work/main", True),
        ("", True),
    ],
)
def test_local_repository_warned(url, warned):
    warning = launcher.local_repository_warning(url)
    assert (warning is not None) == warned
    if warned:
        assert "cannot clone" in warning


def test_status_counts_uploaded_job_file(worker_env, tmp_path):
    from mgutil.aws.status import worker_status
    from mgutil.jobs import GenerationSettings, parse_job_text
    from mgutil.storage import open_store

    ec2 = make_client("ec2")
    result = launcher.launch(_plan(worker_env, ec2), ec2, poll_interval_s=0.01, timeout_s=5)
    settings = load_settings()
    store = open_store(settings.output_uri)
    uploaded = parse_job_text(PROMPTS, model_id=settings.model_id, settings=GenerationSettings())
    store.put_bytes(b"RIFF", uploaded.jobs[0].output_name, "audio/wav")
    # The notebook's own job file differs from the one the worker reads.
    other = parse_job_text(
        "a ; 1 ; a\nb ; 1 ; b\nc ; 1 ; c\n",
        model_id=settings.model_id,
        settings=GenerationSettings(),
    )

    status = worker_status(
        ec2,
        TAG,
        store,
        0.4,
        job_file=other,
        run_id=result.run_id,
        model_id=settings.model_id,
    )
    assert status.songs_total == 2
    assert status.songs_done == 1
    assert (
        worker_status(ec2, TAG, store, 0.4, job_file=other, run_id=result.run_id).songs_total == 3
    )
