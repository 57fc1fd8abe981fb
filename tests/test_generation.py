"""Generation with the tiny model: exact lengths, continuation prompts, stereo, WAV files."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from mgutil.errors import GenerationError
from mgutil.generation import (
    check_audio,
    generate_song,
    load_model,
    plan_windows,
    validate_settings,
    write_wav,
)
from mgutil.jobs import GenerationSettings

SETTINGS = GenerationSettings()


class GenerateSpy:
    """Wrap the model's real generate and record the audio prompt of each call."""

    def __init__(self, model):
        self.model = model
        self.original = model.generate
        self.prompt_samples: list[int] = []
        self.prompt_dtypes: list[torch.dtype] = []
        self.prompts: list[np.ndarray | None] = []

    def __call__(self, **kwargs):
        values = kwargs.get("input_values")
        self.prompt_samples.append(0 if values is None else values.shape[-1])
        self.prompts.append(None if values is None else values[0].float().numpy().copy())
        if values is not None:
            self.prompt_dtypes.append(values.dtype)
        return self.original(**kwargs)

    def __enter__(self):
        self.model.generate = self
        return self

    def __exit__(self, *exc):
        self.model.generate = self.original


def test_tiny_model_facts(tiny_model):
    assert tiny_model.sampling_rate == 32_000
    assert tiny_model.frame_rate == 50
    assert tiny_model.hop_length == 640
    assert tiny_model.codebooks_per_channel == 4
    assert tiny_model.audio_channels == 1
    assert tiny_model.device == "cpu"
    assert tiny_model.dtype == torch.float32


def test_short_song_exact_length(tiny_model):
    with GenerateSpy(tiny_model.model) as spy:
        audio = generate_song(tiny_model, "short beat", 4.0, SETTINGS, seed=1)
    assert audio.shape == (1, 4 * 32_000)
    assert audio.dtype == np.float32
    assert spy.prompt_samples == [0]


def test_long_song_continues_with_context(tiny_model):
    windows = []
    with GenerateSpy(tiny_model.model) as spy:
        audio = generate_song(
            tiny_model,
            "long ambient",
            70.0,
            SETTINGS,
            seed=2,
            on_window=lambda w, n: windows.append(w),
        )
    assert audio.shape == (1, 70 * 32_000)
    # 30 s, then two continuations of 20 s new audio after 10 s of context each.
    assert [w.new_frames for w in windows] == [1500, 1000, 1000]
    assert spy.prompt_samples == [0, 10 * 32_000, 10 * 32_000]
    assert spy.prompt_dtypes == [torch.float32, torch.float32]
    # Each audio prompt is the last 10 s of the song so far, which the song keeps once.
    np.testing.assert_array_equal(spy.prompts[1], audio[:, 20 * 32_000 : 30 * 32_000])
    np.testing.assert_array_equal(spy.prompts[2], audio[:, 40 * 32_000 : 50 * 32_000])


def test_fractional_duration_exact_samples(tiny_model):
    audio = generate_song(tiny_model, "odd length", 3.3337, SETTINGS, seed=3)
    assert audio.shape[-1] == round(3.3337 * 32_000)


def test_same_seed_same_song(tiny_model):
    settings = GenerationSettings(window_s=2.0, context_s=1.0)
    first = generate_song(tiny_model, "repeatable", 3.0, settings, seed=7)
    second = generate_song(tiny_model, "repeatable", 3.0, settings, seed=7)
    other = generate_song(tiny_model, "repeatable", 3.0, settings, seed=8)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_continuation_does_not_repeat_context(tiny_model):
    # With a 2 s window and 1 s context, each window adds 1 s: the song's second
    # second must not equal its first (a duplicated prompt would copy it).
    settings = GenerationSettings(window_s=2.0, context_s=1.0)
    audio = generate_song(tiny_model, "no repeats", 4.0, settings, seed=11)
    assert audio.shape[-1] == 4 * 32_000
    seconds = audio[0].reshape(4, 32_000)
    for index in range(1, 4):
        assert not np.allclose(seconds[index], seconds[index - 1])


def test_stereo_variant_two_channels(tiny_stereo_model_dir, tmp_path):
    loaded = load_model(str(tiny_stereo_model_dir), device="cpu")
    assert loaded.audio_channels == 2
    assert loaded.codebooks_per_channel == 4
    settings = GenerationSettings(window_s=2.0, context_s=1.0)
    with GenerateSpy(loaded.model) as spy:
        audio = generate_song(loaded, "wide stereo pad", 3.0, settings, seed=5)
    assert audio.shape == (2, 3 * 32_000)
    assert spy.prompt_samples == [0, 32_000]

    path = tmp_path / "stereo.wav"
    write_wav(path, audio, loaded.sampling_rate)
    info = soundfile.info(str(path))
    assert info.channels == 2
    assert info.frames == 3 * 32_000


def test_wav_is_16bit_pcm(tiny_model, tmp_path):
    audio = generate_song(tiny_model, "pcm", 1.0, SETTINGS, seed=4)
    path = tmp_path / "song.wav"
    write_wav(path, audio, tiny_model.sampling_rate)
    info = soundfile.info(str(path))
    assert info.subtype == "PCM_16"
    assert info.format == "WAV"
    assert info.samplerate == 32_000
    assert info.channels == 1
    assert info.frames == 32_000


@pytest.mark.parametrize(
    ("total", "window", "context", "new_frames"),
    [
        (200, 1500, 500, [200]),
        (1500, 1500, 500, [1500]),
        (1750, 1500, 500, [1500, 250]),
        (3500, 1500, 500, [1500, 1000, 1000]),
        (3501, 1500, 500, [1500, 1000, 1000, 1]),
    ],
)
def test_window_plan(total, window, context, new_frames):
    windows = plan_windows(total, window, context)
    assert [w.new_frames for w in windows] == new_frames
    assert sum(w.new_frames for w in windows) == total
    assert [w.context_frames for w in windows] == [0] + [context] * (len(windows) - 1)


def test_window_over_position_limit_rejected(tiny_model):
    with pytest.raises(ValueError, match="window_s <= 40.9"):
        validate_settings(tiny_model, GenerationSettings(window_s=45.0, context_s=10.0))


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (np.full((1, 100), np.nan, dtype=np.float32), "NaN"),
        (np.full((1, 100), np.inf, dtype=np.float32), "NaN or infinite"),
        (np.zeros((1, 100), dtype=np.float32), "silence"),
    ],
)
def test_bad_audio_rejected(audio, message):
    with pytest.raises(GenerationError, match=message):
        check_audio(audio)


def test_missing_checkpoint_names_fix(tmp_path):
    with pytest.raises(GenerationError) as raised:
        load_model(str(tmp_path / "no-such-model"), device="cpu")
    message = str(raised.value)
    assert "no-such-model" in message
    assert "MUSICGEN_MODEL" in message
