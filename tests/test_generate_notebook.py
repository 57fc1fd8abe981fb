"""papermill runs the real generation notebook twice, into a folder and into S3."""

from __future__ import annotations

import io
import json

import nbformat
import pandas as pd
import papermill
import pytest
import soundfile

from mgutil.config import PROJECT_ROOT
from mgutil.costs import REPORT_COLUMNS
from mgutil.storage import open_store

NOTEBOOK = PROJECT_ROOT / "notebooks" / "03_generate.ipynb"
JOBS = """# notebook test
short beat ; 4 ; short
a prompt; with a semicolon ; 35
"""
EXPECTED_FRAMES = [4 * 32_000, 35 * 32_000]


def execute(tmp_path, name, **parameters):
    output = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(output),
        parameters=parameters,
        kernel_name="python3",
        progress_bar=False,
    )
    return nbformat.read(str(output), as_version=4)


def last_output_text(notebook) -> str:
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    outputs = code_cells[-1].outputs
    return "".join(output.get("text", "") for output in outputs if output.output_type == "stream")


def check_songs(store, report):
    assert list(report.columns[:5]) == REPORT_COLUMNS
    assert len(report) == 2
    for key, frames in zip(report["s3_filename"], EXPECTED_FRAMES, strict=True):
        info = soundfile.info(io.BytesIO(store.get_bytes(key)))
        assert info.frames == frames
        assert info.samplerate == 32_000
        record = json.loads(store.get_bytes(f"records/{key.removesuffix('.wav')}.json"))
        assert record["status"] == "done"


def test_committed_notebook_is_clean():
    notebook = nbformat.read(str(NOTEBOOK), as_version=4)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in (
        "prompts_path",
        "output_uri",
        "model_id",
        "hourly_cost_usd",
        "window_s",
        "context_s",
        "guidance_scale",
        "skip_invalid_lines",
        "max_jobs",
        "run_id",
    ):
        assert f"{name} = " in tagged[0].source
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == []
            assert cell.execution_count is None


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_notebook_twice(backend, tmp_path, tiny_model_dir, request):
    jobs = tmp_path / "prompts.txt"
    jobs.write_text(JOBS, encoding="utf-8")
    if backend == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        output_uri = f"s3://{bucket}/notebook-test"
    else:
        output_uri = str(tmp_path / "out")
    parameters = {
        "prompts_path": str(jobs),
        "output_uri": output_uri,
        "model_id": str(tiny_model_dir),
        "hourly_cost_usd": 0.5,
    }

    first = execute(tmp_path, "first", **parameters)
    assert last_output_text(first).startswith("generated 2, skipped 0, failed 0, estimated cost $")
    store = open_store(output_uri)
    report_bytes = store.get_bytes("cost_report.csv")
    report = pd.read_csv(io.BytesIO(report_bytes))
    check_songs(store, report)
    assert report["hourly_cost_usd"].eq(0.5).all()

    second = execute(tmp_path, "second", **parameters)
    assert (
        last_output_text(second).strip()
        == "generated 0, skipped 2, failed 0, estimated cost $0.0000"
    )
    assert store.get_bytes("cost_report.csv") == report_bytes


def test_notebook_fails_on_invalid_line(tmp_path, tiny_model_dir):
    jobs = tmp_path / "prompts.txt"
    jobs.write_text("good ; 1 ; good\nno separator here\n", encoding="utf-8")
    with pytest.raises(papermill.PapermillExecutionError) as raised:
        execute(
            tmp_path,
            "invalid",
            prompts_path=str(jobs),
            output_uri=str(tmp_path / "out"),
            model_id=str(tiny_model_dir),
        )
    assert "JobFileError" in str(raised.value)
    assert "line 2" in str(raised.value)
    assert not (tmp_path / "out").exists()
