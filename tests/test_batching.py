"""Batched generation with the tiny model: each song as if alone, early results, failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mgutil.batching import (
    CPU_BATCH_SIZE,
    SongRequest,
    default_batch_size,
    generate_songs,
    window_cache_bytes,
)
from mgutil.generation import generate_song, generate_windows, load_model
from mgutil.jobs import GenerationSettings

# 2 s windows with 1 s of context: a 3.3 s song has three windows, the last one short.
SETTINGS = GenerationSettings(window_s=2.0, context_s=1.0)
REQUESTS = [
    SongRequest("long", "epic orchestral soundtrack with strings", 3.3337, seed=11),
    SongRequest("short", "lofi", 0.5, seed=12),
    SongRequest("middle", "jazz trio with walking bass", 2.5, seed=13),
    SongRequest("two", "ambient drone", 2.0, seed=14),
]


class BatchSpy:
    """Wrap the model's real generate and record each call's batch and audio prompt."""

    def __init__(self, model, fail_when=None):
        self.model = model
        self.original = model.generate
        self.fail_when = fail_when
        self.calls: list[tuple[int, int]] = []

    def __call__(self, **kwargs):
        songs = kwargs["input_ids"].shape[0]
        values = kwargs.get("input_values")
        self.calls.append((songs, 0 if values is None else values.shape[-1]))
        if self.fail_when is not None:
            self.fail_when(kwargs)
        return self.original(**kwargs)

    def __enter__(self):
        self.model.generate = self
        return self

    def __exit__(self, *exc):
        self.model.generate = self.original


def alone(loaded, request, settings=SETTINGS):
    return generate_song(loaded, request.prompt, request.duration_s, settings, request.seed)


@pytest.fixture(scope="module")
def songs_alone(tiny_model):
    return {request.key: alone(tiny_model, request) for request in REQUESTS}


@pytest.mark.parametrize("batch_size", [4, 3])
def test_batched_songs_equal_songs_alone(tiny_model, songs_alone, batch_size):
    with BatchSpy(tiny_model.model) as spy:
        results = generate_songs(tiny_model, REQUESTS, SETTINGS, batch_size=batch_size)
    assert all(result.ok for result in results)
    for result in results:
        expected = songs_alone[result.request.key]
        assert result.audio.shape == (1, round(result.request.duration_s * 32_000))
        np.testing.assert_array_equal(result.audio, expected)
    assert max(songs for songs, _ in spy.calls) == batch_size
    # First windows have no audio prompt, continuations exactly 1 s of it.
    assert {samples for _, samples in spy.calls} == {0, 32_000}


def test_windows_of_different_lengths_share_a_call(tiny_model):
    prompts = ["lofi beat", "epic orchestral soundtrack with strings and brass"]
    context = [
        np.random.default_rng(n).normal(0, 0.1, (1, 640 * 20)).astype(np.float32) for n in (1, 2)
    ]
    together = generate_windows(tiny_model, prompts, [50, 7], SETTINGS, [5, 6], context)
    for index in range(2):
        single = generate_windows(
            tiny_model,
            prompts[index : index + 1],
            [[50, 7][index]],
            SETTINGS,
            [[5, 6][index]],
            context[index : index + 1],
        )[0]
        assert together[index].shape == single.shape == (1, [50, 7][index] * 640)
        np.testing.assert_array_equal(together[index], single)


def test_audio_prompts_of_different_lengths_rejected(tiny_model):
    context = [np.zeros((1, 640 * 10), np.float32), np.zeros((1, 640 * 12), np.float32)]
    with pytest.raises(ValueError, match="audio prompts of one length"):
        generate_windows(tiny_model, ["a", "b"], [5, 5], SETTINGS, [1, 2], context)


def test_stereo_batch_equals_alone(tiny_stereo_model_dir):
    loaded = load_model(str(tiny_stereo_model_dir), device="cpu")
    requests = REQUESTS[:2]
    results = generate_songs(loaded, requests, SETTINGS, batch_size=2)
    for result, request in zip(results[::-1], requests, strict=True):
        assert result.request == request
        assert result.audio.shape == (2, round(request.duration_s * 32_000))
        np.testing.assert_array_equal(result.audio, alone(loaded, request))


def test_song_handed_over_when_done(tiny_model):
    events = []
    results = generate_songs(
        tiny_model,
        REQUESTS,
        SETTINGS,
        batch_size=4,
        on_song=lambda result: events.append(("song", result.request.key)),
        on_window=lambda request, window, total: events.append(("window", request.key)),
    )
    # The 0.5 s song has one window: it is handed over after the first batch, before
    # any continuation of the others runs.
    assert events[:5] == [("window", key) for key in ("long", "short", "middle", "two")] + [
        ("song", "short")
    ]
    assert events.index(("song", "two")) < events.index(("song", "long"))
    assert [result.request.key for result in results] == ["short", "two", "middle", "long"]
    assert [result.windows for result in results] == [1, 1, 2, 3]
    assert all(result.started_at.endswith("+00:00") for result in results)


def test_time_shared_by_audio_seconds(tiny_model):
    requests = [REQUESTS[0], REQUESTS[2]]  # 3.3337 s and 2.5 s, windows of 100 then 50 frames
    results = {
        r.request.key: r for r in generate_songs(tiny_model, requests, SETTINGS, batch_size=2)
    }
    long, middle = results["long"], results["middle"]
    assert long.batch_sizes == [2, 2, 1]
    assert middle.batch_sizes == [2, 2]
    # Both songs gained the same audio in the two shared batches, so they split those
    # evenly; the long song alone paid for its third window.
    assert long.generation_time_s > middle.generation_time_s > 0


def test_shares_sum_to_the_batch_time(tiny_model, monkeypatch):
    import mgutil.batching as batching

    # A clock that advances 1 s per reading: each batch then takes exactly 1 s.
    ticks = iter(range(10_000))
    monkeypatch.setattr(batching, "_clock", lambda: float(next(ticks)))
    requests = [REQUESTS[1], REQUESTS[3]]  # one window each: 25 and 100 frames
    results = {
        r.request.key: r for r in generate_songs(tiny_model, requests, SETTINGS, batch_size=2)
    }
    assert results["short"].generation_time_s == pytest.approx(0.2)
    assert results["two"].generation_time_s == pytest.approx(0.8)


def test_failing_song_fails_alone(tiny_model, songs_alone):
    tokenizer = tiny_model.processor.tokenizer

    def fail_on_middle(kwargs):
        texts = tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=True)
        if any("walking" in text for text in texts):
            raise RuntimeError("decoder exploded (simulated)")

    handed = []
    with BatchSpy(tiny_model.model, fail_on_middle) as spy:
        results = generate_songs(
            tiny_model, REQUESTS, SETTINGS, batch_size=4, on_song=handed.append
        )
    by_key = {result.request.key: result for result in results}
    assert [result.request.key for result in handed] == [result.request.key for result in results]
    assert not by_key["middle"].ok
    assert "simulated" in str(by_key["middle"].error)
    assert by_key["middle"].audio is None
    for key in ("long", "short", "two"):
        np.testing.assert_array_equal(by_key[key].audio, songs_alone[key])
    # 4 songs fail; the first half passes, the second fails and splits again.
    assert [songs for songs, _ in spy.calls[:5]] == [4, 2, 2, 1, 1]


def test_out_of_memory_halves_the_batch(tiny_model, songs_alone):
    def fail_over_two(kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with BatchSpy(tiny_model.model, fail_over_two) as spy:
        results = generate_songs(tiny_model, REQUESTS, SETTINGS, batch_size=4)
    assert all(result.ok for result in results)
    for result in results:
        np.testing.assert_array_equal(result.audio, songs_alone[result.request.key])
    assert spy.calls[0][0] == 4
    assert max(songs for songs, _ in spy.calls[1:]) == 2


def test_default_batch_size(tiny_model, monkeypatch):
    assert default_batch_size(tiny_model, SETTINGS) == CPU_BATCH_SIZE

    # 2 layers x 32 wide x (1500 + 2 + 4) positions x keys and values x 4 bytes x 2 for
    # guidance, for a 30 s window.
    settings = GenerationSettings()
    per_song = window_cache_bytes(tiny_model, settings)
    assert per_song == 2 * 32 * 1506 * 2 * 4 * 2
    on_gpu = type(tiny_model)(**{**vars(tiny_model), "device": "cuda"})
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (per_song * 20, per_song * 40))
    assert default_batch_size(on_gpu, settings) == 10
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (per_song, per_song * 40))
    assert default_batch_size(on_gpu, settings) == 1


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_invalid_batch_size(tiny_model, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        generate_songs(tiny_model, REQUESTS[:1], SETTINGS, batch_size=batch_size)


def test_worker_batches_and_records_failure(tmp_path, tiny_model):
    import json

    import soundfile

    from mgutil.worker import prepare_batch, run_batch

    jobs = tmp_path / "prompts.txt"
    jobs.write_text("first beat ; 2 ; first\nsecond pad ; 1.5 ; second\nthird ; 3 ; third\n")
    plan = prepare_batch(
        prompts_path=jobs,
        output_uri=str(tmp_path / "out"),
        model_id=tiny_model.model_id,
        hourly_cost_usd=0.36,
        window_s=2.0,
        context_s=1.0,
        batch_size=3,
    )
    assert plan.parameters()["batch_size"] == 3
    tokenizer = tiny_model.processor.tokenizer

    def fail_on_second(kwargs):
        if any("second" in text for text in tokenizer.batch_decode(kwargs["input_ids"])):
            raise RuntimeError("CUDA out of memory (simulated)")

    with BatchSpy(tiny_model.model, fail_on_second) as spy:
        summary = run_batch(plan, loaded=tiny_model, progress=False)

    first, second, third = (job.output_name for job in plan.job_file.jobs)
    assert summary.failed == [second]
    assert sorted(summary.generated) == sorted([first, third])
    assert spy.calls[0][0] == 3
    for job in (plan.job_file.jobs[0], plan.job_file.jobs[2]):
        info = soundfile.info(str(tmp_path / "out" / job.output_name))
        assert info.frames == round(job.duration_s * 32_000)
        record = json.loads((tmp_path / "out" / "records" / job.record_name).read_text())
        assert record["status"] == "done"
        assert record["generation_time_s"] > 0
    assert not (tmp_path / "out" / second).exists()


def test_worker_rejects_invalid_batch_size(tmp_path):
    from mgutil.worker import prepare_batch

    jobs = tmp_path / "prompts.txt"
    jobs.write_text("beat ; 1 ; beat\n")
    with pytest.raises(ValueError, match="batch_size"):
        prepare_batch(prompts_path=jobs, output_uri=str(tmp_path / "out"), batch_size=0)
