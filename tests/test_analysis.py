"""The cost analysis: the real worker on the tiny model writes the records, papermill runs
the real notebook on them, in a folder and in a moto S3 bucket, and EC2 is moto too.

Expected values are computed here from the record files, never copied from a run.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_instance import FACTS, FakeMetadataServer

from mgutil import analysis, costs
from mgutil.config import Settings
from mgutil.errors import StorageError
from mgutil.instance import EC2_WORKER_VARIABLE, ENDPOINT_VARIABLE
from mgutil.storage import LocalStore
from mgutil.worker import prepare_batch, run_batch

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_cost_analysis.ipynb"
# moto's describe_spot_price_history gives every zone this price (USD per hour), in
# effect since 2006.
MOTO_SPOT_PRICE_USD = 0.00001
CHARTS = ["cost_per_song", "generation_time", "cumulative_cost", "spot_price"]
JOBS = "soft piano ; 1 ; piano\nslow strings ; 0.5 ; strings\nbad upload ; 0.5 ; broken\n"


class FailingUploadStore(LocalStore):
    """A local folder whose song uploads fail for the job named ``broken``."""

    def put_file(self, local_path, key, content_type):
        if key.startswith("broken"):
            raise StorageError(f"writing {key} failed: disk full (test)")
        super().put_file(local_path, key, content_type)


def _generate(tiny_model, folder: Path, hourly_cost_usd: float, environment: dict) -> Path:
    """Run the real worker on the tiny model into ``folder`` and return it."""
    jobs = folder.parent / f"{folder.name}-jobs.txt"
    jobs.write_text(JOBS, encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(EC2_WORKER_VARIABLE, raising=False)
        for name, value in environment.items():
            patch.setenv(name, value)
        plan = prepare_batch(
            prompts_path=jobs,
            output_uri=str(folder),
            model_id=tiny_model.model_id,
            hourly_cost_usd=hourly_cost_usd,
            settings=Settings(),
        )
        plan.store = FailingUploadStore(folder)
        # A copy, because the worker tunes a model it loaded itself, and the session's
        # tiny model must stay as other tests expect it.
        run_batch(plan, progress=False, model_loader=lambda _model_id: copy.deepcopy(tiny_model))
    return folder


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Three output folders written by the worker: local, EC2, and EC2 with a low rate."""
    root = tmp_path_factory.mktemp("analysis-runs")
    folders = {"local": _generate(tiny_model, root / "local", 0.4, {})}
    with FakeMetadataServer(FACTS) as server:
        ec2 = {EC2_WORKER_VARIABLE: "1", ENDPOINT_VARIABLE: server.endpoint}
        folders["ec2"] = _generate(tiny_model, root / "ec2", 0.4, ec2)
        # An hourly rate below moto's spot price, so every upper bound breaks.
        folders["ec2-low"] = _generate(tiny_model, root / "ec2-low", 1e-7, ec2)
    return folders


def _copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "out"
    shutil.copytree(source, target)
    return target


def _records(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((folder / "records").rglob("*.json"))]


def _run_notebook(tmp_path: Path, output_uri: str, **parameters) -> dict:
    import papermill

    output = tmp_path / "executed.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(output),
        parameters={"output_uri": output_uri, "cache_dir": str(tmp_path / "cache"), **parameters},
        progress_bar=False,
        kernel_name="python3",
    )
    return json.loads(output.read_text())


def _outputs(notebook: dict, mime: str) -> list[str]:
    texts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            if output["output_type"] == "error":
                raise AssertionError(f"cell failed: {output['ename']}: {output['evalue']}")
            data = output.get("data", {}).get(mime)
            if data is not None:
                texts.append("".join(data) if isinstance(data, list) else data)
    return texts


def _totals(text: str) -> dict:
    table = pd.read_csv(pd.io.common.StringIO(text))
    return dict(zip(table["quantity"].str.strip(), table["value"], strict=True))


def _check_png(data: bytes) -> None:
    import matplotlib.image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(pd.io.common.BytesIO(data), format="png")
    assert image.shape[0] > 50 and image.shape[1] > 50


def _expected(records: list[dict]) -> dict:
    done = [r for r in records if r["status"] == "done"]
    audio_s = sum(r["actual_duration_s"] for r in done)
    estimated = sum(r["estimated_cost_usd"] for r in records)
    return {
        "songs done": len(done),
        "failed attempts": len(records) - len(done),
        "minutes of audio": audio_s / 60,
        "generation hours": sum(r["generation_time_s"] for r in records) / 3600,
        "estimated cost (USD, at the hourly rate)": estimated,
        "estimated cost per minute of audio (USD)": estimated / (audio_s / 60),
        "estimated cost per hour of audio (USD)": estimated / (audio_s / 3600),
    }


def test_worker_records_carry_run_and_instance_facts(runs, tiny_model):
    for name in ("local", "ec2"):
        records = _records(runs[name])
        assert {r["status"] for r in records} == {"done", "failed"}
        for record in records:
            assert record["model_load_time_s"] == round(tiny_model.load_time_s, 3)
            assert record["run_started_at"] <= record["started_at"]
            expected = FACTS if name == "ec2" else {}
            assert record["instance_id"] == expected.get("/latest/meta-data/instance-id")
            assert record["availability_zone"] == expected.get(
                "/latest/meta-data/placement/availability-zone"
            )
        summaries = list((runs[name] / "runs").glob("*/run.json"))
        assert len(summaries) == 1
        summary = json.loads(summaries[0].read_text())
        assert summary["status"] == "finished"
        assert summary["run_id"] == records[0]["run_id"]
        assert summary["started_at"] == records[0]["run_started_at"]
        assert summary["finished_at"] >= max(r["finished_at"] for r in records)
        assert (summary["generated"], summary["failed"]) == (2, 1)


def test_notebook_on_local_run(runs, tmp_path):
    folder = _copy(runs["local"], tmp_path)
    records = _records(folder)
    notebook = _run_notebook(tmp_path, str(folder), max_players=10)

    totals = _totals((folder / "reports" / "totals.csv").read_text())
    for quantity, value in _expected(records).items():
        assert float(totals[quantity]) == pytest.approx(value, rel=1e-9), quantity
    assert "actual spot cost of songs (USD)" not in totals

    report = pd.read_csv(folder / "cost_report.csv")
    assert list(report.columns[:5]) == costs.REPORT_COLUMNS
    done = {r["output_key"]: r for r in records if r["status"] == "done"}
    assert set(report["s3_filename"]) == set(done)
    for _, row in report.iterrows():
        record = done[row["s3_filename"]]
        assert row["real_time_factor"] == pytest.approx(
            record["generation_time_s"] / record["actual_duration_s"]
        )
        assert row["estimated_cost_per_audio_minute_usd"] == pytest.approx(
            record["estimated_cost_usd"] / (record["actual_duration_s"] / 60)
        )
    failures = pd.read_csv(folder / "failures.csv")
    assert list(failures["s3_filename"]) == ["broken-" + _hash(records, "bad upload") + ".wav"]
    assert not failures["resolved"].any()

    for chart in CHARTS:
        _check_png((folder / "reports" / f"{chart}.png").read_bytes())
    markdown = "\n".join(_outputs(notebook, "text/markdown"))
    assert "Estimates only" in markdown
    html = "\n".join(_outputs(notebook, "text/html"))
    assert html.count("<audio") == len(done)
    assert "soft piano" in html and "slow strings" in html
    assert len(_outputs(notebook, "image/png")) == len(CHARTS) + len(done)


def _hash(records: list[dict], prompt: str) -> str:
    return next(r["job_hash"] for r in records if r["prompt"] == prompt)


def test_max_players_limits_and_orders_newest_first(runs, tmp_path):
    folder = _copy(runs["local"], tmp_path)
    store = LocalStore(folder)
    players = analysis.song_players(store, analysis.analyze(store), max_players=1)
    newest = max((r for r in _records(folder) if r["status"] == "done"), key=_finish_order)
    assert len(players) == 3  # caption, waveform, player
    assert newest["prompt"] in players[0].data


def _finish_order(record: dict):
    return (record["finished_at"], record["line_number"])


def test_stereo_song_plays_in_stereo(runs, tmp_path):
    import io

    import numpy as np
    import soundfile

    folder = _copy(runs["local"], tmp_path)
    song = next(r for r in _records(folder) if r["prompt"] == "soft piano")
    stereo = np.stack([np.linspace(-0.5, 0.5, 16000), np.zeros(16000)], axis=1)
    soundfile.write(folder / song["output_key"], stereo, 32000, subtype="PCM_16")
    store = LocalStore(folder)
    players = analysis.song_players(store, analysis.analyze(store), max_players=10)
    audio = [p for p in players if type(p).__name__ == "Audio"]
    channels = {soundfile.info(io.BytesIO(a.data)).channels for a in audio}
    assert channels == {1, 2}


def test_notebook_on_s3_matches_the_folder(runs, tmp_path, s3_bucket):
    import boto3

    source = runs["local"]
    s3 = boto3.client("s3", region_name="us-east-1")
    for path in source.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), s3_bucket, "run/" + path.relative_to(source).as_posix())
    notebook = _run_notebook(tmp_path, f"s3://{s3_bucket}/run/", max_players=10)

    body = s3.get_object(Bucket=s3_bucket, Key="run/reports/totals.csv")["Body"].read()
    totals = _totals(body.decode())
    for quantity, value in _expected(_records(source)).items():
        assert float(totals[quantity]) == pytest.approx(value, rel=1e-9), quantity
    for chart in CHARTS:
        _check_png(s3.get_object(Bucket=s3_bucket, Key=f"run/reports/{chart}.png")["Body"].read())
    report = s3.get_object(Bucket=s3_bucket, Key="run/cost_report.csv")["Body"].read().decode()
    assert report.startswith(",".join(costs.REPORT_COLUMNS) + ",")
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.wav"))
    done = sorted(r["output_key"] for r in _records(source) if r["status"] == "done")
    assert cached == done
    assert "\n".join(_outputs(notebook, "text/html")).count("<audio") == len(done)


def test_notebook_on_empty_location(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    notebook = _run_notebook(tmp_path, str(empty))
    markdown = "\n".join(_outputs(notebook, "text/markdown"))
    assert f"No records in {empty}" in markdown
    assert "Traceback" not in json.dumps(notebook)
    totals = _totals((empty / "reports" / "totals.csv").read_text())
    assert int(totals["songs done"]) == 0


def test_price_change_in_the_middle_of_a_song(runs):
    """The actual cost is the integral of the price, not the price at the start."""
    records = analysis.load_records(LocalStore(runs["ec2"]))
    songs = analysis.song_table(records)
    song = songs[songs["status"] == "done"].iloc[0]
    start = song["started_at"]
    seconds = song["generation_time_s"]
    middle = start + pd.Timedelta(seconds=seconds / 2)
    history = pd.DataFrame(
        {
            "timestamp": [start - pd.Timedelta(hours=5), middle],
            "availability_zone": ["us-east-1b"] * 2,
            "instance_type": ["g4dn.xlarge"] * 2,
            "price_usd": [0.30, 0.90],
        }
    )
    priced = analysis.add_actual_costs(songs, history)
    row = priced[priced["s3_filename"] == song["s3_filename"]].iloc[0]
    expected = (0.30 * seconds / 2 + 0.90 * seconds / 2) / 3600
    assert row["actual_cost_usd"] == pytest.approx(expected, rel=1e-9)
    assert row["actual_cost_usd"] != pytest.approx(0.30 * seconds / 3600)
    assert row["peak_spot_price_usd"] == 0.90
    # The estimate at 0.40 USD/h is below the 0.60 USD/h average, so the flag fires.
    assert row["upper_bound_ok"] is False
    assert "above the hourly rate" in row["flag"]
    # A zone with other prices does not count.
    other = history.assign(availability_zone="us-east-1c")
    assert analysis.add_actual_costs(songs, other)["actual_cost_usd"].isna().all()


def test_price_integral_over_several_changes():
    t0 = pd.Timestamp("2026-01-01T00:00:00Z")
    history = pd.DataFrame(
        {
            "timestamp": [t0 - pd.Timedelta(days=1), t0 + pd.Timedelta(minutes=10)],
            "price_usd": [0.36, 0.72],
        }
    )
    # 10 minutes at 0.36 and 20 at 0.72.
    cost = analysis.price_integral_usd(history, t0, t0 + pd.Timedelta(minutes=30))
    assert cost == pytest.approx(0.36 / 6 + 0.72 / 3)
    assert analysis.price_integral_usd(history, t0, t0) == 0.0


def _ec2_expectations(folder: Path, boot_allowance_s: float) -> tuple[list[dict], float, float]:
    records = _records(folder)
    start = min(pd.Timestamp(r["run_started_at"]) for r in records)
    summary = json.loads(next((folder / "runs").glob("*/run.json")).read_text())
    ends = [pd.Timestamp(summary["finished_at"])]
    ends += [
        pd.Timestamp(r["started_at"]) + pd.Timedelta(seconds=r["generation_time_s"])
        for r in records
    ]
    ends += [pd.Timestamp(r["finished_at"]) for r in records]
    life_s = (max(ends) - start).total_seconds() + boot_allowance_s
    billed_s = max(math.ceil(life_s), 60)
    return records, billed_s, MOTO_SPOT_PRICE_USD * billed_s / 3600


def test_notebook_actual_costs_against_moto(runs, tmp_path, aws):
    folder = _copy(runs["ec2"], tmp_path)
    notebook = _run_notebook(tmp_path, str(folder), boot_allowance_s=120.0)
    records, billed_s, instance_cost = _ec2_expectations(folder, 120.0)

    report = pd.read_csv(folder / "cost_report.csv")
    done = {r["output_key"]: r for r in records if r["status"] == "done"}
    for _, row in report.iterrows():
        seconds = done[row["s3_filename"]]["generation_time_s"]
        assert row["actual_cost_usd"] == pytest.approx(MOTO_SPOT_PRICE_USD * seconds / 3600)
        assert bool(row["upper_bound_ok"])
    totals = _totals((folder / "reports" / "totals.csv").read_text())
    songs_actual = MOTO_SPOT_PRICE_USD * sum(r["generation_time_s"] for r in records) / 3600
    assert float(totals["actual spot cost of songs (USD)"]) == pytest.approx(songs_actual)
    assert float(totals["actual spot cost of instance life (USD)"]) == pytest.approx(instance_cost)
    overhead = instance_cost - songs_actual
    assert float(totals["overhead outside generation (USD)"]) == pytest.approx(overhead)
    assert float(totals["overhead outside generation (%)"]) == pytest.approx(
        100 * overhead / instance_cost
    )
    boot = float(totals["boot and environment sync (USD)"])
    assert boot == pytest.approx(MOTO_SPOT_PRICE_USD * 120.0 / 3600)
    assert int(totals["songs above the upper bound"]) == 0
    instances = pd.read_csv(folder / "reports" / "instances.csv")
    assert instances["source"].str.startswith("records").all()  # moto never saw this id
    assert instances["billed_s"].tolist() == [billed_s]
    markdown = "\n".join(_outputs(notebook, "text/markdown"))
    assert "no longer shows its termination time" in markdown
    for chart in CHARTS:
        _check_png((folder / "reports" / f"{chart}.png").read_bytes())


def test_upper_bound_flag_when_rate_below_spot_price(runs, tmp_path, aws):
    folder = _copy(runs["ec2-low"], tmp_path)
    notebook = _run_notebook(tmp_path, str(folder))
    report = pd.read_csv(folder / "cost_report.csv")
    assert len(report) == 2
    assert not report["upper_bound_ok"].any()
    assert report["flag"].str.contains("above the hourly rate").all()
    failures = pd.read_csv(folder / "failures.csv")
    assert not failures["upper_bound_ok"].any()
    totals = _totals((folder / "reports" / "totals.csv").read_text())
    assert int(totals["songs above the upper bound"]) == 3
    instances = pd.read_csv(folder / "reports" / "instances.csv")
    assert not instances["upper_bound_ok"].any()
    # The flagged rows, all three attempts, are red in the displayed table.
    style = next(h for h in _outputs(notebook, "text/html") if "#f4b6b6" in h)
    red_rule = style.split("#f4b6b6")[0].rsplit("}", 1)[-1]
    for row in range(3):
        assert f"_row{row}_col0" in red_rule


def test_instance_life_read_from_ec2(runs, tmp_path, aws):
    import boto3

    ec2 = boto3.client("ec2", region_name="us-east-1")
    instance = ec2.run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        InstanceType="g4dn.xlarge",
        Placement={"AvailabilityZone": "us-east-1b"},
    )["Instances"][0]
    ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])
    folder = _copy(runs["ec2"], tmp_path)
    for path in (folder / "records").rglob("*.json"):
        record = json.loads(path.read_text())
        record["instance_id"] = instance["InstanceId"]
        path.write_text(json.dumps(record))
    described = ec2.describe_instances(InstanceIds=[instance["InstanceId"]])
    described = described["Reservations"][0]["Instances"][0]

    result = analysis.analyze(LocalStore(folder))
    life = result.instances.iloc[0]
    assert life["source"] == "EC2"
    assert life["state"] == "terminated"
    assert life["launched_at"] == pd.Timestamp(described["LaunchTime"])
    reason = described["StateTransitionReason"]
    assert life["ended_at"].strftime("%Y-%m-%d %H:%M:%S") in reason


def test_unreachable_ec2_gives_estimates_with_reason(runs, monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    result = analysis.analyze(LocalStore(runs["ec2"]))
    assert not result.has_actual_costs
    assert any("EC2 could not be asked" in note for note in result.notes)
    expected = _expected(_records(runs["ec2"]))
    table = dict(zip(*analysis.totals(result).to_dict("list").values(), strict=True))
    assert table["estimated cost (USD, at the hourly rate)"] == pytest.approx(
        expected["estimated cost (USD, at the hourly rate)"]
    )
