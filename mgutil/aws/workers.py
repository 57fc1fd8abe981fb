"""Find, describe and shut down the worker instances and spot requests of this project.

A worker is an instance or a spot request whose ``Name`` tag equals the configured
worker tag (``WORKER_TAG``). Terminated instances and closed, cancelled or failed
requests are ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd

from mgutil.errors import LaunchError

logger = logging.getLogger(__name__)

TAG_KEY = "Name"
RUN_ID_TAG_KEY = "musicgen-batch:run-id"
# The maximum price is kept on the instance too: RunInstances' spot options are not
# visible on the instance itself.
MAX_PRICE_TAG_KEY = "musicgen-batch:max-price-usd"
LISTED_INSTANCE_STATES = ("pending", "running", "stopping", "stopped")
ACTIVE_INSTANCE_STATES = ("pending", "running")
LISTED_REQUEST_STATES = ("open", "active")
INSTANCE_COLUMNS = [
    "instance_id",
    "state",
    "instance_type",
    "availability_zone",
    "launch_time",
    "spot_price_usd",
    "max_price_usd",
    "public_ip",
    "private_ip",
    "spot_request_id",
    "run_id",
]
REQUEST_COLUMNS = [
    "spot_request_id",
    "state",
    "status_code",
    "meaning",
    "instance_id",
    "max_price_usd",
    "created",
]

# Spot request status codes that keep a request open while EC2 waits.
HOLDING_CODES = {
    "price-too-low": "the maximum price is below the current spot price; the request waits "
    "until the price drops or you raise the maximum",
    "capacity-not-available": "no spare capacity of this type in the zone right now; the "
    "request waits for capacity",
    "capacity-oversubscribed": "more spot requests than spare capacity at this price; the "
    "request waits",
    "pending-evaluation": "EC2 is evaluating the request",
    "pending-fulfillment": "EC2 is launching the instance",
    "not-scheduled-yet": "the request waits for its start date",
    "az-group-constraint": "no capacity for all instances in one zone",
    "placement-group-constraint": "no capacity in the placement group",
    "constraint-not-fulfillable": "a constraint (zone, group) cannot be met",
    "launch-group-constraint": "no capacity for the whole launch group",
}
STATUS_MEANINGS = {
    **HOLDING_CODES,
    "fulfilled": "the instance is running or starting",
    "request-canceled-and-instance-running": "the request was cancelled but its instance "
    "still runs and bills; terminate it",
    "marked-for-stop": "the instance is being stopped",
    "marked-for-termination": "the instance is being terminated",
    "instance-terminated-by-price": "the spot price rose above the maximum; the instance was "
    "terminated",
    "instance-terminated-no-capacity": "EC2 needed the capacity back; the instance was terminated",
    "instance-terminated-capacity-oversubscribed": "the instance was terminated to free "
    "oversubscribed capacity",
    "instance-terminated-by-user": "the instance was terminated (by you or by its own shutdown)",
    "instance-terminated-by-service": "EC2 terminated the instance",
    "instance-stopped-by-user": "the instance was stopped",
    "spot-instance-terminated-by-user": "the instance was terminated (by you or by its own "
    "shutdown)",
    "canceled-before-fulfillment": "the request was cancelled before an instance started",
    "bad-parameters": "the request is invalid (AMI, subnet, profile or other parameter)",
    "system-error": "an EC2 error; try again",
    "schedule-expired": "the request expired before it was fulfilled",
}


def explain_status(code: str | None) -> str:
    """Return a plain-English meaning of a spot request status code."""
    if not code:
        return ""
    return STATUS_MEANINGS.get(code, "see the EC2 documentation on spot request status codes")


def _error_code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", "Unknown"))


def _tag(tags: list[dict] | None, key: str) -> str | None:
    for tag in tags or []:
        if tag.get("Key") == key:
            return tag.get("Value")
    return None


@dataclass
class Workers:
    """Tagged instances and spot requests, as tables (see the ``*_COLUMNS`` constants)."""

    instances: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=INSTANCE_COLUMNS))
    requests: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=REQUEST_COLUMNS))

    @property
    def active_instances(self) -> pd.DataFrame:
        """Instances that are pending or running, so billed or about to be."""
        return self.instances[self.instances["state"].isin(ACTIVE_INSTANCE_STATES)]

    @property
    def open_requests(self) -> pd.DataFrame:
        """Requests that may still start an instance."""
        return self.requests[self.requests["state"] == "open"]

    @property
    def busy(self) -> bool:
        """True when a worker runs or may start: a launch would add a second one."""
        return bool(len(self.active_instances) or len(self.open_requests))

    @property
    def empty(self) -> bool:
        return self.instances.empty and self.requests.empty


def find_workers(ec2, tag: str, zone_prices: dict[str, float] | None = None) -> Workers:
    """Find the tagged instances (pending to stopped) and open or active spot requests.

    Args:
        ec2: A boto3 EC2 client.
        tag: Value of the ``Name`` tag.
        zone_prices: Current spot price per zone, USD per hour, shown as the price a
            running spot instance pays now.

    Raises:
        LaunchError: EC2 refused the describe calls.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    zone_prices = zone_prices or {}
    try:
        requests = []
        paginator = ec2.get_paginator("describe_spot_instance_requests")
        for page in paginator.paginate(
            Filters=[
                {"Name": f"tag:{TAG_KEY}", "Values": [tag]},
                {"Name": "state", "Values": list(LISTED_REQUEST_STATES)},
            ]
        ):
            requests.extend(page.get("SpotInstanceRequests", []))
        instances = []
        for page in ec2.get_paginator("describe_instances").paginate(
            Filters=[
                {"Name": f"tag:{TAG_KEY}", "Values": [tag]},
                {"Name": "instance-state-name", "Values": list(LISTED_INSTANCE_STATES)},
            ]
        ):
            for reservation in page.get("Reservations", []):
                instances.extend(reservation.get("Instances", []))
    except ClientError as error:
        raise LaunchError(
            f"listing workers tagged {TAG_KEY}={tag!r} failed: {_error_code(error)}: {error}. "
            "Check the credentials, the region and the ec2:Describe* permissions"
        ) from error
    except BotoCoreError as error:
        raise LaunchError(f"listing workers tagged {TAG_KEY}={tag!r} failed: {error}") from error

    max_by_request = {r["SpotInstanceRequestId"]: r.get("SpotPrice") for r in requests}
    request_rows = [
        {
            "spot_request_id": r["SpotInstanceRequestId"],
            "state": r.get("State"),
            "status_code": r.get("Status", {}).get("Code"),
            "meaning": explain_status(r.get("Status", {}).get("Code")),
            "instance_id": r.get("InstanceId"),
            "max_price_usd": float(r["SpotPrice"]) if r.get("SpotPrice") else None,
            "created": r.get("CreateTime"),
        }
        for r in requests
    ]
    instance_rows = []
    for instance in instances:
        zone = instance.get("Placement", {}).get("AvailabilityZone")
        request_id = instance.get("SpotInstanceRequestId")
        max_price = max_by_request.get(request_id) or _tag(instance.get("Tags"), MAX_PRICE_TAG_KEY)
        instance_rows.append(
            {
                "instance_id": instance["InstanceId"],
                "state": instance.get("State", {}).get("Name"),
                "instance_type": instance.get("InstanceType"),
                "availability_zone": zone,
                "launch_time": instance.get("LaunchTime"),
                "spot_price_usd": zone_prices.get(zone)
                if instance.get("InstanceLifecycle") == "spot"
                else None,
                "max_price_usd": float(max_price) if max_price else None,
                "public_ip": instance.get("PublicIpAddress"),
                "private_ip": instance.get("PrivateIpAddress"),
                "spot_request_id": request_id,
                "run_id": _tag(instance.get("Tags"), RUN_ID_TAG_KEY),
            }
        )
    return Workers(
        instances=pd.DataFrame(instance_rows, columns=INSTANCE_COLUMNS),
        requests=pd.DataFrame(request_rows, columns=REQUEST_COLUMNS),
    )


@dataclass
class ShutdownResult:
    """What :func:`shut_down_workers` did, and what is left afterwards."""

    cancelled_requests: list[str]
    terminated_instances: list[str]
    remaining: Workers

    def line(self) -> str:
        left = len(self.remaining.instances) + len(self.remaining.requests)
        return (
            f"cancelled {len(self.cancelled_requests)} spot request(s), terminated "
            f"{len(self.terminated_instances)} instance(s); {left} tagged resource(s) left"
        )


def shut_down_workers(ec2, tag: str) -> ShutdownResult:
    """Cancel every tagged spot request and terminate every tagged instance.

    Requests are cancelled first, so none starts a new instance meanwhile. Call this only
    after the user confirmed.

    Raises:
        LaunchError: EC2 refused a call; the message names what is still running.
    """
    from botocore.exceptions import ClientError

    workers = find_workers(ec2, tag)
    request_ids = list(workers.requests["spot_request_id"])
    instance_ids = sorted(
        set(workers.instances["instance_id"])
        | {i for i in workers.requests["instance_id"] if isinstance(i, str) and i}
    )
    try:
        if request_ids:
            ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=request_ids)
            logger.info("cancelled spot request(s) %s", ", ".join(request_ids))
        if instance_ids:
            ec2.terminate_instances(InstanceIds=instance_ids)
            logger.info("terminating instance(s) %s", ", ".join(instance_ids))
    except ClientError as error:
        raise LaunchError(
            f"shutting down workers failed: {_error_code(error)}: {error}. Still tagged: "
            f"requests {request_ids}, instances {instance_ids}; terminate them in the EC2 "
            "console if this persists"
        ) from error
    return ShutdownResult(request_ids, instance_ids, find_workers(ec2, tag))


def uptime_and_cost(
    launch_time: datetime | None, max_price_usd: float, now: datetime | None = None
) -> tuple[float, float]:
    """Return ``(uptime_s, cost_usd)`` of an instance billed at most ``max_price_usd``/h."""
    if launch_time is None or pd.isna(launch_time):
        return 0.0, 0.0
    now = now or datetime.now(UTC)
    uptime_s = max((now - pd.Timestamp(launch_time).to_pydatetime()).total_seconds(), 0.0)
    return uptime_s, uptime_s / 3600.0 * max_price_usd
