"""The throughput benchmark runs end to end on the tiny model; no speed is asserted."""

from __future__ import annotations

import importlib.util
import json

import pytest

from mgutil.config import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_reports_both_paths_and_ratio(throughput, tmp_path, capsys):
    out = tmp_path / "out.json"
    argv = ["--model", "tiny", "--songs", "3", "--seconds", "0.5", "--repeats", "1"]
    throughput.main([*argv, "--threads", "1", "--json", str(out)])

    data = json.loads(out.read_text(encoding="utf-8"))
    baseline, worker = data["baseline_audio_s_per_s"], data["worker_audio_s_per_s"]
    assert baseline > 0
    assert worker > 0
    assert data["ratio"] == pytest.approx(worker / baseline)
    assert set(data["paths"]) == {"baseline", "worker"}
    for path in data["paths"].values():
        assert path["repeats"] == 1
        # 3 songs of 0.5 s: 1.5 s of audio.
        assert path["audio_s_per_s"] * path["wall_s"] == pytest.approx(1.5)
        assert path["real_time_factor"] == pytest.approx(1 / path["audio_s_per_s"])
        assert path["peak_memory_mib"] > 0
    # One call per song of 25 frames (plus 3 delay steps and the prefill) against one
    # call for all three, which runs 2 frames of lookahead more.
    assert data["paths"]["baseline"]["decoding_steps"] == 3 * (25 + 3 + 1)
    assert data["paths"]["worker"]["decoding_steps"] == 25 + 2 + 3 + 1
    assert data["paths"]["worker"]["batch_size"] == 16
    assert data["hardware"]["cpu_count"] >= 1

    printed = capsys.readouterr().out
    assert "audio s/s" in printed
    assert f"ratio {data['ratio']:.2f}" in printed


def test_rejects_bad_arguments(throughput):
    with pytest.raises(SystemExit):
        throughput.parse_args(["--songs", "0"])
