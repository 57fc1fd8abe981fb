"""Plan, validate and submit a one-time spot request for a worker, then wait for it.

The flow reads as its steps: :func:`plan_launch` resolves the AMI, the security group,
the zone and the UserData without creating anything; :func:`dry_run` asks EC2 to
validate the request with ``DryRun=True``; :func:`launch` (only after the user
confirmed) uploads the job file, creates the security group when missing, submits
``RunInstances`` with spot market options and waits with :func:`wait_for_worker`.

With ``count`` above 1, :func:`launch` starts a fleet instead: one EC2 Fleet request of
type ``instant`` for ``count`` spot instances over the plan's instance types and every
zone of the region, each with the maximum price (:func:`launch_fleet`). The workers share
the job file and the output location, and claims divide the songs among them.

A persistent spot request is deliberately not offered: EC2 would replace a terminated
instance and bill again.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mgutil.aws.bootstrap import JOB_FILE_NAME, RUNS_PREFIX, BootstrapConfig, render_user_data
from mgutil.aws.pricing import PriceSummary
from mgutil.aws.workers import (
    HOLDING_CODES,
    MAX_PRICE_TAG_KEY,
    RUN_ID_TAG_KEY,
    TAG_KEY,
    explain_status,
    find_workers,
)
from mgutil.config import Settings, git_repo_source
from mgutil.errors import (
    ConfigError,
    LaunchError,
    QuotaError,
    SpotRequestError,
    WorkerRunningError,
)
from mgutil.storage import open_store

logger = logging.getLogger(__name__)

DEFAULT_ROOT_VOLUME_GB = 100
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_POLL_INTERVAL_S = 10.0
# A request id can be unknown to DescribeSpotInstanceRequests for a few seconds after
# it is created (eventual consistency); during this grace period that is not an error.
NOT_FOUND_GRACE_S = 60.0
TERMINAL_REQUEST_STATES = ("closed", "cancelled", "failed")
# Allocation strategy of a fleet: among the instance types and zones with the most spare
# capacity, the lowest price. Interruptions are then rare and the price stays low.
FLEET_ALLOCATION_STRATEGY = "price-capacity-optimized"
# Instance states after which an instance never runs again.
ENDED_INSTANCE_STATES = ("shutting-down", "terminated", "stopping", "stopped")
QUOTA_ERROR_CODES = ("MaxSpotInstanceCountExceeded", "VcpuLimitExceeded")
# Spot vCPU quotas by instance family (first letters of the type), in Service Quotas.
_SPOT_QUOTAS = (
    (("g", "vt"), "All G and VT Spot Instance Requests (L-3819A6DF)"),
    (("p",), "All P Spot Instance Requests (L-7212CCBC)"),
    (("inf",), "All Inf Spot Instance Requests (L-B5D1601B)"),
    (("trn",), "All Trn Spot Instance Requests (L-6B0D517C)"),
    (("f",), "All F Spot Instance Requests (L-88CF9481)"),
    (("x",), "All X Spot Instance Requests (L-E3A00192)"),
)
_STANDARD_SPOT_QUOTA = (
    "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests (L-34B43A08)"
)


def _error_code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", "Unknown"))


def spot_quota_name(instance_type: str) -> str:
    """Return the Service Quotas name of the spot vCPU quota that covers ``instance_type``."""
    family = instance_type.split(".", 1)[0].lower()
    letters = ""
    for char in family:
        if not char.isalpha():
            break
        letters += char
    for prefixes, name in _SPOT_QUOTAS:
        if any(letters.startswith(prefix) for prefix in prefixes):
            return name
    return _STANDARD_SPOT_QUOTA


@dataclass
class LaunchPlan:
    """Everything a launch needs, resolved without creating anything.

    Attributes:
        settings: Effective settings (overrides applied).
        run_id: Id of the worker's run.
        zone: Availability zone of the request (the cheapest within the maximum), or
            ``None`` to let EC2 choose.
        ami_id: Image of the worker.
        root_device_name: Root device of the AMI.
        root_volume_gb: Size of the encrypted gp3 root volume, GiB.
        security_group_id: Id of the worker's group, ``None`` while it does not exist.
        bootstrap: Settings of the UserData script.
        user_data: The rendered script.
        prompts_path: Local job file, uploaded to ``bootstrap.jobs_uri`` at launch.
        songs: Songs in the job file.
        audio_s: Requested audio in the job file, seconds.
        prices: Current prices and the maximum.
        count: Number of workers; above 1 they start as one EC2 Fleet request.
        instance_types: Instance types a fleet may use; ``(instance_type,)`` when empty.
    """

    settings: Settings
    run_id: str
    zone: str | None
    ami_id: str
    root_device_name: str
    root_volume_gb: int
    security_group_id: str | None
    bootstrap: BootstrapConfig
    user_data: str
    prompts_path: Path
    songs: int
    audio_s: float
    prices: PriceSummary
    count: int = 1
    instance_types: tuple[str, ...] = ()

    @property
    def max_price_usd(self) -> float:
        return self.settings.max_spot_price_usd

    @property
    def instance_type(self) -> str:
        return self.settings.instance_type

    def tags(self) -> list[dict]:
        """Tags of the instance, its spot request and its volumes."""
        return [
            {"Key": TAG_KEY, "Value": self.settings.worker_tag},
            {"Key": RUN_ID_TAG_KEY, "Value": self.run_id},
            {"Key": MAX_PRICE_TAG_KEY, "Value": f"{self.max_price_usd:g}"},
        ]

    def request(self, security_group_id: str | None = None) -> dict:
        """Return the ``RunInstances`` arguments: one one-time spot instance.

        Args:
            security_group_id: Group to attach; defaults to the plan's group. When both
                are ``None`` (a dry run before the group exists) no group is named.
        """
        group_id = security_group_id or self.security_group_id
        tags = self.tags()
        request = {
            "ImageId": self.ami_id,
            "InstanceType": self.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "UserData": self.user_data,
            "IamInstanceProfile": {"Name": self.settings.instance_profile},
            "InstanceInitiatedShutdownBehavior": "terminate",
            "InstanceMarketOptions": {
                "MarketType": "spot",
                "SpotOptions": {
                    "MaxPrice": f"{self.max_price_usd:g}",
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            },
            "MetadataOptions": {
                "HttpTokens": "required",
                "HttpEndpoint": "enabled",
                "HttpPutResponseHopLimit": 1,
            },
            "BlockDeviceMappings": [
                {
                    "DeviceName": self.root_device_name,
                    "Ebs": {
                        "VolumeSize": self.root_volume_gb,
                        "VolumeType": "gp3",
                        "Encrypted": True,
                        "DeleteOnTermination": True,
                    },
                }
            ],
            "TagSpecifications": [
                {"ResourceType": resource, "Tags": tags}
                for resource in ("instance", "volume", "spot-instances-request")
            ],
        }
        if group_id:
            request["SecurityGroupIds"] = [group_id]
        if self.zone:
            request["Placement"] = {"AvailabilityZone": self.zone}
        if self.settings.key_pair_name:
            request["KeyName"] = self.settings.key_pair_name
        return request

    @property
    def fleet_instance_types(self) -> tuple[str, ...]:
        return self.instance_types or (self.instance_type,)

    def launch_template_data(self, security_group_id: str | None = None) -> dict:
        """Return the ``LaunchTemplateData`` of a fleet: what :meth:`request` sets per instance.

        The instance type, zone, count and spot options move to the fleet request. The
        UserData is base64-encoded here, since CreateLaunchTemplate, unlike RunInstances,
        takes it encoded.
        """
        request = self.request(security_group_id)
        for name in ("MinCount", "MaxCount", "InstanceType", "InstanceMarketOptions", "Placement"):
            request.pop(name, None)
        request["UserData"] = base64.b64encode(request["UserData"].encode("utf-8")).decode("ascii")
        return request

    def fleet_request(self, launch_template_id: str, zones: Sequence[str]) -> dict:
        """Return the ``CreateFleet`` arguments: ``count`` spot instances, one instant request.

        Args:
            launch_template_id: The template from :meth:`launch_template_data`.
            zones: Availability zones to offer; every type is offered in every zone.
        """
        price = f"{self.max_price_usd:g}"
        overrides = [
            {"InstanceType": instance_type, "AvailabilityZone": zone, "MaxPrice": price}
            for instance_type in self.fleet_instance_types
            for zone in zones
        ]
        return {
            "Type": "instant",
            "TargetCapacitySpecification": {
                "TotalTargetCapacity": self.count,
                "SpotTargetCapacity": self.count,
                "OnDemandTargetCapacity": 0,
                "DefaultTargetCapacityType": "spot",
            },
            "SpotOptions": {
                "AllocationStrategy": FLEET_ALLOCATION_STRATEGY,
                "InstanceInterruptionBehavior": "terminate",
                "MaxTotalPrice": f"{self.max_price_usd * self.count:g}",
            },
            "LaunchTemplateConfigs": [
                {
                    "LaunchTemplateSpecification": {
                        "LaunchTemplateId": launch_template_id,
                        "Version": "$Latest",
                    },
                    "Overrides": overrides,
                }
            ],
            "TagSpecifications": [{"ResourceType": "fleet", "Tags": self.tags()}],
        }

    @property
    def launch_template_name(self) -> str:
        """Name of the run's launch template: ``musicgen-<run id>`` in the allowed characters."""
        return "musicgen-" + re.sub(r"[^A-Za-z0-9().\-/_]", "-", self.run_id)[:110]

    def summary(self) -> pd.DataFrame:
        """The facts a user confirms, as ``item``/``value`` rows."""
        if self.count > 1:
            placement = [
                (
                    "workers",
                    f"{self.count}, as one EC2 Fleet request ({FLEET_ALLOCATION_STRATEGY})",
                ),
                ("instance types", ", ".join(self.fleet_instance_types)),
                ("availability zones", "every zone of the region"),
            ]
        else:
            placement = [
                ("instance type", self.instance_type),
                ("availability zone", self.zone or "chosen by EC2"),
            ]
        rows = [
            *placement,
            ("maximum spot price (USD/h)", self.max_price_usd),
            ("current price in zone (USD/h)", self.zone_price_usd),
            ("AMI", self.ami_id),
            ("root volume", f"{self.root_volume_gb} GiB gp3, encrypted"),
            ("instance profile", self.settings.instance_profile),
            (
                "security group",
                self.security_group_id
                or f"{self.settings.security_group_name} (created at launch)",
            ),
            ("repository", f"{self.bootstrap.repo_url} @ {self.bootstrap.repo_commit}"),
            ("job file", f"{self.prompts_path} ({self.songs} songs, {self.audio_s:.0f} s)"),
            ("job file on S3", self.bootstrap.jobs_uri),
            ("output", self.settings.output_uri),
            ("run id", self.run_id),
            ("hard cap (minutes)", self.bootstrap.max_runtime_minutes),
            (
                "auto shutdown",
                "on" if self.bootstrap.auto_shutdown else "OFF: bills until terminated",
            ),
            ("UserData (bytes)", len(self.user_data.encode("utf-8"))),
        ]
        warning = local_repository_warning(self.bootstrap.repo_url)
        if warning:
            rows.append(("WARNING", warning))
        return pd.DataFrame(rows, columns=["item", "value"]).astype({"value": str})

    @property
    def zone_price_usd(self) -> float | None:
        current = self.prices.current
        if self.zone is None or current.empty:
            return self.prices.cheapest_price_usd
        match = current[current["availability_zone"] == self.zone]
        return float(match.iloc[0]["price_usd"]) if len(match) else None


def resolve_ami(settings: Settings, ec2, ssm) -> tuple[str, str, int]:
    """Return ``(ami_id, root_device_name, root_size_gib)`` of the worker image.

    ``AMI_ID`` wins; otherwise the public SSM parameter ``AMI_SSM_PARAMETER`` names it.

    Raises:
        LaunchError: The parameter or the image cannot be found.
    """
    from botocore.exceptions import ClientError

    ami_id = settings.ami_id
    if not ami_id:
        try:
            ami_id = ssm.get_parameter(Name=settings.ami_ssm_parameter)["Parameter"]["Value"]
        except ClientError as error:
            raise LaunchError(
                f"reading the AMI id from SSM parameter {settings.ami_ssm_parameter!r} failed: "
                f"{_error_code(error)}. Set AMI_ID, or fix AMI_SSM_PARAMETER and the region "
                f"({settings.region})"
            ) from error
    try:
        images = ec2.describe_images(ImageIds=[ami_id]).get("Images", [])
    except ClientError as error:
        raise LaunchError(
            f"describing AMI {ami_id} failed: {_error_code(error)}. Check AMI_ID and the region"
        ) from error
    if not images:
        raise LaunchError(f"AMI {ami_id} was not found in {settings.region}; check AMI_ID")
    image = images[0]
    root_name = image.get("RootDeviceName") or "/dev/sda1"
    root_size = 0
    for mapping in image.get("BlockDeviceMappings", []):
        if mapping.get("DeviceName") == root_name:
            root_size = int(mapping.get("Ebs", {}).get("VolumeSize") or 0)
    return ami_id, root_name, root_size


def find_security_group(ec2, name: str) -> str | None:
    """Return the id of the security group called ``name`` in the default VPC, or ``None``."""
    from botocore.exceptions import ClientError

    try:
        groups = ec2.describe_security_groups(
            Filters=[{"Name": "group-name", "Values": [name]}]
        ).get("SecurityGroups", [])
    except ClientError as error:
        raise LaunchError(
            f"looking up security group {name!r} failed: {_error_code(error)}: {error}"
        ) from error
    if not groups:
        return None
    group = groups[0]
    if group.get("IpPermissions"):
        logger.warning(
            "security group %s (%s) has inbound rules; the worker needs none",
            name,
            group["GroupId"],
        )
    return group["GroupId"]


def ensure_security_group(ec2, name: str, tag: str) -> str:
    """Return the id of security group ``name``, creating it with no inbound rules.

    A new group allows all outbound traffic (for uv, git, Hugging Face and S3) and no
    inbound traffic.
    """
    from botocore.exceptions import ClientError

    group_id = find_security_group(ec2, name)
    if group_id:
        return group_id
    try:
        group_id = ec2.create_security_group(
            GroupName=name,
            Description="MusicGen Batch worker: no inbound rules",
            TagSpecifications=[
                {"ResourceType": "security-group", "Tags": [{"Key": TAG_KEY, "Value": tag}]}
            ],
        )["GroupId"]
    except ClientError as error:
        raise LaunchError(
            f"creating security group {name!r} failed: {_error_code(error)}: {error}. Create it "
            "by hand with no inbound rules, or set SECURITY_GROUP_NAME to an existing one"
        ) from error
    logger.info("created security group %s (%s) with no inbound rules", name, group_id)
    return group_id


def local_repository_warning(repo_url: str) -> str | None:
    """Return a warning when an EC2 instance cannot clone ``repo_url``, else ``None``.

    A folder path or a ``file://`` URL only exists on this machine: it is right for a
    drill that runs the UserData here, and wrong for a real worker.
    """
    if repo_url and "://" in repo_url and not repo_url.startswith("file://"):
        return None
    if repo_url and repo_url.startswith("git@"):
        return None
    return (
        f"REPO_URL {repo_url or '(empty)'!r} is local to this machine, so a worker on EC2 "
        "cannot clone it: push to a repository the instance can reach (https, no "
        "credentials) and set REPO_URL"
    )


def plan_launch(
    settings: Settings,
    prices: PriceSummary,
    prompts_path: str | Path,
    songs: int,
    audio_s: float,
    run_id: str,
    ec2,
    ssm,
    root_volume_gb: int = DEFAULT_ROOT_VOLUME_GB,
    max_runtime_minutes: int | None = None,
    auto_shutdown: bool = True,
    bootstrap_options: dict | None = None,
    count: int = 1,
    instance_types: Sequence[str] | None = None,
) -> LaunchPlan:
    """Resolve everything a launch needs; creates nothing and spends nothing.

    Args:
        settings: Effective settings.
        prices: Current prices of ``settings.instance_type``; the cheapest zone within
            the maximum is chosen.
        prompts_path: Local job file (already validated).
        songs: Valid songs in the job file.
        audio_s: Requested audio, seconds.
        run_id: Id of the run.
        ec2: A boto3 EC2 client.
        ssm: A boto3 SSM client, used when ``AMI_ID`` is not set.
        root_volume_gb: Root volume size, GiB; raised to the AMI's own size if larger.
        max_runtime_minutes: Hard cap; ``None`` for the bootstrap default.
        auto_shutdown: Shut the instance down when the bootstrap exits.
        bootstrap_options: More :class:`BootstrapConfig` fields (``work_dir``,
            ``extra_env``, ``shutdown_command`` and so on).
        count: Number of workers on the same job file and output location; above 1
            they start as one EC2 Fleet request.
        instance_types: Instance types a fleet may use; ``settings.instance_types``
            when ``None``.

    Raises:
        ConfigError: The output location is not S3, the repository is unknown, or
            ``count`` is not a positive whole number.
        LaunchError: The AMI or the security group cannot be looked up.
        BootstrapError: The UserData is invalid.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"count={count!r}: expected a whole number of workers, 1 or more")
    if not settings.is_s3:
        raise ConfigError(
            f"output_uri={settings.output_uri!r}: a worker instance can only write to S3; set "
            "MUSICGEN_OUTPUT_URI or -p output_uri to s3://bucket/prefix"
        )
    repo_url, repo_commit = settings.repo_url, settings.repo_commit
    if not (repo_url and repo_commit):
        origin, head = git_repo_source()
        repo_url, repo_commit = repo_url or origin, repo_commit or head
    options = dict(bootstrap_options or {})
    if max_runtime_minutes is not None:
        options["max_runtime_minutes"] = max_runtime_minutes
    bootstrap = BootstrapConfig(
        run_id=run_id,
        repo_url=repo_url or "",
        repo_commit=repo_commit or "",
        output_uri=settings.output_uri,
        model_id=settings.model_id,
        hourly_cost_usd=settings.max_spot_price_usd,
        region=settings.region,
        auto_shutdown=bool(auto_shutdown),
        **options,
    )
    warning = local_repository_warning(bootstrap.repo_url)
    if warning:
        logger.warning("%s", warning)
    user_data = render_user_data(bootstrap)
    ami_id, root_name, ami_root_gb = resolve_ami(settings, ec2, ssm)
    if not isinstance(root_volume_gb, int) or root_volume_gb < 1:
        raise ConfigError(f"root_volume_gb={root_volume_gb!r}: expected a whole number of GiB")
    zones = prices.zones_within_max
    return LaunchPlan(
        settings=settings,
        run_id=run_id,
        zone=zones[0] if zones else prices.cheapest_zone,
        ami_id=ami_id,
        root_device_name=root_name,
        root_volume_gb=max(root_volume_gb, ami_root_gb),
        security_group_id=find_security_group(ec2, settings.security_group_name),
        bootstrap=bootstrap,
        user_data=user_data,
        prompts_path=Path(prompts_path),
        songs=songs,
        audio_s=float(audio_s),
        prices=prices,
        count=count,
        instance_types=tuple(instance_types or settings.instance_types),
    )


def dry_run(plan: LaunchPlan, ec2) -> list[str]:
    """Ask EC2 to validate the request with ``DryRun=True``; nothing is created.

    Returns:
        One line per validated call.

    Raises:
        SpotPriceTooLowError: The maximum is below every zone's price (no call made).
            A fleet skips this check, since the prices cover one instance type only.
        LaunchError: EC2 rejected the request; the message gives its code and reason.
    """
    from botocore.exceptions import ClientError

    if plan.count == 1:
        plan.prices.check_max_price()
    calls = []
    if plan.security_group_id is None:
        calls.append(
            (
                "CreateSecurityGroup",
                lambda: ec2.create_security_group(
                    GroupName=plan.settings.security_group_name,
                    Description="MusicGen Batch worker: no inbound rules",
                    DryRun=True,
                ),
            )
        )
    calls.append(("RunInstances", lambda: ec2.run_instances(**plan.request(), DryRun=True)))
    if plan.count > 1:
        calls.append(
            (
                "CreateLaunchTemplate",
                lambda: ec2.create_launch_template(
                    LaunchTemplateName=plan.launch_template_name,
                    LaunchTemplateData=plan.launch_template_data(),
                    DryRun=True,
                ),
            )
        )
    lines = []
    for name, call in calls:
        try:
            call()
        except ClientError as error:
            if _error_code(error) == "DryRunOperation":
                lines.append(f"{name}: EC2 would accept it (DryRun)")
                continue
            raise _launch_error(plan, error, f"validating {name}") from error
        raise LaunchError(f"{name} with DryRun=True returned without DryRunOperation")
    if plan.security_group_id is None:
        lines.append("RunInstances was validated without a security group; it is created at launch")
    if plan.count > 1:
        lines.append(
            f"CreateFleet for {plan.count} workers over {', '.join(plan.fleet_instance_types)} "
            "is sent at launch, once the launch template exists"
        )
    return lines


def _vcpus(ec2, instance_type: str) -> int | None:
    from botocore.exceptions import ClientError

    try:
        types = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
        return int(types[0]["VCpuInfo"]["DefaultVCpus"])
    except (ClientError, KeyError, IndexError):
        return None


def _launch_error(plan: LaunchPlan, error, action: str, ec2=None) -> LaunchError:
    code = _error_code(error)
    if code in QUOTA_ERROR_CODES:
        vcpus = _vcpus(ec2, plan.instance_type) if ec2 is not None else None
        needed = f"{vcpus} vCPUs" if vcpus else "the instance's vCPUs"
        return QuotaError(
            f"{action} failed: {code}. The spot quota {spot_quota_name(plan.instance_type)!r} "
            f"in {plan.settings.region} is too low for one {plan.instance_type} ({needed} "
            "needed, on top of running spot instances). Request an increase in Service "
            "Quotas; this is not retried"
        )
    if code in ("UnauthorizedOperation", "AccessDenied"):
        fleet = (
            ", ec2:CreateFleet, ec2:CreateLaunchTemplate, ec2:DeleteLaunchTemplate"
            if plan.count > 1
            else ""
        )
        return LaunchError(
            f"{action} failed: {code}. Grant ec2:RunInstances, ec2:CreateTags, "
            f"ec2:CreateSecurityGroup{fleet} and iam:PassRole on the instance profile's role"
        )
    if code == "InvalidParameterValue" and "iamInstanceProfile" in str(error):
        return LaunchError(
            f"{action} failed: instance profile {plan.settings.instance_profile!r} is unknown. "
            "Create it or set INSTANCE_PROFILE"
        )
    return LaunchError(f"{action} failed: {code}: {error}")


@dataclass
class LaunchResult:
    """What a launch did: ids, final states and the messages shown while waiting."""

    run_id: str
    instance_id: str | None = None
    spot_request_id: str | None = None
    instance_state: str | None = None
    request_state: str | None = None
    status_code: str | None = None
    zone: str | None = None
    messages: list[str] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        rows = [
            ("run id", self.run_id),
            ("instance", self.instance_id),
            ("instance state", self.instance_state),
            ("spot request", self.spot_request_id),
            ("request state", self.request_state),
            (
                "status",
                f"{self.status_code}: {explain_status(self.status_code)}"
                if self.status_code
                else None,
            ),
            ("zone", self.zone),
        ]
        rows = [(item, "-" if value is None else str(value)) for item, value in rows]
        return pd.DataFrame(rows, columns=["item", "value"])


def launch(
    plan: LaunchPlan,
    ec2,
    s3_client=None,
    force: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    not_found_grace_s: float = NOT_FOUND_GRACE_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> LaunchResult:
    """Start the worker. This spends money: call it only after the user confirmed.

    Steps: refuse when a worker is pending or running (unless ``force``) or when the
    maximum price is below every zone's price; upload the job file; create the security
    group when missing; submit the spot request; wait for a running instance. A plan
    with ``count`` above 1 starts a fleet with :func:`launch_fleet` instead, and returns
    its :class:`FleetResult`.

    Raises:
        WorkerRunningError: A tagged worker is pending or running and ``force`` is false.
        SpotPriceTooLowError: Refused before any call.
        QuotaError: A spot quota blocks the request (not retried).
        SpotRequestError: The request failed or timed out; it was cancelled and any
            instance it started was terminated.
        LaunchError: Another EC2 error.
        StorageError: The job file could not be uploaded.
    """

    if plan.count > 1:
        return launch_fleet(
            plan,
            ec2,
            s3_client=s3_client,
            force=force,
            timeout_s=timeout_s,
            poll_interval_s=poll_interval_s,
            sleep=sleep,
            clock=clock,
        )
    _refuse_if_busy(plan, ec2, force)
    plan.prices.check_max_price()

    _upload_job_file(plan, s3_client)

    group_id = ensure_security_group(
        ec2, plan.settings.security_group_name, plan.settings.worker_tag
    )
    instance = submit_request(plan, ec2, group_id)
    result = LaunchResult(
        run_id=plan.run_id,
        instance_id=instance["InstanceId"],
        spot_request_id=instance.get("SpotInstanceRequestId"),
        instance_state=instance.get("State", {}).get("Name"),
        zone=instance.get("Placement", {}).get("AvailabilityZone"),
    )
    logger.info(
        "submitted: instance %s, spot request %s", result.instance_id, result.spot_request_id
    )
    return wait_for_worker(
        ec2,
        result,
        plan.prices,
        timeout_s=timeout_s,
        poll_interval_s=poll_interval_s,
        not_found_grace_s=not_found_grace_s,
        sleep=sleep,
        clock=clock,
    )


def _refuse_if_busy(plan: LaunchPlan, ec2, force: bool) -> None:
    """Raise WorkerRunningError when a tagged worker is pending or running, unless ``force``."""
    existing = find_workers(ec2, plan.settings.worker_tag)
    if existing.busy and not force:
        ids = list(existing.active_instances["instance_id"]) + list(
            existing.open_requests["spot_request_id"]
        )
        raise WorkerRunningError(
            f"a worker is already pending or running ({', '.join(ids)}); not launching another. "
            "Shut it down first, or pass -p force true to run two at once"
        )


def _upload_job_file(plan: LaunchPlan, s3_client) -> None:
    store = open_store(plan.settings.output_uri, s3_client=s3_client, region=plan.settings.region)
    jobs_key = f"{RUNS_PREFIX}{plan.run_id}/{JOB_FILE_NAME}"
    store.put_file(plan.prompts_path, jobs_key, "text/plain; charset=utf-8")
    logger.info("uploaded %s to %s", plan.prompts_path, plan.bootstrap.jobs_uri)


@dataclass
class FleetResult:
    """Outcome of a fleet launch: the fleet, its instances and the errors EC2 reported.

    Attributes:
        run_id: Id of the run that every worker of the fleet shares.
        fleet_id: Id of the EC2 Fleet request.
        launch_template_id: Id of the run's launch template (deleted after the request).
        instances: One row per instance: ``instance_id``, ``instance_type``, ``zone``,
            ``state``.
        errors: EC2's reasons for capacity it could not launch, one line each.
        messages: What was seen while waiting.
    """

    run_id: str
    fleet_id: str | None = None
    launch_template_id: str | None = None
    instances: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def instance_ids(self) -> list[str]:
        return [row["instance_id"] for row in self.instances]

    def table(self) -> pd.DataFrame:
        columns = ["instance_id", "instance_type", "zone", "state"]
        return pd.DataFrame(self.instances, columns=columns).fillna("-")


def available_zones(ec2) -> list[str]:
    """Return the region's availability zones that are available, without Local Zones.

    Raises:
        LaunchError: The zones cannot be listed.
    """
    from botocore.exceptions import ClientError

    try:
        found = ec2.describe_availability_zones(
            Filters=[{"Name": "state", "Values": ["available"]}]
        )["AvailabilityZones"]
    except ClientError as error:
        raise LaunchError(
            f"listing availability zones failed: {_error_code(error)}: {error}. "
            "Grant ec2:DescribeAvailabilityZones"
        ) from error
    zones = [
        zone["ZoneName"]
        for zone in found
        if zone.get("ZoneType", "availability-zone") == "availability-zone"
    ]
    return sorted(zones)


def _fleet_errors(response: dict) -> list[str]:
    """Return one line per error in a CreateFleet response: code, type, zone and message."""
    lines = []
    for error in response.get("Errors", []):
        overrides = error.get("LaunchTemplateAndOverrides", {}).get("Overrides", {})
        parts = [overrides.get("InstanceType"), overrides.get("AvailabilityZone")]
        line = error.get("ErrorCode", "Unknown")
        if any(parts):
            line += f" ({' in '.join(part for part in parts if part)})"
        if error.get("ErrorMessage"):
            line += f": {error['ErrorMessage']}"
        lines.append(line)
    return lines


def _delete_launch_template(ec2, template_id: str) -> None:
    """Delete the run's launch template; an error is logged, since it costs nothing."""
    from botocore.exceptions import ClientError

    try:
        ec2.delete_launch_template(LaunchTemplateId=template_id)
        logger.info("deleted launch template %s", template_id)
    except ClientError as error:
        logger.warning(
            "deleting launch template %s failed: %s; delete it in the EC2 console",
            template_id,
            error,
        )


def launch_fleet(
    plan: LaunchPlan,
    ec2,
    s3_client=None,
    force: bool = False,
    zones: Sequence[str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> FleetResult:
    """Start ``plan.count`` workers as one EC2 Fleet request. This spends money.

    Steps:

    1. Refuse when a worker is pending or running, unless ``force``.
    2. Upload the job file, and create the security group when missing.
    3. Create the run's launch template: UserData, tags, IMDSv2, instance profile and
       root volume.
    4. Submit one ``instant`` fleet request for spot capacity over every instance type
       in every zone, each with the maximum price, then delete the template.
    5. Wait until the instances run.

    EC2 may start fewer instances than requested. The reasons are logged and kept in
    ``errors``, and the workers that did start share the songs.

    Args:
        plan: The plan, with ``count`` workers.
        ec2: A boto3 EC2 client.
        s3_client: S3 client for the job file upload.
        force: Launch even when a tagged worker is pending or running.
        zones: Availability zones to offer; every available zone of the region when ``None``.
        timeout_s: Seconds to wait for the instances to run.
        poll_interval_s: Seconds between polls.
        sleep: Sleep function, for tests.
        clock: Monotonic clock, for tests.

    Raises:
        WorkerRunningError: A tagged worker is pending or running and ``force`` is false.
        QuotaError: A spot quota blocks the request.
        SpotRequestError: No instance started, or none ran before ``timeout_s``; any
            instance that did start was terminated.
        LaunchError: Another EC2 error.
        StorageError: The job file could not be uploaded.
    """
    from botocore.exceptions import ClientError

    _refuse_if_busy(plan, ec2, force)
    _upload_job_file(plan, s3_client)
    group_id = ensure_security_group(
        ec2, plan.settings.security_group_name, plan.settings.worker_tag
    )
    zones = list(zones) if zones is not None else available_zones(ec2)
    if not zones:
        raise LaunchError(f"no available zone in {plan.settings.region}; check AWS_REGION")
    try:
        template = ec2.create_launch_template(
            LaunchTemplateName=plan.launch_template_name,
            LaunchTemplateData=plan.launch_template_data(group_id),
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": plan.tags()}],
        )["LaunchTemplate"]
    except ClientError as error:
        raise _launch_error(plan, error, "creating the launch template", ec2) from error
    result = FleetResult(run_id=plan.run_id, launch_template_id=template["LaunchTemplateId"])
    try:
        response = ec2.create_fleet(**plan.fleet_request(result.launch_template_id, zones))
    except ClientError as error:
        raise _launch_error(plan, error, "submitting the fleet request", ec2) from error
    finally:
        # An instant fleet is done when CreateFleet returns, so the template is not needed.
        _delete_launch_template(ec2, result.launch_template_id)
    result.fleet_id = response.get("FleetId")
    result.errors = _fleet_errors(response)
    for launched in response.get("Instances", []):
        overrides = launched.get("LaunchTemplateAndOverrides", {}).get("Overrides", {})
        for instance_id in launched.get("InstanceIds", []):
            result.instances.append(
                {
                    "instance_id": instance_id,
                    "instance_type": launched.get("InstanceType") or overrides.get("InstanceType"),
                    "zone": overrides.get("AvailabilityZone"),
                    "state": None,
                }
            )
    logger.info(
        "fleet %s: %d of %d spot instance(s) started: %s",
        result.fleet_id,
        len(result.instances),
        plan.count,
        ", ".join(result.instance_ids) or "none",
    )
    for line in result.errors:
        logger.warning("fleet %s could not launch: %s", result.fleet_id, line)
    if not result.instances:
        raise SpotRequestError(
            f"the fleet request for {plan.count} spot instance(s) of "
            f"{', '.join(plan.fleet_instance_types)} started none: "
            f"{'; '.join(result.errors) or 'no reason given'}. Raise MAX_SPOT_PRICE_USD, add "
            "types to INSTANCE_TYPES, or try again later"
        )
    return wait_for_fleet(ec2, result, timeout_s, poll_interval_s, sleep, clock)


def wait_for_fleet(
    ec2,
    result: FleetResult,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> FleetResult:
    """Poll the fleet's instances until each runs or has ended.

    Returns:
        ``result`` with each instance's state and zone; at least one instance runs.

    Raises:
        SpotRequestError: No instance runs before ``timeout_s``, or all ended; every
            instance of the fleet was then terminated.
    """
    from botocore.exceptions import ClientError

    started = clock()
    by_id = {row["instance_id"]: row for row in result.instances}

    def fail(reason: str) -> SpotRequestError:
        for instance_id in by_id:
            cancel_and_terminate(ec2, None, instance_id)
        result.messages.append(f"terminated: {reason}")
        return SpotRequestError(
            f"{reason}. Every instance of fleet {result.fleet_id} was terminated; nothing of "
            "this launch keeps billing"
        )

    while True:
        try:
            reservations = ec2.describe_instances(InstanceIds=list(by_id))["Reservations"]
        except ClientError as error:
            if _error_code(error) != "InvalidInstanceID.NotFound":
                raise fail(f"polling failed: {_error_code(error)}: {error}") from error
            reservations = []
        for reservation in reservations:
            for instance in reservation.get("Instances", []):
                row = by_id.get(instance["InstanceId"])
                if row is not None:
                    row["state"] = instance.get("State", {}).get("Name")
                    row["zone"] = (
                        instance.get("Placement", {}).get("AvailabilityZone") or row["zone"]
                    )
                    row["instance_type"] = instance.get("InstanceType") or row["instance_type"]
        states = [row["state"] for row in by_id.values()]
        running = states.count("running")
        if all(state == "running" or state in ENDED_INSTANCE_STATES for state in states):
            if running == 0:
                raise fail(f"every instance of fleet {result.fleet_id} ended before it ran")
            message = f"{running} of {len(states)} instance(s) of fleet {result.fleet_id} running"
            logger.info("%s", message)
            result.messages.append(message)
            return result
        if clock() - started >= timeout_s:
            if running == 0:
                raise fail(f"no instance of fleet {result.fleet_id} ran after {timeout_s:.0f} s")
            message = (
                f"{running} of {len(states)} instance(s) running after {timeout_s:.0f} s; the "
                "others are still starting"
            )
            logger.warning("%s", message)
            result.messages.append(message)
            return result
        sleep(poll_interval_s)


def submit_request(plan: LaunchPlan, ec2, security_group_id: str) -> dict:
    """Submit the spot request (``RunInstances``) once; quota errors are not retried.

    Returns:
        The instance description from the response.

    Raises:
        QuotaError: ``MaxSpotInstanceCountExceeded`` or ``VcpuLimitExceeded``; the
            message names the quota and the vCPUs one instance needs.
        LaunchError: Any other refusal.
    """
    from botocore.exceptions import ClientError

    try:
        response = ec2.run_instances(**plan.request(security_group_id))
    except ClientError as error:
        raise _launch_error(plan, error, "submitting the spot request", ec2) from error
    return response["Instances"][0]


def _describe_request(ec2, request_id: str) -> dict | None:
    """Return the spot request, or ``None`` while EC2 does not know the id yet."""
    from botocore.exceptions import ClientError

    try:
        requests = ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[request_id])
    except ClientError as error:
        if _error_code(error) == "InvalidSpotInstanceRequestID.NotFound":
            return None
        raise
    found = requests.get("SpotInstanceRequests", [])
    return found[0] if found else None


def _instance_state(ec2, instance_id: str) -> tuple[str | None, str | None]:
    """Return ``(state, zone)`` of an instance, ``(None, None)`` while it is unknown."""
    from botocore.exceptions import ClientError

    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as error:
        if _error_code(error) == "InvalidInstanceID.NotFound":
            return None, None
        raise
    for reservation in reservations:
        for instance in reservation.get("Instances", []):
            return (
                instance.get("State", {}).get("Name"),
                instance.get("Placement", {}).get("AvailabilityZone"),
            )
    return None, None


def cancel_and_terminate(ec2, request_id: str | None, instance_id: str | None) -> None:
    """Cancel a spot request and terminate its instance; errors are logged, not raised."""
    from botocore.exceptions import ClientError

    if request_id:
        try:
            ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[request_id])
            logger.info("cancelled spot request %s", request_id)
        except ClientError as error:
            logger.error(
                "cancelling spot request %s failed: %s; cancel it in the EC2 console",
                request_id,
                error,
            )
    if instance_id:
        try:
            ec2.terminate_instances(InstanceIds=[instance_id])
            logger.info("terminated instance %s", instance_id)
        except ClientError as error:
            logger.error(
                "terminating instance %s failed: %s; terminate it in the EC2 console",
                instance_id,
                error,
            )


def wait_for_worker(
    ec2,
    result: LaunchResult,
    prices: PriceSummary | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    not_found_grace_s: float = NOT_FOUND_GRACE_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> LaunchResult:
    """Poll the spot request and the instance until the instance runs.

    A request id unknown to EC2 is normal for ``not_found_grace_s`` seconds. Holding
    codes (``price-too-low``, ``capacity-not-available``, ``capacity-oversubscribed``)
    are reported with their meaning and the current price, and polling goes on. On
    time-out or a terminal state the request is cancelled and its instance terminated.

    Returns:
        ``result`` updated with the final states; its ``messages`` list what was seen.

    Raises:
        SpotRequestError: Time-out, terminal request state, or the instance ended.
    """
    from botocore.exceptions import ClientError

    started = clock()
    last_message = None

    def note(message: str) -> None:
        nonlocal last_message
        if message != last_message:
            logger.info("%s", message)
            result.messages.append(message)
            last_message = message

    def fail(reason: str) -> SpotRequestError:
        cancel_and_terminate(ec2, result.spot_request_id, result.instance_id)
        note(f"cancelled: {reason}")
        return SpotRequestError(
            f"{reason}. The spot request was cancelled and any instance it started was "
            "terminated; nothing of this launch keeps billing"
        )

    while True:
        elapsed = clock() - started
        try:
            if result.spot_request_id:
                request = _describe_request(ec2, result.spot_request_id)
                if request is None:
                    if elapsed > not_found_grace_s:
                        raise fail(
                            f"spot request {result.spot_request_id} is still unknown to EC2 "
                            f"after {elapsed:.0f} s"
                        )
                    note(f"spot request {result.spot_request_id} is not visible yet (normal)")
                else:
                    result.request_state = request.get("State")
                    result.status_code = request.get("Status", {}).get("Code")
                    result.instance_id = request.get("InstanceId") or result.instance_id
                    if result.status_code in HOLDING_CODES and result.request_state == "open":
                        price = prices.cheapest_price_usd if prices is not None else None
                        price_text = f"; cheapest current price ${price:.4f}/h" if price else ""
                        note(
                            f"request {result.spot_request_id} waits: {result.status_code}: "
                            f"{explain_status(result.status_code)}{price_text}"
                        )
                    if result.request_state in TERMINAL_REQUEST_STATES:
                        raise fail(
                            f"spot request {result.spot_request_id} is {result.request_state} "
                            f"({result.status_code}: {explain_status(result.status_code)})"
                        )
            if result.instance_id:
                state, zone = _instance_state(ec2, result.instance_id)
                result.instance_state = state or result.instance_state
                result.zone = zone or result.zone
                if state == "running":
                    note(f"instance {result.instance_id} is running in {result.zone}")
                    return result
                if state in ("shutting-down", "terminated", "stopping", "stopped"):
                    raise fail(f"instance {result.instance_id} is {state} before it ran")
                if state:
                    note(f"instance {result.instance_id} is {state}")
        except ClientError as error:
            raise fail(f"polling failed: {_error_code(error)}: {error}") from error
        if clock() - started >= timeout_s:
            raise fail(
                f"no running instance after {timeout_s:.0f} s (request "
                f"{result.request_state or 'unknown'}, {result.status_code or 'no status'})"
            )
        sleep(poll_interval_s)
