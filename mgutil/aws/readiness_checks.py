"""The individual readiness checks behind ``notebooks/01_readiness.ipynb``.

Each check takes the boto3 clients it needs and the :class:`~mgutil.config.Settings`,
and returns :class:`CheckResult` rows instead of raising, so one failed check never
hides the others. Expected AWS errors become ``fail`` rows that name the value at fault
and the fix; :mod:`mgutil.aws.readiness` turns anything unexpected into a ``fail`` row
too, and runs the checks with a deadline.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from mgutil.config import (
    PROJECT_ROOT,
    Settings,
    git_repo_source,
    parse_output_uri,
    resolve_project_path,
)

logger = logging.getLogger(__name__)

PASS = "pass"
WARN = "warn"
FAIL = "fail"

# Service Quotas codes of the spot vCPU quotas, by instance family. EC2 counts spot
# capacity in vCPUs per family group, and new accounts often start at 0 for G and P.
# NOTE: the P (L-7212CCBC) and Standard (L-34B43A08) codes were not confirmed against a
# live account; a code that does not exist gives a warn row.
SPOT_QUOTA_CODES = {
    "g": ("L-3819A6DF", "All G and VT Spot Instance Requests"),
    "vt": ("L-3819A6DF", "All G and VT Spot Instance Requests"),
    "p": ("L-7212CCBC", "All P Spot Instance Requests"),
}
STANDARD_SPOT_QUOTA = (
    "L-34B43A08",
    "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests",
)
_STANDARD_FAMILIES = set("acdhimrtz")

# Placeholder ids for dry runs of calls that need a resource. When EC2 rejects such a
# dry run with a not-found error instead of a permission result, the action is reported
# as unconfirmed (warn), never as allowed.
PLACEHOLDER_INSTANCE_ID = "i-0123456789abcdef0"
PLACEHOLDER_SPOT_REQUEST_ID = "sir-00000000"
PLACEHOLDER_IMAGE_ID = "ami-0123456789abcdef0"

# Error codes for missing, expired or rejected credentials, from STS and the SDK.
_CREDENTIAL_ERROR_CODES = {
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "InvalidAccessKeyId",
    "AuthFailure",
}
_ACCESS_DENIED_CODES = {
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "403",
    "Forbidden",
}
CREDENTIALS_FIX = (
    "configure AWS credentials: set AWS_PROFILE to a profile from ~/.aws/config, run "
    "`aws configure` for access keys, or `aws sso login --profile NAME` when the SSO "
    "session has expired"
)


@dataclass(frozen=True)
class CheckResult:
    """One row of the readiness table.

    Attributes:
        check: Short name of what was checked, such as ``"S3 bucket"``.
        status: ``"pass"``, ``"warn"`` or ``"fail"``.
        found: What the check observed, with the values involved.
        fix: The next step for a ``warn`` or ``fail`` row; empty for ``pass``.
        details: Values for other checks (such as the resolved AMI id); not shown.
    """

    check: str
    status: str
    found: str
    fix: str = ""
    details: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def failed(self) -> bool:
        return self.status == FAIL


def error_code(error) -> str:
    """Return the AWS error code of a botocore ``ClientError``, or ``""``."""
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


def _error_message(error) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Message", "")) or str(error)


def is_access_denied(error) -> bool:
    return error_code(error) in _ACCESS_DENIED_CODES


def is_credentials_error(error) -> bool:
    """Return whether ``error`` means the credentials are missing, expired or invalid."""
    from botocore.exceptions import (
        NoCredentialsError,
        PartialCredentialsError,
        SSOError,
        TokenRetrievalError,
        UnauthorizedSSOTokenError,
    )

    credential_types = (
        NoCredentialsError,
        PartialCredentialsError,
        SSOError,
        TokenRetrievalError,
        UnauthorizedSSOTokenError,
    )
    return isinstance(error, credential_types) or error_code(error) in _CREDENTIAL_ERROR_CODES


def _partition(region: str) -> str:
    """Return the ARN partition of a region: China and GovCloud have their own."""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


# --- Credentials -----------------------------------------------------------------------


def check_credentials(sts) -> CheckResult:
    """Call ``sts:GetCallerIdentity`` and show the account and ARN (never the keys)."""
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.parsers import ResponseParserError

    name = "AWS credentials"
    try:
        identity = sts.get_caller_identity()
    except (ClientError, BotoCoreError, ResponseParserError) as error:
        if is_credentials_error(error):
            return CheckResult(name, FAIL, f"no working credentials: {error}", CREDENTIALS_FIX)
        raise
    return CheckResult(
        name,
        PASS,
        f"account {identity['Account']}, {identity['Arn']}",
        details={"account": identity["Account"], "arn": identity["Arn"]},
    )


# --- EC2 ---------------------------------------------------------------------------------


def _dry_run_calls(ec2, settings: Settings, image_id: str | None) -> list[tuple[str, object]]:
    """Return ``(IAM action, call)`` pairs, each call made with ``DryRun=True``."""
    tags = [{"Key": "Name", "Value": settings.worker_tag}]
    run_arguments = {
        "ImageId": image_id or PLACEHOLDER_IMAGE_ID,
        "InstanceType": settings.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        # The launcher's spot options, instance profile and tags, so the dry run covers
        # iam:PassRole and tagging on launch as well.
        "IamInstanceProfile": {"Name": settings.instance_profile},
        "InstanceMarketOptions": {
            "MarketType": "spot",
            "SpotOptions": {
                "MaxPrice": f"{settings.max_spot_price_usd:g}",
                "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate",
            },
        },
        "TagSpecifications": [
            {"ResourceType": resource, "Tags": tags}
            for resource in ("instance", "volume", "spot-instances-request")
        ],
        "DryRun": True,
    }
    return [
        ("ec2:DescribeInstances", lambda: ec2.describe_instances(DryRun=True)),
        (
            "ec2:DescribeSpotPriceHistory",
            lambda: ec2.describe_spot_price_history(
                InstanceTypes=[settings.instance_type], DryRun=True
            ),
        ),
        (
            "ec2:RunInstances (with iam:PassRole on the instance profile's role)",
            lambda: ec2.run_instances(**run_arguments),
        ),
        (
            "ec2:CreateTags",
            lambda: ec2.create_tags(
                Resources=[PLACEHOLDER_INSTANCE_ID],
                Tags=tags,
                DryRun=True,
            ),
        ),
        (
            "ec2:TerminateInstances",
            lambda: ec2.terminate_instances(InstanceIds=[PLACEHOLDER_INSTANCE_ID], DryRun=True),
        ),
        (
            "ec2:CancelSpotInstanceRequests",
            lambda: ec2.cancel_spot_instance_requests(
                SpotInstanceRequestIds=[PLACEHOLDER_SPOT_REQUEST_ID], DryRun=True
            ),
        ),
    ]


def check_ec2_permissions(ec2, settings: Settings, image_id: str | None = None) -> CheckResult:
    """Dry-run every EC2 call that the launcher makes; nothing is created.

    ``DryRunOperation`` means allowed and ``UnauthorizedOperation`` means denied. A
    normal response also counts as allowed, for servers that ignore ``DryRun`` on
    read-only calls.

    Args:
        ec2: A boto3 EC2 client.
        settings: The settings; the instance type and maximum price go into the
            dry-run launch.
        image_id: The worker AMI; a placeholder when unknown, in which case EC2 may
            reject the dry-run launch for the image before it checks permissions.
    """
    from botocore.exceptions import ClientError

    allowed, denied, unclear = [], [], []
    for action, call in _dry_run_calls(ec2, settings, image_id):
        try:
            call()
        except ClientError as error:
            code = error_code(error)
            if code == "DryRunOperation":
                allowed.append(action)
            elif code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
                denied.append(action)
            else:
                unclear.append(f"{action} ({code}: {_error_message(error)})")
        else:
            allowed.append(action)
    name = "EC2 permissions"
    found = f"allowed: {', '.join(allowed) or 'none'}"
    if denied:
        return CheckResult(
            name,
            FAIL,
            f"denied: {', '.join(denied)}; {found}",
            f"add {', '.join(denied)} to the IAM policy of the user or role you run as; "
            "`aws sts decode-authorization-message` explains a denial in detail",
        )
    if unclear:
        return CheckResult(
            name,
            WARN,
            f"could not confirm: {'; '.join(unclear)}; {found}",
            "EC2 rejected these dry runs for a parameter before checking permissions: "
            "fix the AMI, instance type and IAM instance profile rows if they fail, else check "
            "these actions with the IAM policy simulator",
        )
    return CheckResult(name, PASS, found)


def resolve_ami_id(ssm, settings: Settings) -> tuple[str, str]:
    """Return the configured AMI id, or the one in the SSM parameter, and its source."""
    if settings.ami_id:
        return settings.ami_id, "AMI_ID"
    parameter = ssm.get_parameter(Name=settings.ami_ssm_parameter)["Parameter"]
    return parameter["Value"].strip(), f"SSM parameter {settings.ami_ssm_parameter}"


def check_ami(ec2, ssm, settings: Settings) -> CheckResult:
    """Check that the worker AMI exists in the region, is available and is x86_64.

    The AMI is ``AMI_ID`` when set, else the value of the public SSM parameter
    ``AMI_SSM_PARAMETER`` (the newest AWS Deep Learning AMI).
    """
    from botocore.exceptions import ClientError

    name = "AMI"
    try:
        image_id, source = resolve_ami_id(ssm, settings)
    except ClientError as error:
        code = error_code(error)
        if code in ("ParameterNotFound", "ValidationException"):
            return CheckResult(
                name,
                FAIL,
                f"SSM parameter {settings.ami_ssm_parameter!r} not found in {settings.region}",
                "fix AMI_SSM_PARAMETER (AWS lists the Deep Learning AMI parameters in the DLAMI "
                "release notes), or set AMI_ID to an AMI id in this region",
            )
        if is_access_denied(error):
            return CheckResult(
                name,
                FAIL,
                f"reading SSM parameter {settings.ami_ssm_parameter!r} was denied ({code})",
                "add ssm:GetParameter to your IAM policy, or set AMI_ID",
            )
        raise
    try:
        images = ec2.describe_images(ImageIds=[image_id]).get("Images", [])
    except ClientError as error:
        if error_code(error) not in ("InvalidAMIID.NotFound", "InvalidAMIID.Malformed"):
            raise
        images = []
    if not images:
        return CheckResult(
            name,
            FAIL,
            f"AMI {image_id} (from {source}) does not exist in {settings.region}",
            "AMI ids differ between regions: use the id of this AMI in "
            f"{settings.region}, or leave AMI_ID empty to use the newest Deep Learning AMI",
        )
    image = images[0]
    description = f"{image_id} ({image.get('Name', 'no name')}, from {source})"
    architecture = image.get("Architecture", "unknown")
    if architecture != "x86_64":
        return CheckResult(
            name,
            FAIL,
            f"{description} is {architecture}, not x86_64",
            "choose an x86_64 AMI: GPU instance types such as g4dn and g5 are x86_64",
        )
    state = image.get("State", "available")
    if state != "available":
        return CheckResult(
            name,
            FAIL,
            f"{description} is {state}",
            "wait until the AMI is available, or choose another AMI",
        )
    return CheckResult(name, PASS, f"{description}, x86_64", details={"image_id": image_id})


def check_instance_type(ec2, settings: Settings) -> CheckResult:
    """Check that the instance type is offered in the region; list its zones."""
    name = "Instance type"
    paginator = ec2.get_paginator("describe_instance_type_offerings")
    zones = []
    pages = paginator.paginate(
        LocationType="availability-zone",
        Filters=[{"Name": "instance-type", "Values": [settings.instance_type]}],
    )
    for page in pages:
        zones.extend(item["Location"] for item in page.get("InstanceTypeOfferings", []))
    if not zones:
        return CheckResult(
            name,
            FAIL,
            f"{settings.instance_type} is not offered in {settings.region}",
            "choose another INSTANCE_TYPE (such as g4dn.xlarge or g5.xlarge) or another "
            "AWS_REGION where it is offered",
        )
    return CheckResult(
        name,
        PASS,
        f"{settings.instance_type} is offered in {len(zones)} zone(s): {', '.join(sorted(zones))}",
        details={"zones": sorted(zones)},
    )


def check_spot_price(ec2, settings: Settings) -> CheckResult:
    """Compare the current spot price of each zone with ``MAX_SPOT_PRICE_USD``.

    Fails when no zone has a price at or below the maximum, since a request at that
    price would never be fulfilled.
    """
    from mgutil.aws.pricing import current_spot_prices

    name = "Spot price"
    prices = current_spot_prices(ec2, settings.instance_type)
    maximum = settings.max_spot_price_usd
    if prices.empty:
        return CheckResult(
            name,
            FAIL,
            f"no Linux/UNIX spot price for {settings.instance_type} in {settings.region} "
            "in the last day",
            "spot capacity is not sold for this type here: choose another INSTANCE_TYPE or AWS_REGION",
        )
    listing = ", ".join(
        f"{row.availability_zone} ${_usd(row.price_usd)}" for row in prices.itertuples()
    )
    cheapest = prices.iloc[0]
    within = prices[prices["price_usd"] <= maximum]
    if within.empty:
        return CheckResult(
            name,
            FAIL,
            f"every zone is above the maximum of ${_usd(maximum)}/h: {listing}",
            f"raise MAX_SPOT_PRICE_USD to at least {_usd(cheapest['price_usd'])}, or choose "
            "another INSTANCE_TYPE or AWS_REGION",
        )
    return CheckResult(
        name,
        PASS,
        f"{len(within)} of {len(prices)} zone(s) at or below the maximum of ${_usd(maximum)}/h; "
        f"USD per hour: {listing}",
    )


def spot_quota_code(instance_type: str) -> tuple[str, str] | None:
    """Return ``(quota code, quota name)`` of the spot vCPU quota for an instance type.

    ``None`` for families with a quota of their own that this check does not know
    (such as Inf, Trn, DL, F and X).
    """
    family = re.match(r"[a-z]*", instance_type).group(0)
    if not family or family.startswith(("dl", "trn", "inf")):
        return None
    if family.startswith(("g", "vt")):
        return SPOT_QUOTA_CODES["g"]
    if family.startswith("p"):
        return SPOT_QUOTA_CODES["p"]
    if family[0] in _STANDARD_FAMILIES:
        return STANDARD_SPOT_QUOTA
    return None


def check_spot_quota(quotas, ec2, settings: Settings) -> CheckResult:
    """Compare the spot vCPU quota of the instance family with the type's vCPUs.

    Warns, not fails, when the quota cannot be read, since Service Quotas may be denied
    to a user who can still launch.

    Args:
        quotas: A boto3 ``service-quotas`` client.
        ec2: A boto3 EC2 client, for the vCPUs of the instance type.
        settings: The settings.
    """
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.parsers import ResponseParserError

    name = "Spot vCPU quota"
    quota = spot_quota_code(settings.instance_type)
    if quota is None:
        return CheckResult(
            name,
            WARN,
            f"no known spot quota code for {settings.instance_type}",
            "check the spot vCPU quota of this family in the Service Quotas console",
        )
    quota_code, quota_name = quota
    try:
        described = ec2.describe_instance_types(InstanceTypes=[settings.instance_type])
    except ClientError as error:
        if error_code(error) != "InvalidInstanceType":
            raise
        return CheckResult(
            name,
            WARN,
            f"not checked: {settings.instance_type} is not an instance type in {settings.region}",
            "fix the Instance type row first",
        )
    vcpus = described["InstanceTypes"][0]["VCpuInfo"]["DefaultVCpus"]
    try:
        value = quotas.get_service_quota(ServiceCode="ec2", QuotaCode=quota_code)["Quota"]["Value"]
    except (ClientError, BotoCoreError, ResponseParserError) as first_error:
        # An account that never changed a quota may only have the AWS default.
        try:
            response = quotas.get_aws_default_service_quota(ServiceCode="ec2", QuotaCode=quota_code)
            value = response["Quota"]["Value"]
        except (ClientError, BotoCoreError, ResponseParserError) as error:
            fix = (
                "add servicequotas:GetServiceQuota to your IAM policy, or check "
                f"'{quota_name}' ({quota_code}) in the Service Quotas console"
            )
            return CheckResult(
                name,
                WARN,
                f"could not read '{quota_name}' ({quota_code}): {_short(first_error, 160)}; "
                f"nor its default: {_short(error, 120)}",
                fix,
            )
    request_fix = (
        f"request at least {vcpus} vCPUs: `aws service-quotas request-service-quota-increase "
        f"--region {settings.region} --service-code ec2 --quota-code {quota_code} "
        f"--desired-value {vcpus}` (approval can take a day)"
    )
    found = f"'{quota_name}' is {value:g} vCPUs; {settings.instance_type} needs {vcpus}"
    if value < vcpus:
        return CheckResult(name, FAIL, found, request_fix)
    return CheckResult(name, PASS, found)


def _usd(value: float) -> str:
    """Format a price in USD, keeping the digits of prices below a tenth of a cent."""
    return f"{value:.4f}" if value >= 0.001 else f"{value:.2g}"


def _short(error: BaseException, limit: int = 200) -> str:
    """Return a one-line error text, cut to ``limit`` characters (HTML pages included)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


# --- IAM ---------------------------------------------------------------------------------


def _bucket_resources(settings: Settings) -> tuple[str, str]:
    """Return the ARNs of the output bucket and of the objects under its prefix."""
    _, bucket, prefix = parse_output_uri(settings.output_uri)
    partition = _partition(settings.region)
    return f"arn:{partition}:s3:::{bucket}", f"arn:{partition}:s3:::{bucket}/{prefix}*"


def check_instance_profile(iam, settings: Settings) -> CheckResult:
    """Check that the instance profile exists, has a role, and that the role can use S3.

    The role's policies are simulated for ``s3:PutObject`` and ``s3:GetObject`` on the
    output prefix and ``s3:ListBucket`` on the bucket: the worker needs all three, since
    HEAD needs ``s3:GetObject`` and S3 returns 403 instead of 404 for a missing key
    without ``s3:ListBucket``. Warns when the simulation is unavailable.
    """
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.parsers import ResponseParserError

    name = "IAM instance profile"
    profile_name = settings.instance_profile
    try:
        profile = iam.get_instance_profile(InstanceProfileName=profile_name)["InstanceProfile"]
    except ClientError as error:
        if error_code(error) in ("NoSuchEntity", "NoSuchEntityException"):
            return CheckResult(
                name,
                FAIL,
                f"instance profile {profile_name!r} does not exist",
                f"create it and add a role with S3 access: `aws iam create-instance-profile "
                f"--instance-profile-name {profile_name}` then `aws iam "
                f"add-role-to-instance-profile --instance-profile-name {profile_name} "
                "--role-name ROLE`; or set INSTANCE_PROFILE to an existing profile",
            )
        if is_access_denied(error):
            return CheckResult(
                name,
                WARN,
                f"reading instance profile {profile_name!r} was denied",
                "add iam:GetInstanceProfile to your IAM policy to check the worker's role",
            )
        raise
    roles = profile.get("Roles", [])
    if not roles:
        return CheckResult(
            name,
            FAIL,
            f"instance profile {profile_name!r} has no role",
            f"`aws iam add-role-to-instance-profile --instance-profile-name {profile_name} "
            "--role-name ROLE` with a role that can read and write the output bucket",
        )
    role = roles[0]
    found = f"profile {profile_name!r} with role {role['RoleName']!r}"
    if not settings.is_s3:
        return CheckResult(
            name,
            WARN,
            f"{found}; S3 access not simulated: the output location is a local folder",
            "set MUSICGEN_OUTPUT_URI=s3://BUCKET/PREFIX so the worker's songs outlive the instance",
        )
    bucket_arn, objects_arn = _bucket_resources(settings)
    decisions = {}
    try:
        for actions, resource in (
            (["s3:PutObject", "s3:GetObject"], objects_arn),
            (["s3:ListBucket"], bucket_arn),
        ):
            response = iam.simulate_principal_policy(
                PolicySourceArn=role["Arn"], ActionNames=actions, ResourceArns=[resource]
            )
            for evaluation in response.get("EvaluationResults", []):
                decisions[evaluation["EvalActionName"]] = evaluation["EvalDecision"]
    except (ClientError, BotoCoreError, ResponseParserError) as error:
        fix = (
            "add iam:SimulatePrincipalPolicy to your IAM policy to check this, or make sure the "
            f"role allows s3:PutObject and s3:GetObject on {objects_arn} and s3:ListBucket on "
            f"{bucket_arn}"
        )
        return CheckResult(
            name, WARN, f"{found}; policy simulation unavailable: {_short(error)}", fix
        )
    missing = [action for action, decision in sorted(decisions.items()) if decision != "allowed"]
    if missing:
        return CheckResult(
            name,
            FAIL,
            f"{found}; the role is not allowed {', '.join(missing)}",
            f"attach a policy to role {role['RoleName']!r} that allows s3:PutObject and "
            f"s3:GetObject on {objects_arn} and s3:ListBucket on {bucket_arn}",
        )
    return CheckResult(
        name, PASS, f"{found}; allowed s3:PutObject, s3:GetObject, s3:ListBucket on the output"
    )


# --- S3 and the local output folder ------------------------------------------------------


def _bucket_region(response: dict) -> str | None:
    region = response.get("BucketRegion")
    if not region:
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        region = headers.get("x-amz-bucket-region")
    return region


def check_bucket(s3, settings: Settings) -> CheckResult:
    """Check that the output bucket exists, is reachable, and is in the expected region."""
    from botocore.exceptions import ClientError

    name = "S3 bucket"
    _, bucket, prefix = parse_output_uri(settings.output_uri)
    create = (
        f"`aws s3api create-bucket --bucket {bucket} --region {settings.region}"
        + (
            ""
            if settings.region == "us-east-1"
            else f" --create-bucket-configuration LocationConstraint={settings.region}"
        )
        + "`"
    )
    try:
        response = s3.head_bucket(Bucket=bucket)
    except ClientError as error:
        code = error_code(error)
        if code in ("404", "NoSuchBucket", "NotFound"):
            return CheckResult(
                name,
                FAIL,
                f"bucket {bucket!r} does not exist",
                f"create it with {create}, or fix MUSICGEN_OUTPUT_URI",
            )
        if code in ("403", "AccessDenied", "Forbidden"):
            return CheckResult(
                name,
                FAIL,
                f"access to bucket {bucket!r} denied (403): it belongs to another account, or "
                "you lack s3:ListBucket",
                f"grant s3:ListBucket on arn:{_partition(settings.region)}:s3:::{bucket}, or "
                "choose a bucket of your own in MUSICGEN_OUTPUT_URI",
            )
        raise
    region = _bucket_region(response) or "unknown"
    found = f"bucket {bucket!r} exists in {region}; prefix {prefix or '(none)'!r}"
    if region != "unknown" and region != settings.region:
        return CheckResult(
            name,
            WARN,
            f"{found}, not in {settings.region}: the worker's uploads cross regions, which adds "
            "transfer cost and latency",
            f"use a bucket in {settings.region}, or set AWS_REGION={region}",
            details={"bucket": bucket},
        )
    return CheckResult(name, PASS, found, details={"bucket": bucket})


def check_public_access(s3, settings: Settings) -> CheckResult:
    """Check that the bucket blocks public access (all four settings)."""
    from botocore.exceptions import ClientError

    name = "S3 public access"
    _, bucket, _ = parse_output_uri(settings.output_uri)
    fix = (
        f"`aws s3api put-public-access-block --bucket {bucket} --public-access-block-configuration "
        "BlockPublicAcls=true,IgnorePublicAcls=true,BlockPublicPolicy=true,RestrictPublicBuckets=true`"
    )
    try:
        response = s3.get_public_access_block(Bucket=bucket)
    except ClientError as error:
        code = error_code(error)
        if code == "NoSuchPublicAccessBlockConfiguration":
            return CheckResult(
                name,
                WARN,
                f"bucket {bucket!r} has no public access block of its own (an account-wide block "
                "may still apply)",
                fix,
            )
        if is_access_denied(error):
            return CheckResult(
                name,
                WARN,
                f"reading the public access block of {bucket!r} was denied",
                "add s3:GetBucketPublicAccessBlock to your IAM policy to check it",
            )
        raise
    settings_found = response.get("PublicAccessBlockConfiguration", {})
    open_settings = sorted(key for key, value in settings_found.items() if not value)
    if open_settings:
        return CheckResult(
            name,
            WARN,
            f"bucket {bucket!r} does not set {', '.join(open_settings)}: songs could be made public",
            fix,
        )
    return CheckResult(name, PASS, f"bucket {bucket!r} blocks all public access")


def check_s3_probe(s3, settings: Settings) -> CheckResult:
    """Put a probe object under the output prefix, read it back with HEAD, and delete it.

    This runs with your own credentials, not the instance role; the IAM check covers the
    role. A 403 from HEAD usually means ``s3:GetObject`` is missing.
    """
    from botocore.exceptions import ClientError

    name = "S3 write probe"
    _, bucket, prefix = parse_output_uri(settings.output_uri)
    key = f"{prefix}.readiness-probe-{uuid.uuid4().hex}"
    location = f"s3://{bucket}/{key}"
    body = b"musicgen-batch readiness probe\n"
    step = "put"
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        step = "head"
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        code = error_code(error)
        if code in _ACCESS_DENIED_CODES:
            action = "s3:PutObject" if step == "put" else "s3:GetObject (HEAD needs it)"
            return CheckResult(
                name,
                FAIL,
                f"{step.upper()} {location} denied ({code})",
                f"grant {action} on arn:{_partition(settings.region)}:s3:::{bucket}/{prefix}* to "
                "the user or role you run as",
            )
        if code in ("NoSuchBucket", "404"):
            return CheckResult(
                name,
                FAIL,
                f"{step.upper()} {location} failed: {code}",
                "fix the S3 bucket row first",
            )
        raise
    size = head.get("ContentLength")
    try:
        s3.delete_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if not is_access_denied(error):
            raise
        return CheckResult(
            name,
            WARN,
            f"put and HEAD of {location} work, but deleting it was denied",
            f"delete the probe object by hand (`aws s3 rm {location}`); the worker itself "
            "never deletes",
        )
    if size != len(body):
        return CheckResult(
            name,
            FAIL,
            f"HEAD of {location} reported {size} bytes, expected {len(body)}",
            "check for an S3 proxy or gateway that rewrites objects",
        )
    return CheckResult(
        name, PASS, f"put, HEAD and delete of a probe object under s3://{bucket}/{prefix}"
    )


def check_local_folder(settings: Settings) -> CheckResult:
    """Check that the local output folder can be created and written."""
    _, folder, _ = parse_output_uri(settings.output_uri)
    name = "Output folder"
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".readiness-probe-"):
            pass
    except OSError as error:
        return CheckResult(
            name,
            FAIL,
            f"cannot write to {path}: {error.strerror or error}",
            "fix the folder's permissions, or choose another MUSICGEN_OUTPUT_URI",
        )
    return CheckResult(name, PASS, f"{path} is writable")


def local_output_rows(settings: Settings) -> list[CheckResult]:
    """Return the S3 rows for a local output folder: each a ``warn`` with the reason."""
    _, folder, _ = parse_output_uri(settings.output_uri)
    reason = f"skipped: the output location is the local folder {folder}"
    fix = (
        "a spot worker's disk is lost when the instance ends: set "
        "MUSICGEN_OUTPUT_URI=s3://BUCKET/PREFIX before launching"
    )
    return [
        CheckResult("S3 bucket", WARN, reason, fix),
        CheckResult("S3 public access", WARN, reason, fix),
        check_local_folder(settings),
    ]


def check_output(s3, settings: Settings) -> list[CheckResult]:
    """Run the S3 checks in order, or the local folder check, and return their rows.

    Later S3 checks are not run when the bucket is missing, so one cause gives one
    ``fail`` row.
    """
    if not settings.is_s3:
        return local_output_rows(settings)
    bucket = check_bucket(s3, settings)
    if bucket.failed:
        reason = "not run: the S3 bucket check failed"
        return [
            bucket,
            CheckResult("S3 public access", WARN, reason, "fix the S3 bucket row first"),
            CheckResult("S3 write probe", WARN, reason, "fix the S3 bucket row first"),
        ]
    return [bucket, check_public_access(s3, settings), check_s3_probe(s3, settings)]


# --- Job file ----------------------------------------------------------------------------


def check_job_file(prompts_path: str | Path, settings: Settings) -> CheckResult:
    """Parse the job file; show the number of songs and seconds of audio requested."""
    from mgutil.errors import JobFileError
    from mgutil.jobs import GenerationSettings, read_job_file

    name = "Job file"
    path = resolve_project_path(prompts_path)
    try:
        job_file = read_job_file(
            path,
            model_id=settings.model_id,
            settings=GenerationSettings(),
            max_duration_s=settings.max_duration_s,
        )
    except JobFileError as error:
        return CheckResult(
            name,
            FAIL,
            f"{path}: {'; '.join(str(item) for item in error.errors)}",
            "create the file or pass another one as the prompts_path parameter",
        )
    if job_file.errors:
        shown = job_file.errors[:3]
        more = len(job_file.errors) - len(shown)
        found = f"{path}: {len(job_file.errors)} invalid line(s): " + "; ".join(
            f"line {error.line_number}: {error.reason}" for error in shown
        )
        if more:
            found += f"; and {more} more"
        fix = "; ".join(f"line {error.line_number}: {error.fix}" for error in shown)
        return CheckResult(name, FAIL, found, fix)
    if not job_file.jobs:
        return CheckResult(
            name,
            WARN,
            f"{path} has no songs",
            "add lines 'PROMPT ; DURATION_SECONDS ; FILE_NAME'",
        )
    total_s = job_file.total_duration_s
    return CheckResult(
        name,
        PASS,
        f"{path}: {len(job_file.jobs)} song(s), {total_s:g} s of audio ({total_s / 60:.1f} min)",
        details={"songs": len(job_file.jobs), "total_duration_s": total_s},
    )


# --- Source for the bootstrap -----------------------------------------------------------

_SCP_URL = re.compile(r"^[\w.-]+@[\w.-]+:[\w./~-]+$")


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "-C", str(root), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
        # No credential prompt can block a notebook cell; nothing here needs the network.
        env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
    )


def _url_problem(url: str) -> tuple[str, str] | None:
    """Return ``(status, reason)`` when the URL is not one an instance can clone."""
    if _SCP_URL.match(url) or url.startswith("ssh://"):
        return (
            WARN,
            "is an SSH URL: the instance has no SSH key, so the clone fails for a private repository",
        )
    parsed = urlparse(url)
    if parsed.scheme != "https" or not parsed.netloc:
        return FAIL, "is not an https:// URL the instance can reach"
    if len([part for part in parsed.path.split("/") if part]) < 2:
        return FAIL, "has no owner/repository path"
    if parsed.password or (parsed.username and parsed.username != "git"):
        # A token in the URL would be copied into the instance's user data.
        return FAIL, "contains credentials"
    return None


def _normalize_url(url: str) -> str:
    """Return ``host/owner/repo`` for https, ssh:// and ``git@host:owner/repo`` URLs.

    An ``origin`` cloned over SSH and a REPO_URL over https name the same repository.
    """
    url = url.strip()
    scp = re.match(r"^[\w.-]+@([\w.-]+):(.*)$", url)
    if scp and "://" not in url:
        host, path = scp.groups()
    else:
        parsed = urlparse(url)
        host, path = parsed.hostname or "", parsed.path
    path = path.strip("/").removesuffix(".git")
    return f"{host}/{path}".lower()


def check_source(settings: Settings, root: str | Path = PROJECT_ROOT) -> CheckResult:
    """Check the repository URL and commit that the instance's bootstrap clones.

    The URL must be an https URL with an owner and repository, and the commit must exist
    in the local checkout and be on a remote-tracking branch, since the instance can only
    clone what was pushed. Only local git data is read; no network call is made.

    Args:
        settings: The settings; ``REPO_URL`` and ``REPO_COMMIT`` default to the
            checkout's ``origin`` and ``HEAD``.
        root: The local checkout.
    """
    name = "Source for the bootstrap"
    root = Path(root)
    origin_url, head = git_repo_source(root)
    url = settings.repo_url or origin_url
    commit = settings.repo_commit or head
    if not url:
        return CheckResult(
            name,
            FAIL,
            f"no REPO_URL and no 'origin' remote in {root}",
            "push the project to a repository the instance can clone and set REPO_URL "
            "(or `git remote add origin URL`)",
        )
    shown_url = _redact_url(url)
    problem = _url_problem(url)
    if problem and problem[0] == FAIL:
        return CheckResult(
            name,
            FAIL,
            f"REPO_URL {shown_url!r} {problem[1]}",
            "set REPO_URL to the https clone URL, such as https://github.com/OWNER/REPO.git",
        )
    if not commit:
        return CheckResult(
            name,
            FAIL,
            f"no REPO_COMMIT and no HEAD commit in {root}",
            "commit your work, or set REPO_COMMIT",
        )
    resolved = _git(root, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if resolved.returncode != 0:
        return CheckResult(
            name,
            FAIL,
            f"commit {commit!r} does not exist in {root}",
            "fetch it, or set REPO_COMMIT to a commit of this repository",
        )
    sha = resolved.stdout.strip()
    remotes = {}
    for line in _git(root, "remote", "-v").stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            remotes[parts[0]] = parts[1]
    branches = [
        branch.strip()
        for branch in _git(root, "branch", "-r", "--contains", sha).stdout.splitlines()
        if branch.strip() and "->" not in branch
    ]
    matching = [
        remote
        for remote, remote_url in remotes.items()
        if _normalize_url(remote_url) == _normalize_url(url)
    ]
    on_matching = [b for b in branches if b.split("/", 1)[0] in matching]
    found = f"{shown_url} at {sha[:12]}"
    if not branches:
        return CheckResult(
            name,
            FAIL,
            f"{found}: the commit is on no remote-tracking branch, so it was never pushed",
            "`git push` the branch, then run this check again",
        )
    if matching and not on_matching:
        return CheckResult(
            name,
            FAIL,
            f"{found}: the commit is not on a branch of {', '.join(matching)} (only on "
            f"{', '.join(branches)})",
            f"`git push {matching[0]}` the branch that contains it",
        )
    if problem:
        return CheckResult(
            name, WARN, f"{found}; REPO_URL {problem[1]}", "use the https clone URL for REPO_URL"
        )
    if not matching:
        return CheckResult(
            name,
            WARN,
            f"{found}: the commit is on {', '.join(branches)}, but REPO_URL is not a remote of "
            "this checkout, so its presence there is unconfirmed",
            "check that the commit was pushed to REPO_URL",
        )
    return CheckResult(name, PASS, f"{found}, on {', '.join(on_matching)}")


def _redact_url(url: str) -> str:
    """Hide a password or token in a URL, so the table never shows a secret."""
    parsed = urlparse(url)
    if parsed.password or (parsed.username and parsed.scheme in ("http", "https")):
        host = parsed.hostname or ""
        if parsed.port:
            host = f"{host}:{parsed.port}"
        return parsed._replace(netloc=f"***@{host}").geturl()
    return url
