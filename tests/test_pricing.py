"""Spot prices, the price chart and cost estimates.

moto answers DescribeSpotPriceHistory with one fixed price per zone, so pagination,
numeric comparison and the latest record per zone are tested with botocore's Stubber.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.stub import ANY, Stubber

from mgutil.aws.clients import make_client
from mgutil.aws.estimates import estimate_job_file, hourly_estimates
from mgutil.aws.pricing import (
    current_spot_prices,
    price_chart,
    spot_price_history,
    summarize_prices,
)
from mgutil.errors import SpotPriceTooLowError
from mgutil.storage import LocalStore

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _record(zone, price, hours_ago):
    return {
        "AvailabilityZone": zone,
        "InstanceType": "g4dn.xlarge",
        "ProductDescription": "Linux/UNIX",
        "SpotPrice": price,
        "Timestamp": NOW - timedelta(hours=hours_ago),
    }


def _stubbed_history():
    ec2 = boto3.client("ec2", region_name="us-east-1")
    stub = Stubber(ec2)
    expected = {
        "InstanceTypes": ["g4dn.xlarge"],
        "ProductDescriptions": ["Linux/UNIX"],
        "StartTime": ANY,
        "EndTime": ANY,
    }
    # "10.5" < "9.75" as text, but not as numbers; the older 1b record is cheaper.
    stub.add_response(
        "describe_spot_price_history",
        {
            "SpotPriceHistory": [
                _record("us-east-1a", "10.5", 1),
                _record("us-east-1b", "0.2", 90),
            ],
            "NextToken": "page-2",
        },
        expected,
    )
    stub.add_response(
        "describe_spot_price_history",
        {"SpotPriceHistory": [_record("us-east-1b", "9.75", 2), _record("us-east-1c", "12", 300)]},
        {**expected, "NextToken": "page-2"},
    )
    return ec2, stub


def test_history_pages_and_numeric_prices():
    ec2, stub = _stubbed_history()
    with stub:
        history = spot_price_history(ec2, "g4dn.xlarge", NOW - timedelta(days=30), NOW)
        stub.assert_no_pending_responses()
    assert len(history) == 4
    summary = summarize_prices(history, "g4dn.xlarge", 10.0)
    assert list(summary.current["availability_zone"]) == ["us-east-1b", "us-east-1a", "us-east-1c"]
    assert list(summary.current["price_usd"]) == [9.75, 10.5, 12.0]
    assert summary.cheapest_zone == "us-east-1b" and summary.cheapest_price_usd == 9.75
    assert summary.zones_within_max == ["us-east-1b"]
    summary.check_max_price()
    with pytest.raises(SpotPriceTooLowError, match=r"us-east-1b at \$9\.7500"):
        summarize_prices(history, "g4dn.xlarge", 9.0).check_max_price()


def test_price_chart_png(tmp_path):
    ec2, stub = _stubbed_history()
    with stub:
        history = spot_price_history(ec2, "g4dn.xlarge", NOW - timedelta(days=30), NOW)
    path = tmp_path / "chart" / "spot-prices.png"
    figure = price_chart(history, 11.0, path=path, end=NOW)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = figure.axes[0]
    labels = [line.get_label() for line in axes.get_lines()]
    assert labels == ["us-east-1a", "us-east-1b", "us-east-1c", "maximum $11.000"]
    # us-east-1b: the 90 h old record starts the window, then the change 2 h ago.
    zone_b = axes.get_lines()[1]
    assert list(zone_b.get_ydata()) == [0.2, 9.75, 9.75]


def test_moto_current_prices(aws):
    prices = current_spot_prices(make_client("ec2"), "g4dn.xlarge")
    assert len(prices) >= 2
    assert prices["price_usd"].dtype == float
    assert prices["availability_zone"].str.startswith("us-east-1").all()


def test_hourly_estimates():
    table = hourly_estimates(0.5, 0.2)
    assert list(table["hours"]) == [1, 4, 8]
    assert list(table["at_max_price_usd"]) == [0.5, 2.0, 4.0]
    assert list(table["at_current_price_usd"]) == [0.2, 0.8, 1.6]
    assert hourly_estimates(0.5, None)["at_current_price_usd"].isna().all()


def test_job_estimate_ratio_source(tmp_path):
    store = LocalStore(tmp_path)
    estimate = estimate_job_file(100.0, 2, 0.36, 0.18, compute_s_per_audio_s=3.0,
                                 boot_allowance_s=600.0, store=store)  # fmt: skip
    assert estimate.ratio_source == "parameter"
    assert estimate.run_time_s == pytest.approx(900.0)
    assert estimate.cost_at_max_usd == pytest.approx(0.09)
    assert estimate.cost_at_current_usd == pytest.approx(0.045)

    for name, generation_s, audio_s in [("a", 20, 10), ("b", 60, 10), ("c", 50, 10)]:
        record = {
            "requested_duration_s": audio_s,
            "generation_time_s": generation_s,
            "status": "done",
            "device": "cuda (Tesla T4)",
            "model_id": "facebook/musicgen-small",
        }
        store.put_bytes(json.dumps(record).encode(), f"records/{name}.json", "application/json")
    # A CPU record and a record of another model say nothing about this GPU worker.
    cpu = {**record, "generation_time_s": 5000, "device": "cpu"}
    store.put_bytes(json.dumps(cpu).encode(), "records/cpu.json", "application/json")
    other = {**record, "generation_time_s": 5000, "model_id": "facebook/musicgen-large"}
    store.put_bytes(json.dumps(other).encode(), "records/other.json", "application/json")
    failed = {"requested_duration_s": 10, "generation_time_s": 900, "status": "failed"}
    store.put_bytes(json.dumps(failed).encode(), "records/failed/x.json", "application/json")
    estimate = estimate_job_file(100.0, 2, 0.36, None, compute_s_per_audio_s=3.0,
                                 boot_allowance_s=600.0, store=store,
                                 model_id="facebook/musicgen-small")  # fmt: skip
    assert estimate.compute_s_per_audio_s == pytest.approx(5.0)
    assert estimate.ratio_source == "median of 3 earlier record(s)"
    assert estimate.run_time_s == pytest.approx(1100.0)
    assert estimate.cost_at_current_usd is None
    with pytest.raises(ValueError, match="compute_s_per_audio_s"):
        estimate_job_file(1.0, 1, 0.4, None, compute_s_per_audio_s=-1.0)
