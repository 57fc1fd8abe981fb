"""Tests of the AWS readiness check against the moto server and, for responses that moto
cannot produce, botocore's Stubber with the error shapes that AWS returns."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import boto3
import nbformat
import pytest
from botocore.stub import Stubber

from mgutil.aws.readiness import (
    FAIL,
    PASS,
    WARN,
    CheckResult,
    raise_for_failures,
    results_table,
    run_guarded,
    run_readiness_checks,
    summary_line,
)
from mgutil.aws.readiness_checks import (
    check_ec2_permissions,
    check_instance_profile,
    check_s3_probe,
    check_source,
    check_spot_quota,
    spot_quota_code,
)
from mgutil.config import PROJECT_ROOT, Settings
from mgutil.errors import ReadinessError

REGION = "us-east-1"
BUCKET = "musicgen-readiness"
PROFILE = "musicgen-worker"
# AMIs that moto ships: an x86_64 Ubuntu Deep Learning AMI and an arm64 Amazon Linux.
MOTO_DLAMI = "ami-dca37ea5"
MOTO_ARM64_AMI = "ami-0e9271c829888680e"
REPO_URL = "https://github.com/example/musicgen-batch.git"
NOTEBOOK = PROJECT_ROOT / "notebooks" / "01_readiness.ipynb"
JOB_LINES = "calm piano ; 30 ; calm-piano\nupbeat synthwave ; 45\n"
# The two rows whose APIs moto does not implement: Service Quotas has no EC2 quotas and IAM has no
# policy simulation there, so they warn instead of failing.
MOTO_WARN_ROWS = {"Spot vCPU quota", "IAM instance profile"}


def _git(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@pytest.fixture(scope="session")
def pushed_repo(tmp_path_factory) -> Path:
    """A checkout whose HEAD is on origin/main, with origin set to an https URL.

    The push goes to a bare repository in the temporary folder; the URL is changed
    afterwards, so the check finds a pushed commit without any network access.
    """
    base = tmp_path_factory.mktemp("repo")
    remote, checkout = base / "remote.git", base / "checkout"
    _git(base, "init", "-q", "--bare", str(remote))
    _git(base, "init", "-q", "-b", "main", str(checkout))
    (checkout / "README.md").write_text("songs\n")
    _git(checkout, "add", "README.md")
    _git(checkout, "commit", "-q", "-m", "First")
    _git(checkout, "remote", "add", "origin", str(remote))
    _git(checkout, "push", "-q", "origin", "main")
    _git(checkout, "remote", "set-url", "origin", REPO_URL)
    return checkout


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(JOB_LINES)
    return path


@pytest.fixture
def healthy(aws, monkeypatch, prompts_file, pushed_repo):
    """A moto account where every check that moto supports passes."""
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=BUCKET)
    s3.put_public_access_block(
        Bucket=BUCKET,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    iam = boto3.client("iam", region_name=REGION)
    iam.create_role(RoleName="musicgen-worker-role", AssumeRolePolicyDocument="{}")
    iam.create_instance_profile(InstanceProfileName=PROFILE)
    iam.add_role_to_instance_profile(InstanceProfileName=PROFILE, RoleName="musicgen-worker-role")
    monkeypatch.setenv("MUSICGEN_OUTPUT_URI", f"s3://{BUCKET}/songs")
    monkeypatch.setenv("AMI_ID", MOTO_DLAMI)
    monkeypatch.setenv("INSTANCE_PROFILE", PROFILE)
    return {"prompts_path": prompts_file, "repo_root": pushed_repo}


def _by_check(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {row.check: row for row in results}


def _client_error(stubber, method, code, status, message="denied"):
    stubber.add_client_error(
        method, service_error_code=code, service_message=message, http_status_code=status
    )


def test_healthy_setup_passes_supported_checks(healthy):
    started = time.monotonic()
    results = run_readiness_checks(**healthy)
    elapsed = time.monotonic() - started

    rows = _by_check(results)
    assert list(rows) == [
        "Configuration",
        "AWS credentials",
        "AMI",
        "EC2 permissions",
        "Instance type",
        "Spot price",
        "Spot vCPU quota",
        "IAM instance profile",
        "S3 bucket",
        "S3 public access",
        "S3 write probe",
        "Job file",
        "Source for the bootstrap",
    ]
    statuses = {row.check: row.status for row in results}
    assert statuses == {name: WARN if name in MOTO_WARN_ROWS else PASS for name in rows}
    assert "could not read 'All G and VT Spot Instance Requests'" in rows["Spot vCPU quota"].found
    assert "policy simulation unavailable" in rows["IAM instance profile"].found
    assert "123456789012" in rows["AWS credentials"].found
    assert MOTO_DLAMI in rows["AMI"].found
    assert "2 song(s), 75 s of audio" in rows["Job file"].found
    assert "on origin/main" in rows["Source for the bootstrap"].found
    assert summary_line(results) == "ready to launch (2 warnings)"
    raise_for_failures(results)
    # The probe object was deleted again.
    listed = boto3.client("s3", region_name=REGION).list_objects_v2(Bucket=BUCKET)
    assert listed.get("KeyCount", 0) == 0
    assert elapsed < 15


def _bad_env_file(tmp_path, monkeypatch):
    env_file = tmp_path / "bad.env"
    env_file.write_text("MAX_SPOT_PRICE_USD=cheap\n")
    monkeypatch.setenv("MUSICGEN_ENV_FILE", str(env_file))


def _invalid_prompt_line(tmp_path, monkeypatch):
    (tmp_path / "prompts.txt").write_text(JOB_LINES + "a line without any duration\n")


def _profile_without_role(tmp_path, monkeypatch):
    boto3.client("iam", region_name=REGION).create_instance_profile(InstanceProfileName="empty")
    monkeypatch.setenv("INSTANCE_PROFILE", "empty")


@pytest.mark.parametrize(
    ("setup", "check", "found", "fix"),
    [
        pytest.param(
            {"MUSICGEN_OUTPUT_URI": "s3://no-such-bucket/songs"},
            "S3 bucket",
            "bucket 'no-such-bucket' does not exist",
            "aws s3api create-bucket --bucket no-such-bucket",
            id="missing-bucket",
        ),
        pytest.param(
            {"INSTANCE_PROFILE": "no-such-profile"},
            "IAM instance profile",
            "instance profile 'no-such-profile' does not exist",
            "aws iam create-instance-profile --instance-profile-name no-such-profile",
            id="missing-instance-profile",
        ),
        pytest.param(
            _profile_without_role,
            "IAM instance profile",
            "instance profile 'empty' has no role",
            "add-role-to-instance-profile",
            id="profile-without-role",
        ),
        pytest.param(
            {"AMI_ID": "ami-0123456789abcdef0"},
            "AMI",
            "AMI ami-0123456789abcdef0 (from AMI_ID) does not exist in us-east-1",
            "leave AMI_ID empty",
            id="unknown-ami",
        ),
        pytest.param(
            {"AMI_ID": MOTO_ARM64_AMI},
            "AMI",
            "is arm64, not x86_64",
            "choose an x86_64 AMI",
            id="arm64-ami",
        ),
        pytest.param(
            {"AMI_ID": "", "AMI_SSM_PARAMETER": "/musicgen/no-such-parameter"},
            "AMI",
            "SSM parameter '/musicgen/no-such-parameter' not found",
            "set AMI_ID",
            id="missing-ssm-parameter",
        ),
        pytest.param(
            {"MAX_SPOT_PRICE_USD": "0.000001"},
            "Spot price",
            "every zone is above the maximum of $1e-06/h",
            "raise MAX_SPOT_PRICE_USD to at least 1e-05",
            id="max-price-below-current",
        ),
        pytest.param(
            _bad_env_file,
            "Configuration",
            "MAX_SPOT_PRICE_USD='cheap' is invalid: must be a number",
            "in .env or the environment",
            id="bad-env-value",
        ),
        pytest.param(
            _invalid_prompt_line,
            "Job file",
            "1 invalid line(s): line 3: missing fields",
            "line 3: add the duration in seconds",
            id="invalid-prompt-line",
        ),
    ],
)
def test_problem_gives_fail_row_with_fix(healthy, monkeypatch, tmp_path, setup, check, found, fix):
    if callable(setup):
        setup(tmp_path, monkeypatch)
    else:
        for name, value in setup.items():
            monkeypatch.setenv(name, value)

    results = run_readiness_checks(**healthy)

    failed = [row for row in results if row.status == FAIL]
    assert [row.check for row in failed] == [check], results_table(results).to_string()
    assert found in failed[0].found
    assert fix in failed[0].fix
    with pytest.raises(ReadinessError, match=check):
        raise_for_failures(results)


def test_invalid_configuration_skips_the_other_checks(aws, monkeypatch):
    monkeypatch.setenv("AWS_REGION", "moon-base-1")
    results = run_readiness_checks()
    assert results[0].status == FAIL
    assert "AWS_REGION='moon-base-1' is invalid" in results[0].found
    assert {row.status for row in results[1:]} == {WARN}
    assert all(row.found == "not run: the configuration is invalid" for row in results[1:])


def test_notebook_parameters_override_the_configuration(healthy):
    results = run_readiness_checks(
        overrides={"instance_type": "g5.xlarge", "region": None}, **healthy
    )
    rows = _by_check(results)
    assert "g5.xlarge" in rows["Configuration"].found
    assert rows["Instance type"].found.startswith("g5.xlarge is offered")


def test_ami_resolved_from_ssm_parameter(healthy, monkeypatch):
    boto3.client("ssm", region_name=REGION).put_parameter(
        Name="/musicgen/worker-ami", Value=MOTO_DLAMI, Type="String"
    )
    monkeypatch.delenv("AMI_ID")
    monkeypatch.setenv("AMI_SSM_PARAMETER", "/musicgen/worker-ami")
    row = _by_check(run_readiness_checks(**healthy))["AMI"]
    assert row.status == PASS
    assert f"{MOTO_DLAMI} (Deep Learning AMI Ubuntu Linux" in row.found
    assert "from SSM parameter /musicgen/worker-ami" in row.found


def test_missing_credentials_skip_aws_checks(healthy, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    results = run_readiness_checks(**healthy)
    rows = _by_check(results)
    assert [row.check for row in results if row.status == FAIL] == ["AWS credentials"]
    assert "aws sso login" in rows["AWS credentials"].fix
    assert rows["S3 bucket"].found == "not run: no working AWS credentials"
    assert rows["Job file"].status == PASS


def test_expired_token_gives_the_credentials_fix():
    sts = boto3.client("sts", region_name=REGION)
    with Stubber(sts) as stubber:
        _client_error(stubber, "get_caller_identity", "ExpiredToken", 400, "token expired")
        results = run_readiness_checks(
            Settings(), clients={"sts": sts}, prompts_path=PROJECT_ROOT / "prompts.txt"
        )
    row = _by_check(results)["AWS credentials"]
    assert row.status == FAIL
    assert "ExpiredToken" in row.found
    assert "aws configure" in row.fix


def test_local_output_folder_skips_s3_with_a_reason(healthy, monkeypatch, tmp_path):
    monkeypatch.setenv("MUSICGEN_OUTPUT_URI", str(tmp_path / "songs"))
    rows = _by_check(run_readiness_checks(**healthy))
    for name in ("S3 bucket", "S3 public access"):
        assert rows[name].status == WARN
        assert rows[name].found.startswith("skipped: the output location is the local folder")
    assert rows["Output folder"].status == PASS
    assert (tmp_path / "songs").is_dir()
    assert "S3 access not simulated" in rows["IAM instance profile"].found


def test_bucket_without_public_access_block_warns(healthy):
    boto3.client("s3", region_name=REGION).delete_public_access_block(Bucket=BUCKET)
    row = _by_check(run_readiness_checks(**healthy))["S3 public access"]
    assert row.status == WARN
    assert "put-public-access-block --bucket musicgen-readiness" in row.fix


def test_unexpected_error_becomes_fail_row(healthy):
    # A client without the expected methods stands for any bug or SDK change.
    results = run_readiness_checks(clients={"iam": object()}, **healthy)
    row = _by_check(results)["IAM instance profile"]
    assert row.status == FAIL
    assert row.found.startswith("AttributeError:")
    assert [r.check for r in results if r.status == FAIL] == ["IAM instance profile"]


def test_check_past_its_deadline_becomes_a_timeout_row():
    def slow():
        time.sleep(2)
        return CheckResult("Slow", PASS, "done")

    started = time.monotonic()
    rows = run_guarded(
        {("Slow",): slow, ("Fast",): lambda: CheckResult("Fast", PASS, "ok")}, timeout_s=0.2
    )
    assert time.monotonic() - started < 1.5
    assert [(row.check, row.status) for row in rows] == [("Slow", FAIL), ("Fast", PASS)]
    assert rows[0].found == "no answer within 0.2 s"


# --- Responses that moto cannot produce -----------------------------------------------


def test_head_403_names_get_object():
    s3 = boto3.client("s3", region_name=REGION)
    settings = Settings(output_uri=f"s3://{BUCKET}/songs")
    with Stubber(s3) as stubber:
        stubber.add_response("put_object", {})
        _client_error(stubber, "head_object", "403", 403, "Forbidden")
        row = check_s3_probe(s3, settings)
    assert row.status == FAIL
    assert row.found.startswith(f"HEAD s3://{BUCKET}/songs/.readiness-probe-")
    assert "s3:GetObject (HEAD needs it)" in row.fix


def test_unauthorized_run_instances_is_named():
    ec2 = boto3.client("ec2", region_name=REGION)
    dry_run_ok = ("DryRunOperation", 412, "Request would have succeeded, but DryRun flag is set.")
    denied = ("UnauthorizedOperation", 403, "You are not authorized to perform this operation.")
    with Stubber(ec2) as stubber:
        for method, outcome in [
            ("describe_instances", dry_run_ok),
            ("describe_spot_price_history", dry_run_ok),
            ("run_instances", denied),
            ("create_tags", dry_run_ok),
            ("terminate_instances", dry_run_ok),
            ("cancel_spot_instance_requests", denied),
        ]:
            _client_error(stubber, method, outcome[0], outcome[1], outcome[2])
        row = check_ec2_permissions(ec2, Settings(), MOTO_DLAMI)
        stubber.assert_no_pending_responses()
    assert row.status == FAIL
    denied = (
        "ec2:RunInstances (with iam:PassRole on the instance profile's role), "
        "ec2:CancelSpotInstanceRequests"
    )
    assert row.found.startswith(f"denied: {denied};")
    assert row.fix.startswith(f"add {denied} to")


@pytest.mark.parametrize(
    ("quota_vcpus", "status"), [(0.0, FAIL), (2.0, FAIL), (4.0, PASS), (64.0, PASS)]
)
def test_spot_quota_against_the_vcpus_of_the_type(aws, quota_vcpus, status):
    quotas = boto3.client("service-quotas", region_name=REGION)
    ec2 = boto3.client("ec2", region_name=REGION)  # moto: g4dn.xlarge has 4 vCPUs
    with Stubber(quotas) as stubber:
        stubber.add_response(
            "get_service_quota",
            {"Quota": {"QuotaCode": "L-3819A6DF", "Value": quota_vcpus}},
            {"ServiceCode": "ec2", "QuotaCode": "L-3819A6DF"},
        )
        row = check_spot_quota(quotas, ec2, Settings(instance_type="g4dn.xlarge"))
    assert row.status == status
    assert row.found == (
        f"'All G and VT Spot Instance Requests' is {quota_vcpus:g} vCPUs; g4dn.xlarge needs 4"
    )
    if status == FAIL:
        assert "--quota-code L-3819A6DF --desired-value 4" in row.fix


@pytest.mark.parametrize(
    ("instance_type", "code"),
    [
        ("g4dn.xlarge", "L-3819A6DF"),
        ("vt1.3xlarge", "L-3819A6DF"),
        ("p3.2xlarge", "L-7212CCBC"),
        ("m5.large", "L-34B43A08"),
        ("inf2.xlarge", None),
    ],
)
def test_spot_quota_code_by_family(instance_type, code):
    found = spot_quota_code(instance_type)
    assert (found[0] if found else None) == code


@pytest.mark.parametrize(
    ("decisions", "status", "missing"),
    [
        (
            {"s3:PutObject": "allowed", "s3:GetObject": "allowed", "s3:ListBucket": "allowed"},
            PASS,
            "",
        ),
        (
            {"s3:PutObject": "allowed", "s3:GetObject": "allowed", "s3:ListBucket": "implicitDeny"},
            FAIL,
            "the role is not allowed s3:ListBucket",
        ),
        (
            {
                "s3:PutObject": "explicitDeny",
                "s3:GetObject": "implicitDeny",
                "s3:ListBucket": "allowed",
            },
            FAIL,
            "the role is not allowed s3:GetObject, s3:PutObject",
        ),
    ],
)
def test_role_policy_simulation(decisions, status, missing):
    iam = boto3.client("iam", region_name=REGION)
    role_arn = "arn:aws:iam::123456789012:role/musicgen-worker-role"
    profile = {
        "InstanceProfile": {
            "Path": "/",
            "InstanceProfileName": PROFILE,
            "InstanceProfileId": "AIPAEXAMPLEEXAMPLE01",
            "Arn": f"arn:aws:iam::123456789012:instance-profile/{PROFILE}",
            "CreateDate": "2024-01-01T00:00:00Z",
            "Roles": [
                {
                    "Path": "/",
                    "RoleName": "musicgen-worker-role",
                    "RoleId": "AROAEXAMPLEEXAMPLE01",
                    "Arn": role_arn,
                    "CreateDate": "2024-01-01T00:00:00Z",
                }
            ],
        }
    }

    def evaluations(actions):
        return {
            "EvaluationResults": [
                {"EvalActionName": action, "EvalDecision": decisions[action]} for action in actions
            ]
        }

    with Stubber(iam) as stubber:
        stubber.add_response("get_instance_profile", profile, {"InstanceProfileName": PROFILE})
        stubber.add_response(
            "simulate_principal_policy",
            evaluations(["s3:PutObject", "s3:GetObject"]),
            {
                "PolicySourceArn": role_arn,
                "ActionNames": ["s3:PutObject", "s3:GetObject"],
                "ResourceArns": [f"arn:aws:s3:::{BUCKET}/songs/*"],
            },
        )
        stubber.add_response(
            "simulate_principal_policy",
            evaluations(["s3:ListBucket"]),
            {
                "PolicySourceArn": role_arn,
                "ActionNames": ["s3:ListBucket"],
                "ResourceArns": [f"arn:aws:s3:::{BUCKET}"],
            },
        )
        row = check_instance_profile(
            iam, Settings(output_uri=f"s3://{BUCKET}/songs", instance_profile=PROFILE)
        )
    assert row.status == status
    if missing:
        assert missing in row.found
        assert f"s3:ListBucket on arn:aws:s3:::{BUCKET}" in row.fix


# --- Source for the bootstrap -----------------------------------------------------------


def test_source_unpushed_commit_fails(pushed_repo, tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["cp", "-a", str(pushed_repo), str(clone)], check=True)
    (clone / "new.txt").write_text("not pushed\n")
    _git(clone, "add", "new.txt")
    _git(clone, "commit", "-q", "-m", "Local only")
    row = check_source(Settings(), clone)
    assert row.status == FAIL
    assert "on no remote-tracking branch" in row.found
    assert "git push" in row.fix


@pytest.mark.parametrize(
    ("repo_url", "repo_commit", "status", "found"),
    [
        (None, None, PASS, f"{REPO_URL} at "),
        ("git@github.com:example/musicgen-batch.git", None, WARN, "is an SSH URL"),
        ("https://github.com", None, FAIL, "has no owner/repository path"),
        ("ftp://example.com/a/b", None, FAIL, "is not an https:// URL"),
        ("http://github.com/example/musicgen-batch.git", None, FAIL, "is not an https:// URL"),
        (None, "0" * 40, FAIL, f"commit '{'0' * 40}' does not exist"),
        (
            "https://github.com/other/fork.git",
            None,
            WARN,
            "REPO_URL is not a remote of this checkout",
        ),
    ],
)
def test_source_url_and_commit(pushed_repo, repo_url, repo_commit, status, found):
    row = check_source(Settings(repo_url=repo_url, repo_commit=repo_commit), pushed_repo)
    assert row.status == status
    assert found in row.found


def test_source_https_url_matches_ssh_origin(pushed_repo, tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["cp", "-a", str(pushed_repo), str(clone)], check=True)
    _git(clone, "remote", "set-url", "origin", "git@github.com:example/musicgen-batch.git")
    assert check_source(Settings(), clone).status == WARN
    row = check_source(Settings(repo_url=REPO_URL), clone)
    assert row.status == PASS
    assert row.found.endswith(", on origin/main")


def test_source_without_origin_fails(tmp_path):
    _git(tmp_path, "init", "-q")
    row = check_source(Settings(), tmp_path)
    assert row.status == FAIL
    assert "no 'origin' remote" in row.found


def test_source_never_shows_a_token(pushed_repo):
    row = check_source(
        Settings(repo_url="https://user:ghp_secret123@github.com/example/musicgen-batch.git"),
        pushed_repo,
    )
    assert row.status == FAIL
    assert "contains credentials" in row.found
    assert "ghp_secret123" not in row.found + row.fix


# --- Table, summary and the notebook ----------------------------------------------------


def test_table_and_summary():
    rows = [
        CheckResult("A", PASS, "fine"),
        CheckResult("B", WARN, "odd", "look"),
        CheckResult("C", FAIL, "broken", "mend it"),
    ]
    table = results_table(rows)
    assert list(table.columns) == ["check", "status", "found", "fix"]
    assert table.to_dict("records")[2] == {
        "check": "C",
        "status": "fail",
        "found": "broken",
        "fix": "mend it",
    }
    assert summary_line(rows) == "1 check failed: C (1 warning)"
    with pytest.raises(ReadinessError, match="C: broken. Fix: mend it"):
        raise_for_failures(rows)


def test_notebook_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in (
        "region",
        "output_uri",
        "instance_type",
        "max_spot_price_usd",
        "instance_profile",
        "prompts_path",
    ):
        assert f"{name} = None" in tagged[0].source
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)


def _notebook_text(path: Path) -> str:
    notebook = nbformat.read(path, as_version=4)
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.extend(str(value) for value in output.get("data", {}).values())
            parts.append(f"{output.get('ename', '')}: {output.get('evalue', '')}")
    return "\n".join(parts)


def test_papermill_healthy_run_succeeds(healthy, tmp_path):
    import papermill

    output = tmp_path / "out.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(output),
        parameters={key: str(value) for key, value in healthy.items()},
        cwd=str(PROJECT_ROOT),
        progress_bar=False,
    )
    text = _notebook_text(output)
    for name in (
        "AWS credentials",
        "EC2 permissions",
        "Spot price",
        "S3 write probe",
        "Source for the bootstrap",
    ):
        assert name in text
    assert "ready to launch (2 warnings)" in text


def test_papermill_missing_bucket_fails_after_table(healthy, monkeypatch, tmp_path):
    monkeypatch.setenv("MUSICGEN_OUTPUT_URI", "s3://no-such-bucket/songs")
    output = tmp_path / "out.ipynb"
    arguments = [sys.executable, "-m", "papermill", str(NOTEBOOK), str(output)]
    for key, value in healthy.items():
        arguments += ["-p", key, str(value)]
    result = subprocess.run(
        arguments, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120
    )
    assert result.returncode != 0
    text = _notebook_text(output)
    assert "bucket 'no-such-bucket' does not exist" in text
    assert "aws s3api create-bucket --bucket no-such-bucket" in text
    assert "1 check failed: S3 bucket" in text
    assert "ReadinessError" in text
