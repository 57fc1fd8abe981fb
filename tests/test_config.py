"""Settings from the environment and .env: precedence, defaults and validation."""

from __future__ import annotations

import pytest

from mgutil.config import PROJECT_ROOT, load_settings, parse_output_uri
from mgutil.errors import ConfigError


def test_defaults_without_configuration(tmp_path):
    settings = load_settings(env_file=tmp_path / "absent.env", environ={})
    assert settings.region == "us-east-1"
    assert settings.output_uri == "outputs/"
    assert settings.model_id == "facebook/musicgen-small"
    assert settings.max_spot_price_usd == 0.40
    assert settings.hourly_cost_usd == 0.40
    assert settings.max_duration_s == 600.0


def test_environment_wins_over_env_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("MUSICGEN_MODEL=from-file\nINSTANCE_TYPE=g5.xlarge\n")
    settings = load_settings(env_file=env_file, environ={"MUSICGEN_MODEL": "from-env"})
    assert settings.model_id == "from-env"
    assert settings.instance_type == "g5.xlarge"


def test_hourly_cost_follows_max_price(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("MAX_SPOT_PRICE_USD=0.25\n")
    assert load_settings(env_file=env_file, environ={}).hourly_cost_usd == 0.25
    settings = load_settings(env_file=env_file, environ={"HOURLY_COST_USD": "0.3"})
    assert settings.hourly_cost_usd == 0.3
    assert settings.max_spot_price_usd == 0.25


def test_env_file_variable_selects_file(tmp_path):
    env_file = tmp_path / "other.env"
    env_file.write_text("WORKER_TAG=custom-tag\n")
    settings = load_settings(environ={"MUSICGEN_ENV_FILE": str(env_file)})
    assert settings.worker_tag == "custom-tag"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MAX_SPOT_PRICE_USD", "cheap", "must be a number"),
        ("MAX_SPOT_PRICE_USD", "-1", "positive number of USD per hour"),
        ("HOURLY_COST_USD", "0", "positive number of USD per hour"),
        ("AWS_REGION", "Europe", "us-east-1"),
        ("INSTANCE_TYPE", "g4dn", "g4dn.xlarge"),
        ("AMI_ID", "ami-xyz", "ami-0123456789abcdef0"),
        ("MUSICGEN_OUTPUT_URI", "s3://Bad_Bucket/x", "invalid S3 bucket name"),
        ("MUSICGEN_OUTPUT_URI", "gs://bucket/x", "unsupported output location"),
        ("MUSICGEN_MAX_DURATION_S", "forever", "must be a number"),
    ],
)
def test_invalid_value_names_variable(name, value, message):
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={name: value})
    text = str(raised.value)
    assert f"{name}={value!r}" in text or name in text
    assert message in text
    assert ".env" in text


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"MAX_SPOT_PRICE_USD": "x", "AWS_REGION": "nowhere"})
    assert "MAX_SPOT_PRICE_USD" in str(raised.value)
    assert "AWS_REGION" in str(raised.value)


def test_override_validated():
    settings = load_settings(environ={})
    assert settings.with_overrides(hourly_cost_usd=1.5, model_id=None).hourly_cost_usd == 1.5
    with pytest.raises(ConfigError, match="HOURLY_COST_USD"):
        settings.with_overrides(hourly_cost_usd=-2)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://my-bucket", ("s3", "my-bucket", "")),
        ("s3://my-bucket/", ("s3", "my-bucket", "")),
        ("s3://my-bucket/songs/run1/", ("s3", "my-bucket", "songs/run1/")),
        ("/tmp/songs", ("file", "/tmp/songs", "")),
        ("outputs/", ("file", str(PROJECT_ROOT / "outputs"), "")),
    ],
)
def test_output_uri_parsed(uri, expected):
    assert parse_output_uri(uri) == expected
