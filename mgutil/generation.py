"""MusicGen loading and song generation with chunked continuation.

MusicGen was trained on 30 s clips, and its decoder has a fixed position limit, so a
longer song is made window by window: the first window from the text alone, each later
window from the text plus the last ``context_s`` seconds of the song so far as the audio
prompt. Only the new audio of each window is kept.

Audio arrays in this module are float32 NumPy arrays shaped ``(channels, samples)``
unless a docstring says otherwise; soundfile takes ``(samples, channels)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgutil.errors import GenerationError
from mgutil.jobs import GenerationSettings

logger = logging.getLogger(__name__)

# Peak amplitude under which a song counts as silent: about -100 dBFS, far below the
# quietest real music and above float16 round-off of an all-zero decode.
SILENCE_PEAK = 1e-5


@dataclass
class LoadedModel:
    """A MusicGen model with its processor and the audio facts the generator needs.

    Attributes:
        model: ``MusicgenForConditionalGeneration`` in eval mode.
        processor: The matching ``MusicgenProcessor``.
        model_id: Hub id or folder it was loaded from.
        device: ``"cuda"`` or ``"cpu"``.
        dtype: ``torch.float16`` on CUDA, ``torch.float32`` on the CPU.
        sampling_rate: Samples per second of the output audio (32 000 for MusicGen).
        audio_channels: 1 for mono checkpoints, 2 for stereo ones.
        hop_length: Audio samples per codec frame (640 for MusicGen, so 50 frames/s).
        max_positions: Decoder position limit in frames (2048 for the hub checkpoints).
        codebooks_per_channel: Codebooks per audio channel; the delay pattern makes the
            decoder take this many minus one extra steps.
        load_time_s: Seconds spent loading the model.
    """

    model: object
    processor: object
    model_id: str
    device: str
    dtype: object
    sampling_rate: int
    audio_channels: int
    hop_length: int
    max_positions: int
    codebooks_per_channel: int
    load_time_s: float = 0.0

    @property
    def frame_rate(self) -> float:
        return self.sampling_rate / self.hop_length

    def seconds_to_frames(self, seconds: float) -> int:
        return int(round(seconds * self.frame_rate))


@dataclass(frozen=True)
class Window:
    """One generate call of a song: ``context_frames`` of audio prompt, then new frames."""

    index: int
    start_frame: int
    context_frames: int
    new_frames: int


def select_device() -> tuple[str, object]:
    """Return ``("cuda", float16)`` when a GPU is present, else ``("cpu", float32)``."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def load_model(model_id: str, device: str | None = None) -> LoadedModel:
    """Load any MusicGen checkpoint that ``from_pretrained`` accepts, with its processor.

    Args:
        model_id: A hub id such as ``facebook/musicgen-small`` or a local folder.
        device: ``"cuda"`` or ``"cpu"``; chosen automatically when ``None``.
    """
    import time

    import torch
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    started = time.perf_counter()
    if device is None:
        device, dtype = select_device()
    else:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32

    logger.info("loading model %s on %s (%s)", model_id, device, str(dtype).replace("torch.", ""))
    processor = AutoProcessor.from_pretrained(model_id)
    model = MusicgenForConditionalGeneration.from_pretrained(model_id, dtype=dtype)
    model.to(device)
    model.eval()

    config = model.config
    audio_channels = int(config.decoder.audio_channels)
    loaded = LoadedModel(
        model=model,
        processor=processor,
        model_id=str(model_id),
        device=device,
        dtype=dtype,
        sampling_rate=int(config.audio_encoder.sampling_rate),
        audio_channels=audio_channels,
        hop_length=int(np.prod(config.audio_encoder.upsampling_ratios)),
        max_positions=int(config.decoder.max_position_embeddings),
        codebooks_per_channel=int(config.decoder.num_codebooks) // audio_channels,
    )
    loaded.load_time_s = time.perf_counter() - started
    logger.info(
        "loaded %s in %.1f s: %d Hz, %d channel(s), %.0f frames/s",
        model_id,
        loaded.load_time_s,
        loaded.sampling_rate,
        loaded.audio_channels,
        loaded.frame_rate,
    )
    return loaded


def validate_settings(loaded: LoadedModel, settings: GenerationSettings) -> None:
    """Check that one window fits the model's position limit.

    The decoder sees a start token, the context frames, the new frames and one extra step
    per codebook beyond the first (MusicGen's delay pattern).

    Raises:
        ValueError: The window, or context plus new audio, exceeds the position limit.
    """
    window_frames = loaded.seconds_to_frames(settings.window_s)
    positions = window_frames + loaded.codebooks_per_channel
    if positions > loaded.max_positions:
        max_window_s = (loaded.max_positions - loaded.codebooks_per_channel) / loaded.frame_rate
        raise ValueError(
            f"window_s={settings.window_s:g} needs {positions} decoder positions, over the "
            f"model's limit of {loaded.max_positions}: use window_s <= {max_window_s:.1f}"
        )
    if settings.context_s >= settings.window_s:
        raise ValueError(
            f"context_s={settings.context_s:g} must be shorter than window_s={settings.window_s:g}"
        )
    if loaded.seconds_to_frames(settings.window_s - settings.context_s) < 1:
        raise ValueError(
            f"window_s={settings.window_s:g} and context_s={settings.context_s:g} leave no new "
            "audio per continuation: make the context shorter"
        )


def plan_windows(total_frames: int, window_frames: int, context_frames: int) -> list[Window]:
    """Split a song of ``total_frames`` into windows.

    The first window has no context; each later one takes the last ``context_frames`` of
    the song so far and adds at most ``window_frames - context_frames`` new frames.
    """
    if total_frames <= 0:
        raise ValueError(f"total_frames={total_frames} must be positive")
    if not 0 <= context_frames < window_frames:
        raise ValueError(
            f"context_frames={context_frames} must be at least 0 and below window_frames={window_frames}"
        )
    windows = [Window(0, 0, 0, min(window_frames, total_frames))]
    done = windows[0].new_frames
    while done < total_frames:
        context = min(context_frames, done)
        new_frames = min(window_frames - context, total_frames - done)
        windows.append(Window(len(windows), done, context, new_frames))
        done += new_frames
    return windows


def window_seed(seed: int, window_index: int) -> int:
    """Seed of one window, so each window is reproducible on its own."""
    return (seed + 1_000_003 * window_index) % (2**32)


def generate_window(
    loaded: LoadedModel,
    prompt: str,
    new_frames: int,
    settings: GenerationSettings,
    seed: int,
    audio_prompt: np.ndarray | None = None,
) -> np.ndarray:
    """Generate ``new_frames`` frames of audio after an optional audio prompt.

    Args:
        loaded: The model.
        prompt: Text prompt.
        new_frames: Frames of new audio to return.
        settings: Sampling settings.
        seed: Seed for this window.
        audio_prompt: Audio to continue, ``(channels, samples)`` with samples a multiple
            of the hop length, or ``None`` for the first window.

    Returns:
        The new audio only, ``(channels, new_frames * hop_length)`` float32.
    """
    import torch

    processor_kwargs = {"text": [prompt], "padding": True, "return_tensors": "pt"}
    prompt_frames = 0
    if audio_prompt is not None:
        prompt_frames = audio_prompt.shape[-1] // loaded.hop_length
        # The feature extractor takes (samples,) for mono and (channels, samples) for stereo.
        audio = audio_prompt[0] if loaded.audio_channels == 1 else audio_prompt
        processor_kwargs["audio"] = [audio]
        processor_kwargs["sampling_rate"] = loaded.sampling_rate
    inputs = loaded.processor(**processor_kwargs)
    tensors = {}
    for name, value in inputs.items():
        value = value.to(loaded.device)
        if name == "input_values":
            value = value.to(loaded.dtype)
        tensors[name] = value

    torch.manual_seed(seed)
    with torch.inference_mode():
        output = loaded.model.generate(
            **tensors,
            do_sample=True,
            guidance_scale=settings.guidance_scale,
            top_k=settings.top_k,
            temperature=settings.temperature,
            # The delay pattern costs one step per codebook after the first.
            max_new_tokens=new_frames + loaded.codebooks_per_channel - 1,
        )
    audio_out = output[0].float().cpu().numpy()

    # The decoded audio includes the audio prompt; keep only what follows it.
    start = prompt_frames * loaded.hop_length
    stop = start + new_frames * loaded.hop_length
    if audio_out.shape[-1] < stop:
        raise GenerationError(
            f"the model returned {audio_out.shape[-1]} samples, expected at least {stop} "
            f"({prompt_frames} prompt frames + {new_frames} new frames)"
        )
    return np.ascontiguousarray(audio_out[:, start:stop], dtype=np.float32)


def generate_song(
    loaded: LoadedModel,
    prompt: str,
    duration_s: float,
    settings: GenerationSettings,
    seed: int,
    on_window: Callable[[Window, int], None] | None = None,
) -> np.ndarray:
    """Generate a song of exactly ``duration_s`` seconds, window by window.

    Args:
        loaded: The model.
        prompt: Text prompt.
        duration_s: Requested duration in seconds.
        settings: Window, context and sampling settings.
        seed: The job's seed; each window derives its own from it.
        on_window: Called after each window with the window and the number of windows.

    Returns:
        ``(channels, samples)`` float32 audio with ``round(duration_s * sampling_rate)``
        samples.

    Raises:
        GenerationError: The model returned too little, non-finite or silent audio.
    """
    validate_settings(loaded, settings)
    total_samples = int(round(duration_s * loaded.sampling_rate))
    total_frames = math.ceil(total_samples / loaded.hop_length)
    windows = plan_windows(
        total_frames,
        loaded.seconds_to_frames(settings.window_s),
        loaded.seconds_to_frames(settings.context_s),
    )

    song = np.zeros((loaded.audio_channels, total_frames * loaded.hop_length), dtype=np.float32)
    for window in windows:
        audio_prompt = None
        if window.context_frames:
            start = (window.start_frame - window.context_frames) * loaded.hop_length
            audio_prompt = song[:, start : window.start_frame * loaded.hop_length]
        new_audio = generate_window(
            loaded,
            prompt,
            window.new_frames,
            settings,
            window_seed(seed, window.index),
            audio_prompt,
        )
        begin = window.start_frame * loaded.hop_length
        song[:, begin : begin + new_audio.shape[-1]] = new_audio
        logger.debug(
            "window %d/%d: %d context + %d new frames",
            window.index + 1,
            len(windows),
            window.context_frames,
            window.new_frames,
        )
        if on_window is not None:
            on_window(window, len(windows))

    song = song[:, :total_samples]
    check_audio(song)
    return song


def check_audio(audio: np.ndarray) -> None:
    """Raise GenerationError when audio holds NaN or infinite values or is silent."""
    if not np.all(np.isfinite(audio)):
        raise GenerationError("the model produced NaN or infinite samples")
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak < SILENCE_PEAK:
        raise GenerationError(f"the model produced silence (peak amplitude {peak:.2e})")


def write_wav(path: str | Path, audio: np.ndarray, sampling_rate: int) -> None:
    """Write ``(channels, samples)`` audio as 16-bit PCM WAV.

    Samples outside [-1, 1] are clipped, as 16-bit PCM cannot hold them.
    """
    import soundfile

    frames = np.clip(audio, -1.0, 1.0).T  # soundfile expects (frames, channels)
    soundfile.write(str(path), frames, sampling_rate, subtype="PCM_16", format="WAV")
