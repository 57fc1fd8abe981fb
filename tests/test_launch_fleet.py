"""Fleets of workers: one instant EC2 Fleet request for several spot workers, on moto.

moto applies the fleet's instance types, zones, tags and UserData to the instances, but
not the launch template's instance profile or metadata options, so those are checked in
the launch template request as sent.
"""

from __future__ import annotations

import base64

import boto3
import pytest
from botocore.stub import Stubber

# Helpers of the single-worker tests: request capture, instance listing, plan.
from test_launch import PROMPTS, TAG, _capture, _instances, _outputs, _papermill, _plan

from mgutil.aws import launch as launcher
from mgutil.aws.bootstrap import render_user_data
from mgutil.aws.clients import make_client
from mgutil.aws.widgets import launch_panel
from mgutil.aws.workers import find_workers, shut_down_workers
from mgutil.config import DEFAULT_INSTANCE_TYPES, load_settings
from mgutil.errors import ConfigError, SpotRequestError, WorkerRunningError

FLEET_TYPES = {"g4dn.xlarge", "g5.xlarge", "g6.xlarge"}


def test_three_tagged_spot_workers(worker_env):
    ec2 = make_client("ec2")
    s3 = make_client("s3")
    plan = _plan(worker_env, ec2, count=3)
    fleet_sent = _capture(ec2, "CreateFleet")
    template_sent = _capture(ec2, "CreateLaunchTemplate")
    single_sent = _capture(ec2, "RunInstances")

    result = launcher.launch(plan, ec2, s3_client=s3, poll_interval_s=0.01, timeout_s=5)

    assert isinstance(result, launcher.FleetResult)
    assert single_sent == []
    assert len(result.instances) == 3
    assert [row["state"] for row in result.instances] == ["running"] * 3
    assert result.errors == []

    # The fleet request: instant, spot, price-capacity-optimized, every type in every zone.
    (fleet,) = fleet_sent
    assert fleet["Type"] == "instant"
    assert fleet["TargetCapacitySpecification.TotalTargetCapacity"] == "3"
    assert fleet["TargetCapacitySpecification.DefaultTargetCapacityType"] == "spot"
    assert fleet["SpotOptions.AllocationStrategy"] == "price-capacity-optimized"
    assert fleet["SpotOptions.InstanceInterruptionBehavior"] == "terminate"
    assert float(fleet["SpotOptions.MaxTotalPrice"]) == pytest.approx(1.2)
    zones = launcher.available_zones(ec2)
    prefix = "LaunchTemplateConfigs.1.Overrides."
    overrides = {
        key[len(prefix) :]: value for key, value in fleet.items() if key.startswith(prefix)
    }
    pairs = {
        (overrides[f"{index}.InstanceType"], overrides[f"{index}.AvailabilityZone"])
        for index in range(1, 3 * len(zones) + 1)
    }
    assert pairs == {(kind, zone) for kind in FLEET_TYPES for zone in zones}
    prices = {value for key, value in overrides.items() if key.endswith(".MaxPrice")}
    assert prices == {"0.4"}
    assert fleet["TagSpecification.1.ResourceType"] == "fleet"

    # The launch template carries what a single worker's RunInstances carries.
    (template,) = template_sent
    data = "LaunchTemplateData."
    assert template[data + "MetadataOptions.HttpTokens"] == "required"
    assert template[data + "IamInstanceProfile.Name"] == "musicgen-worker"
    assert template[data + "InstanceInitiatedShutdownBehavior"] == "terminate"
    assert template[data + "BlockDeviceMapping.1.Ebs.VolumeSize"] == "100"
    assert template[data + "BlockDeviceMapping.1.Ebs.Encrypted"] == "true"
    assert template[data + "SecurityGroupId.1"].startswith("sg-")
    resources = {
        v for k, v in template.items() if k.startswith(data) and k.endswith("ResourceType")
    }
    assert resources == {"instance", "volume", "spot-instances-request"}
    # The template is deleted once the instant fleet has started.
    assert ec2.describe_launch_templates()["LaunchTemplates"] == []

    # What the server holds: three tagged spot instances with the same UserData.
    instances = _instances(ec2)
    assert sorted(i["InstanceId"] for i in instances) == sorted(result.instance_ids)
    expected = render_user_data(plan.bootstrap)
    for instance in instances:
        assert instance["InstanceLifecycle"] == "spot"
        assert instance["InstanceType"] in FLEET_TYPES
        tags = {tag["Key"]: tag["Value"] for tag in instance["Tags"]}
        assert tags["Name"] == TAG
        assert tags["musicgen-batch:run-id"] == plan.run_id
        attribute = ec2.describe_instance_attribute(
            InstanceId=instance["InstanceId"], Attribute="userData"
        )
        assert base64.b64decode(attribute["UserData"]["Value"]).decode() == expected
    uploaded = s3.get_object(
        Bucket=worker_env["bucket"], Key=f"songs/runs/{plan.run_id}/prompts.txt"
    )["Body"].read()
    assert uploaded.decode() == PROMPTS

    # Status and shut-down see every worker of the fleet.
    assert len(find_workers(ec2, TAG).active_instances) == 3
    stopped = shut_down_workers(ec2, TAG)
    assert sorted(stopped.terminated_instances) == sorted(result.instance_ids)
    assert _instances(ec2) == []


def test_fleet_needs_force(worker_env):
    ec2 = make_client("ec2")
    launcher.launch(_plan(worker_env, ec2, run_id="run-1"), ec2, poll_interval_s=0.01, timeout_s=5)
    plan = _plan(worker_env, ec2, run_id="run-2", count=2)
    sent = _capture(ec2, "CreateFleet")
    with pytest.raises(WorkerRunningError, match="already pending or running"):
        launcher.launch(plan, ec2, poll_interval_s=0.01, timeout_s=5)
    assert sent == []
    result = launcher.launch(plan, ec2, force=True, poll_interval_s=0.01, timeout_s=5)
    assert len(result.instances) == 2
    assert len(_instances(ec2)) == 3


def test_count_one_single_request(worker_env):
    ec2 = make_client("ec2")
    plan = _plan(worker_env, ec2)
    fleet_sent = _capture(ec2, "CreateFleet")
    result = launcher.launch(plan, ec2, poll_interval_s=0.01, timeout_s=5)
    assert isinstance(result, launcher.LaunchResult)
    assert fleet_sent == []
    assert plan.summary().set_index("item").loc["instance type", "value"] == "g4dn.xlarge"


def test_fleet_starting_none_fails(worker_env, monkeypatch):
    ec2 = make_client("ec2")
    plan = _plan(worker_env, ec2, count=2)
    no_capacity = {
        "FleetId": "fleet-0123456789abcdef0",
        "Instances": [],
        "Errors": [
            {
                "LaunchTemplateAndOverrides": {
                    "Overrides": {"InstanceType": "g5.xlarge", "AvailabilityZone": "us-east-1a"}
                },
                "Lifecycle": "spot",
                "ErrorCode": "InsufficientInstanceCapacity",
                "ErrorMessage": "no capacity",
            }
        ],
    }
    monkeypatch.setattr(ec2, "create_fleet", lambda **request: no_capacity)
    with pytest.raises(SpotRequestError, match="InsufficientInstanceCapacity") as raised:
        launcher.launch(plan, ec2, poll_interval_s=0.01, timeout_s=5)
    assert "g5.xlarge in us-east-1a" in str(raised.value)
    assert ec2.describe_launch_templates()["LaunchTemplates"] == []
    assert _instances(ec2) == []


def test_fleet_dry_run_creates_nothing(worker_env):
    ec2 = make_client("ec2")
    plan = _plan(worker_env, ec2, count=3)
    lines = launcher.dry_run(plan, ec2)
    assert any(line.startswith("CreateLaunchTemplate: EC2 would accept it") for line in lines)
    assert any("CreateFleet for 3 workers" in line for line in lines)
    assert ec2.describe_launch_templates()["LaunchTemplates"] == []
    assert _instances(ec2, ("pending", "running", "stopping", "stopped")) == []
    summary = plan.summary().set_index("item")["value"]
    assert summary["workers"].startswith("3, as one EC2 Fleet request")
    assert summary["instance types"] == "g4dn.xlarge, g5.xlarge, g6.xlarge"
    panel = launch_panel(plan, 1.0, lambda: None)
    assert "3, as one EC2 Fleet request" in panel.summary.value
    assert "these 3 instances bill" in panel.checkbox.description


def test_wait_terminates_when_none_runs():
    ec2 = boto3.client("ec2", region_name="us-east-1")
    stubber = Stubber(ec2)
    pending = {
        "Reservations": [
            {
                "Instances": [
                    {"InstanceId": "i-0aaaaaaaaaaaaaaaa", "State": {"Name": "pending"}},
                    {"InstanceId": "i-0bbbbbbbbbbbbbbbb", "State": {"Name": "terminated"}},
                ]
            }
        ]
    }
    stubber.add_response("describe_instances", pending)
    stubber.add_response("describe_instances", pending)
    for instance_id in ("i-0aaaaaaaaaaaaaaaa", "i-0bbbbbbbbbbbbbbbb"):
        stubber.add_response(
            "terminate_instances", {"TerminatingInstances": []}, {"InstanceIds": [instance_id]}
        )
    result = launcher.FleetResult(
        run_id="run-1",
        fleet_id="fleet-1",
        instances=[
            {"instance_id": "i-0aaaaaaaaaaaaaaaa", "instance_type": "g5.xlarge", "zone": None},
            {"instance_id": "i-0bbbbbbbbbbbbbbbb", "instance_type": "g4dn.xlarge", "zone": None},
        ],
    )
    ticks = iter([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    with stubber, pytest.raises(SpotRequestError, match="no instance of fleet fleet-1 ran"):
        launcher.wait_for_fleet(
            ec2,
            result,
            timeout_s=1.5,
            poll_interval_s=0.0,
            sleep=lambda s: None,
            clock=lambda: next(ticks),
        )
    stubber.assert_no_pending_responses()


def test_invalid_count_rejected(worker_env):
    ec2 = make_client("ec2")
    for count in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="count="):
            _plan(worker_env, ec2, count=count)


def test_instance_types_setting():
    assert load_settings(environ={}).instance_types == DEFAULT_INSTANCE_TYPES
    settings = load_settings(environ={"INSTANCE_TYPES": " g5.xlarge , g6.xlarge,"})
    assert settings.instance_types == ("g5.xlarge", "g6.xlarge")
    with pytest.raises(ConfigError, match="INSTANCE_TYPES="):
        load_settings(environ={"INSTANCE_TYPES": "g5.xlarge,gpu"})
    with pytest.raises(ConfigError, match="INSTANCE_TYPES="):
        load_settings(environ={"INSTANCE_TYPES": " , "})


def test_notebook_fleet_and_shutdown(worker_env, tmp_path):
    prompts = ["-p", "prompts_path", str(worker_env["prompts"])]
    notebook = _papermill(tmp_path, *prompts, "-p", "count", "2", "-p", "confirm", "true")

    ec2 = make_client("ec2")
    instances = _instances(ec2)
    assert len(instances) == 2
    for instance in instances:
        tags = {tag["Key"]: tag["Value"] for tag in instance["Tags"]}
        assert tags["musicgen-batch:run-id"] == "nbtest"
    assert "songs done: 0 of 2" in "\n".join(_outputs(notebook, "text"))
    html = "\n".join(_outputs(notebook, "text/html"))
    assert "as one EC2 Fleet request" in html
    # The launch result and the status table list both workers.
    for instance in instances:
        assert html.count(instance["InstanceId"]) >= 2

    notebook = _papermill(tmp_path, *prompts, "-p", "shutdown", "true")
    assert _instances(ec2, ("pending", "running", "stopping", "stopped")) == []
    assert "terminated 2 instance(s)" in "\n".join(_outputs(notebook, "text"))


def test_denied_fleet_names_permissions(worker_env, monkeypatch):
    from botocore.exceptions import ClientError

    from mgutil.errors import LaunchError

    ec2 = make_client("ec2")
    plan = _plan(worker_env, ec2, count=2)

    def denied(**request):
        error = {"Error": {"Code": "UnauthorizedOperation", "Message": "not allowed"}}
        raise ClientError(error, "CreateFleet")

    monkeypatch.setattr(ec2, "create_fleet", denied)
    with pytest.raises(LaunchError, match="ec2:CreateFleet, ec2:CreateLaunchTemplate"):
        launcher.launch(plan, ec2, poll_interval_s=0.01, timeout_s=5)
    # The launch template does not outlive the failed request.
    assert ec2.describe_launch_templates()["LaunchTemplates"] == []
