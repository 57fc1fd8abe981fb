"""Hooks of batched generation: admitting, resuming, stopping and dropping songs."""

from __future__ import annotations

import numpy as np
import pytest

from mgutil.batching import Resume, SongRequest, generate_songs
from mgutil.generation import generate_song
from mgutil.jobs import GenerationSettings

SETTINGS = GenerationSettings(window_s=2.0, context_s=1.0)
REQUESTS = [
    SongRequest("long", "epic orchestral soundtrack", 4.3, seed=21),
    SongRequest("middle", "jazz trio", 3.0, seed=22),
    SongRequest("short", "lofi", 1.0, seed=23),
]


@pytest.fixture(scope="module")
def songs_alone(tiny_model):
    return {
        request.key: generate_song(
            tiny_model, request.prompt, request.duration_s, SETTINGS, request.seed
        )
        for request in REQUESTS
    }


def test_stop_then_resume_equals_alone(tiny_model, songs_alone):
    progress = {}
    batches = []

    def stop_after_two_batches() -> bool:
        batches.append(1)
        return len(batches) > 2

    first = generate_songs(
        tiny_model,
        REQUESTS,
        SETTINGS,
        batch_size=2,
        on_progress=lambda song: progress.__setitem__(song.request.key, song),
        should_stop=stop_after_two_batches,
    )
    finished = {result.request.key for result in first}
    assert finished == {"middle"}
    assert progress["long"].windows_done == 2
    assert progress["long"].frames_done == progress["long"].audio.shape[1] // 640
    saved = {
        key: Resume(song.audio.copy(), song.windows_done)
        for key, song in progress.items()
        if key not in finished
    }

    def admit(request: SongRequest):
        if request.key in finished:
            return False
        return saved.get(request.key, True)

    second = generate_songs(tiny_model, REQUESTS, SETTINGS, batch_size=2, admit=admit)
    assert sorted(result.request.key for result in second) == ["long", "short"]
    for result in [*first, *second]:
        assert result.ok
        np.testing.assert_array_equal(result.audio, songs_alone[result.request.key])


def test_refused_songs_get_no_result(tiny_model):
    admitted = []

    def admit(request: SongRequest) -> bool:
        admitted.append(request.key)
        return request.key == "short"

    results = generate_songs(tiny_model, REQUESTS, SETTINGS, batch_size=2, admit=admit)
    assert [result.request.key for result in results] == ["short"]
    assert admitted == ["long", "middle", "short"]


def test_resume_that_does_not_fit_restarts(tiny_model, songs_alone, caplog):
    wrong = Resume(np.zeros((1, 123), dtype=np.float32), 1)
    results = generate_songs(
        tiny_model, REQUESTS[:1], SETTINGS, batch_size=2, admit=lambda request: wrong
    )
    assert "starting it afresh" in caplog.text
    np.testing.assert_array_equal(results[0].audio, songs_alone["long"])


def test_dropped_song_leaves_run(tiny_model):
    def drop_long(song) -> bool:
        return song.request.key != "long"

    results = generate_songs(tiny_model, REQUESTS, SETTINGS, batch_size=3, on_progress=drop_long)
    assert sorted(result.request.key for result in results) == ["middle", "short"]


def test_stop_before_first_batch(tiny_model):
    admitted = []
    results = generate_songs(
        tiny_model,
        REQUESTS,
        SETTINGS,
        admit=lambda request: admitted.append(request.key) or True,
        should_stop=lambda: True,
    )
    assert results == []
    assert admitted == []
