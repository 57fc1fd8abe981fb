"""The batch worker in process: idempotency, records, reports, failures, limits."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import soundfile
from botocore.stub import Stubber

from mgutil.costs import REPORT_COLUMNS
from mgutil.errors import JobFileError, StoragePermissionError
from mgutil.worker import prepare_batch, run_batch

JOBS = """# three songs
first beat ; 2 ; first
second; with a semicolon ; 1.5
third pad ; 3 ; third
"""


@pytest.fixture
def job_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(JOBS, encoding="utf-8")
    return path


def plan_for(job_file, output, tiny_model_dir, **kwargs):
    return prepare_batch(
        prompts_path=job_file,
        output_uri=str(output),
        model_id=str(tiny_model_dir),
        hourly_cost_usd=0.36,
        window_s=2.0,
        context_s=1.0,
        **kwargs,
    )


def test_batch_writes_songs_records_report(job_file, tmp_path, tiny_model, tiny_model_dir):
    output = tmp_path / "out"
    plan = plan_for(job_file, output, tiny_model_dir)
    summary = run_batch(plan, loaded=tiny_model, progress=False)

    names = [job.output_name for job in plan.job_file.jobs]
    assert summary.generated == names
    assert summary.line().startswith("generated 3, skipped 0, failed 0, estimated cost $")
    for job in plan.job_file.jobs:
        info = soundfile.info(str(output / job.output_name))
        assert info.frames == round(job.duration_s * 32_000)
        record = json.loads((output / "records" / job.record_name).read_text())
        assert record["output_key"] == job.output_name
        assert record["status"] == "done"
        assert record["prompt"] == job.prompt
        assert record["requested_duration_s"] == job.duration_s
        assert record["actual_duration_s"] == pytest.approx(job.duration_s)
        assert record["hourly_cost_usd"] == 0.36
        assert record["estimated_cost_usd"] == pytest.approx(
            record["generation_time_s"] / 3600 * 0.36, rel=1e-2
        )
        assert record["run_id"] == plan.run_id
        assert record["device"] == "cpu"

    report = pd.read_csv(output / "cost_report.csv")
    assert list(report.columns[:5]) == REPORT_COLUMNS
    assert list(report["s3_filename"]) == names
    assert list(report["prompt"]) == ["first beat", "second; with a semicolon", "third pad"]
    assert pd.read_csv(output / "failures.csv").empty
    assert summary.estimated_cost_usd == pytest.approx(report["estimated_cost_usd"].sum())


def test_second_run_skips_and_keeps_rows(job_file, tmp_path, tiny_model_dir):
    output = tmp_path / "out"
    first = run_batch(plan_for(job_file, output, tiny_model_dir), progress=False)
    report_before = (output / "cost_report.csv").read_bytes()

    def refuse_to_load(model_id):
        raise AssertionError("the model must not load when every song exists")

    second = run_batch(
        plan_for(job_file, output, tiny_model_dir), progress=False, model_loader=refuse_to_load
    )
    assert second.generated == []
    assert second.skipped == first.generated
    assert second.line() == "generated 0, skipped 3, failed 0, estimated cost $0.0000"
    assert (output / "cost_report.csv").read_bytes() == report_before


def test_edited_prompt_gets_new_file(job_file, tmp_path, tiny_model):
    output = tmp_path / "out"
    first = run_batch(
        plan_for(job_file, output, tiny_model.model_id), loaded=tiny_model, progress=False
    )
    job_file.write_text(JOBS.replace("third pad", "third pad, brighter"), encoding="utf-8")
    second = run_batch(
        plan_for(job_file, output, tiny_model.model_id), loaded=tiny_model, progress=False
    )
    assert len(second.generated) == 1
    assert second.generated[0].startswith("third-")
    assert second.generated[0] not in first.generated
    report = pd.read_csv(output / "cost_report.csv")
    assert len(report) == 4


def test_failing_job_recorded_others_done(job_file, tmp_path, tiny_model):
    output = tmp_path / "out"
    model = tiny_model.model
    original = model.generate

    def generate_or_fail(**kwargs):
        # A batch that holds the second song fails, so the worker must isolate it.
        if any("second" in text for text in _decode(tiny_model, kwargs["input_ids"])):
            raise RuntimeError("model exploded (simulated)")
        return original(**kwargs)

    model.generate = generate_or_fail
    try:
        plan = plan_for(job_file, output, tiny_model.model_id)
        summary = run_batch(plan, loaded=tiny_model, progress=False)
    finally:
        model.generate = original

    failed_name = plan.job_file.jobs[1].output_name
    assert summary.failed == [failed_name]
    assert len(summary.generated) == 2
    assert not (output / failed_name).exists()
    assert list(output.glob(".tmp-*")) == []

    report = pd.read_csv(output / "cost_report.csv")
    assert failed_name not in set(report["s3_filename"])
    failures = pd.read_csv(output / "failures.csv")
    assert list(failures["s3_filename"]) == [failed_name]
    assert "model exploded" in failures["error"][0]
    assert failures["generation_time_s"][0] >= 0
    assert not failures["resolved"][0]

    # A rerun without the fault generates only the failed song and marks it resolved.
    rerun = run_batch(
        plan_for(job_file, output, tiny_model.model_id), loaded=tiny_model, progress=False
    )
    assert rerun.generated == [failed_name]
    failures = pd.read_csv(output / "failures.csv")
    assert bool(failures["resolved"][0])
    assert len(pd.read_csv(output / "cost_report.csv")) == 3


def _decode(loaded, input_ids) -> list[str]:
    return loaded.processor.tokenizer.batch_decode(input_ids, skip_special_tokens=True)


def test_invalid_lines_stop_before_model(tmp_path, tiny_model_dir):
    path = tmp_path / "prompts.txt"
    path.write_text("good ; 1 ; good\nbad line\nworse ; -3\n", encoding="utf-8")
    with pytest.raises(JobFileError) as raised:
        plan_for(path, tmp_path / "out", tiny_model_dir)
    assert "line 2" in str(raised.value)
    assert "line 3" in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_skip_invalid_lines_runs_rest(tmp_path, tiny_model):
    path = tmp_path / "prompts.txt"
    path.write_text("good ; 1 ; good\nbad line\n", encoding="utf-8")
    plan = plan_for(path, tmp_path / "out", tiny_model.model_id, skip_invalid_lines=True)
    summary = run_batch(plan, loaded=tiny_model, progress=False)
    assert len(summary.generated) == 1
    assert plan.parameters()["invalid_lines"] == 1


def test_max_jobs_limits_run(job_file, tmp_path, tiny_model):
    plan = plan_for(job_file, tmp_path / "out", tiny_model.model_id, max_jobs=1)
    summary = run_batch(plan, loaded=tiny_model, progress=False)
    assert summary.generated == [plan.job_file.jobs[0].output_name]
    assert len(pd.read_csv(tmp_path / "out" / "cost_report.csv")) == 1


def test_s3_batch_and_rerun(job_file, s3_bucket, tiny_model):
    import boto3

    uri = f"s3://{s3_bucket}/runs/a"
    summary = run_batch(
        plan_for(job_file, uri, tiny_model.model_id), loaded=tiny_model, progress=False
    )
    assert len(summary.generated) == 3

    client = boto3.client("s3", region_name="us-east-1")
    keys = sorted(item["Key"] for item in client.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert f"runs/a/{summary.generated[0]}" in keys
    assert "runs/a/cost_report.csv" in keys
    assert sum(key.startswith("runs/a/records/") for key in keys) == 3
    head = client.head_object(Bucket=s3_bucket, Key=f"runs/a/{summary.generated[0]}")
    assert head["ContentType"] == "audio/wav"

    rerun = run_batch(
        plan_for(job_file, uri, tiny_model.model_id), loaded=tiny_model, progress=False
    )
    assert rerun.generated == []
    assert len(rerun.skipped) == 3


def test_s3_403_stops_before_generation(job_file, tiny_model):
    import boto3

    client = boto3.client("s3", region_name="us-east-1")
    stubber = Stubber(client)
    stubber.add_response("head_bucket", {})
    stubber.add_client_error("head_object", "403", "Forbidden", 403)
    calls = []
    original = tiny_model.model.generate
    tiny_model.model.generate = lambda **kwargs: calls.append(kwargs)
    try:
        plan = prepare_batch(
            prompts_path=job_file,
            output_uri="s3://locked-bucket/songs",
            model_id=tiny_model.model_id,
            s3_client=client,
        )
        with stubber, pytest.raises(StoragePermissionError) as raised:
            run_batch(plan, loaded=tiny_model, progress=False)
    finally:
        tiny_model.model.generate = original
    assert calls == []
    assert "s3:ListBucket" in str(raised.value)
    assert "locked-bucket" in str(raised.value)
