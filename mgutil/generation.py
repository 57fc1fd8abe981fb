"""MusicGen loading and song generation with chunked continuation.

MusicGen was trained on 30 s clips, and its decoder has a fixed position limit, so a
longer song is made window by window: the first window from the text alone, each later
window from the text plus the last ``context_s`` seconds of the song so far as the audio
prompt. Only the new audio of each window is kept.

Audio arrays in this module are float32 NumPy arrays shaped ``(channels, samples)``
unless a docstring says otherwise; soundfile takes ``(samples, channels)``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from contextlib import contextmanager
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
    try:
        processor = AutoProcessor.from_pretrained(model_id)
        model = MusicgenForConditionalGeneration.from_pretrained(model_id, dtype=dtype)
    except OSError as error:
        # transformers raises OSError for a missing folder, an unknown hub id and a hub
        # that cannot be reached (HF_HUB_OFFLINE=1 included).
        raise GenerationError(
            f"cannot load the MusicGen checkpoint {model_id!r}: {error}. Pass a hub id such "
            "as facebook/musicgen-small with network access, or a local folder with "
            "-p model_id or MUSICGEN_MODEL (python -m mgutil.tiny_model DIR builds a tiny "
            "offline one)"
        ) from error
    loaded = wrap_model(model, processor, model_id, device, dtype)
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


def wrap_model(model, processor, model_id: str, device: str, dtype) -> LoadedModel:
    """Move a MusicGen model to ``device`` in eval mode and read its audio facts.

    Args:
        model: A ``MusicgenForConditionalGeneration``, already in ``dtype``.
        processor: Its ``MusicgenProcessor``.
        model_id: A name for logs and records.
        device: ``"cuda"`` or ``"cpu"``.
        dtype: The dtype of the model's weights.
    """
    model.to(device)
    model.eval()
    config = model.config
    audio_channels = int(config.decoder.audio_channels)
    return LoadedModel(
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


@contextmanager
def cpu_threads(loaded: LoadedModel, threads: int | None):
    """Run the block with ``threads`` PyTorch CPU threads, then restore the setting.

    ``None`` keeps the process's setting, PyTorch's default of one thread per core,
    which was fastest on an idle CPU. Fewer threads help when other processes load the
    cores: PyTorch splits each operation over its threads and waits for the slowest.
    The thread count changes float rounding, so songs compared bit for bit must share
    it. On CUDA the setting is left alone: the CPU only launches kernels there.
    """
    import torch

    if threads is None or loaded.device.startswith("cuda"):
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r} is invalid: expected a whole number >= 1 or None")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


class SeededSampler:
    """Sample each song's next codes from its own random generator.

    Hugging Face's sampling draws from the global RNG, so a song sampled next to others
    would depend on its batch mates. This logits processor runs after classifier-free
    guidance, applies temperature and top-k, draws one code per row with the generator of
    the row's song, and returns scores that are ``-inf`` except at the drawn code, so
    greedy search picks it. A song's codes then depend on its seed and inputs only.

    Args:
        seeds: One seed per song of the batch.
        rows_per_song: Score rows per song, the decoder's codebook count (4 for mono
            MusicGen, 8 for stereo); row ``r`` belongs to song ``r // rows_per_song``.
        top_k: Codes kept per row before sampling.
        temperature: Divides the scores before the softmax.
    """

    def __init__(self, seeds: list[int], rows_per_song: int, top_k: int, temperature: float):
        import torch

        self.rows_per_song = rows_per_song
        self.top_k = top_k
        self.temperature = temperature
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def __call__(self, input_ids, scores):
        """Return one-hot ``(songs * rows_per_song, vocab)`` scores: 0 at the drawn code."""
        import torch

        expected_rows = len(self.generators) * self.rows_per_song
        if scores.shape[0] != expected_rows:
            # Guidance must halve the rows before this processor; anything else would
            # give songs each other's codes.
            raise GenerationError(
                f"the sampler got {scores.shape[0]} score rows, expected {expected_rows}: "
                "classifier-free guidance did not run before it"
            )
        scores = scores.float() / self.temperature
        top_k = min(self.top_k, scores.shape[-1])
        values, indices = scores.topk(top_k, dim=-1)
        cumulative = values.softmax(dim=-1).cumsum(dim=-1)
        # Uniform draws from each song's own generator, on the CPU so CUDA and CPU runs
        # draw the same numbers.
        uniforms = torch.cat(
            [torch.rand(self.rows_per_song, generator=generator) for generator in self.generators]
        ).to(scores.device)
        uniforms = uniforms.unsqueeze(-1) * cumulative[:, -1:]
        picks = torch.searchsorted(cumulative, uniforms).clamp_(max=top_k - 1)
        tokens = indices.gather(-1, picks)
        chosen = torch.full_like(scores, float("-inf"))
        chosen.scatter_(-1, tokens, 0.0)
        return chosen


class _SamplerLast(list):
    """A logits processor list that keeps its last processor last.

    MusicGen's generate appends the classifier-free guidance processor to the list it is
    given, and guidance must come before sampling, so appends go before the sampler.
    """

    def append(self, processor) -> None:
        self.insert(len(self) - 1, processor)


class _CodeCapture:
    """Record the codes generate decodes, and skip its decoding of the padded batch.

    Every song is decoded on its own afterwards from exactly its own frames: EnCodec's
    convolutions see past a song's end, and batched convolutions round differently, so
    decoding the whole batch would change a song by its batch mates.
    """

    def __init__(self, model):
        self.audio_encoder = model.audio_encoder
        self.calls: list[tuple[object, object]] = []

    def __enter__(self):
        self.decode = self.audio_encoder.decode
        self.audio_encoder.decode = self._capture
        return self

    def __exit__(self, *exc):
        self.audio_encoder.decode = self.decode

    def _capture(self, audio_codes, audio_scales=None, **kwargs):
        from types import SimpleNamespace

        self.calls.append((audio_codes, audio_scales))
        # generate only concatenates the channels' values and returns them.
        return SimpleNamespace(audio_values=audio_codes.new_zeros((audio_codes.shape[1], 1, 1)))

    def decode_song(self, song: int, frames: int):
        """Decode song ``song``'s first ``frames`` frames into ``(channels, samples)``."""
        import torch

        channels = []
        for codes, scales in self.calls:
            values = self.decode(
                codes[:, song : song + 1, :, :frames], audio_scales=_song_scales(scales, song)
            )
            channels.append(values.audio_values[0])
        return torch.cat(channels, dim=0)


def lookahead_frames(loaded: LoadedModel) -> int:
    """Return the frames each song runs past its end, so its kept frames ignore batch mates.

    With MusicGen's delay pattern, codebook ``k`` of frame ``f`` is predicted from the
    first codebook's frame ``f + k - 1``. A song's last kept frames therefore depend on
    whether the first codebook went on past the song's end or was padded, which would
    make a short song in a batch with longer ones differ from the same song alone. When
    every song runs ``codebooks - 2`` frames past its end, its kept frames only ever see
    generated codes, however long the batch runs.
    """
    return max(loaded.codebooks_per_channel - 2, 0)


def _song_scales(scales, song: int) -> list:
    """Pick one song's EnCodec scales: a list with one entry per codec chunk."""
    if scales is None:
        return [None]
    if isinstance(scales, list | tuple):
        # Each chunk's scales are a tensor with the batch first, or None without
        # normalisation, which MusicGen's EnCodec does not use.
        return [None if chunk is None else chunk[song : song + 1] for chunk in scales]
    return scales[song : song + 1]


def generate_windows(
    loaded: LoadedModel,
    prompts: list[str],
    new_frames: list[int],
    settings: GenerationSettings,
    seeds: list[int],
    audio_prompts: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Generate one window for each of several songs in a single ``generate`` call.

    Each song gets exactly the audio it would get alone: its codes come from its own
    seed (:class:`SeededSampler`), and its audio is decoded from its own frames only.
    The batch runs for the longest song's frames and shorter songs are cut afterwards.

    Args:
        loaded: The model.
        prompts: Text prompt of each song.
        new_frames: Frames of new audio to return for each song.
        settings: Sampling settings.
        seeds: Seed of each song's window.
        audio_prompts: ``None`` for first windows, else one audio prompt per song, each
            ``(channels, samples)`` with the same number of samples, a multiple of the
            hop length. Equal lengths keep padding out of the decoder's prompt codes.

    Returns:
        One ``(channels, new_frames[i] * hop_length)`` float32 array per song.

    Raises:
        ValueError: The lists differ in length, or the audio prompts in sample count.
        GenerationError: The model returned fewer samples than asked for.
    """
    import torch

    count = len(prompts)
    if count == 0 or len(new_frames) != count or len(seeds) != count:
        raise ValueError(
            f"expected one prompt, frame count and seed per song, got {len(prompts)} prompts, "
            f"{len(new_frames)} frame counts and {len(seeds)} seeds"
        )
    if min(new_frames) < 1:
        raise ValueError(f"every song needs at least one new frame, got {new_frames}")

    processor_kwargs = {"text": list(prompts), "padding": True, "return_tensors": "pt"}
    prompt_frames = 0
    if audio_prompts is not None:
        lengths = {audio.shape[-1] for audio in audio_prompts}
        if len(audio_prompts) != count or len(lengths) != 1:
            raise ValueError(
                f"expected {count} audio prompts of one length, got {len(audio_prompts)} "
                f"with lengths {sorted(lengths)}"
            )
        prompt_frames = lengths.pop() // loaded.hop_length
        # The feature extractor takes (samples,) for mono and (channels, samples) for stereo.
        processor_kwargs["audio"] = [
            audio[0] if loaded.audio_channels == 1 else audio for audio in audio_prompts
        ]
        processor_kwargs["sampling_rate"] = loaded.sampling_rate
    inputs = loaded.processor(**processor_kwargs)
    tensors = {}
    for name, value in inputs.items():
        value = value.to(loaded.device)
        if name == "input_values":
            value = value.to(loaded.dtype)
        tensors[name] = value

    model = loaded.model
    sampler = SeededSampler(
        seeds,
        rows_per_song=loaded.codebooks_per_channel * loaded.audio_channels,
        top_k=settings.top_k,
        temperature=settings.temperature,
    )
    # Greedy search takes the sampler's pick; top-k and temperature live in the sampler.
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    # Library defaults that greedy search ignores; the checkpoint's own top-k (250)
    # would only draw a warning that it is unused.
    config.top_k = 50
    config.top_p = 1.0
    config.temperature = 1.0
    config.guidance_scale = settings.guidance_scale
    # Every song runs a few frames past its own end (see lookahead_frames), and the
    # delay pattern costs one step per codebook after the first.
    run_frames = max(new_frames) + lookahead_frames(loaded)
    config.max_new_tokens = run_frames + loaded.codebooks_per_channel - 1
    config.max_length = None

    with torch.inference_mode(), _CodeCapture(model) as capture:
        model.generate(
            **tensors, generation_config=config, logits_processor=_SamplerLast([sampler])
        )
        songs = []
        for song, frames in enumerate(new_frames):
            audio = capture.decode_song(song, prompt_frames + frames).float().cpu().numpy()
            # The decoded audio includes the audio prompt; keep only what follows it.
            start = prompt_frames * loaded.hop_length
            stop = start + frames * loaded.hop_length
            if audio.shape[-1] < stop:
                raise GenerationError(
                    f"the model returned {audio.shape[-1]} samples, expected at least {stop} "
                    f"({prompt_frames} prompt frames + {frames} new frames)"
                )
            songs.append(np.ascontiguousarray(audio[:, start:stop], dtype=np.float32))
    return songs


def generate_window(
    loaded: LoadedModel,
    prompt: str,
    new_frames: int,
    settings: GenerationSettings,
    seed: int,
    audio_prompt: np.ndarray | None = None,
) -> np.ndarray:
    """Generate ``new_frames`` frames of audio after an optional audio prompt.

    The same code path as a batch of one in :func:`generate_windows`, so a song's
    audio is identical whether it is generated alone or with others.

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
    audio_prompts = None if audio_prompt is None else [audio_prompt]
    return generate_windows(loaded, [prompt], [new_frames], settings, [seed], audio_prompts)[0]


def generate_song(
    loaded: LoadedModel,
    prompt: str,
    duration_s: float,
    settings: GenerationSettings,
    seed: int,
    on_window: Callable[[Window, int], None] | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Generate a song of exactly ``duration_s`` seconds, window by window.

    Args:
        loaded: The model.
        prompt: Text prompt.
        duration_s: Requested duration in seconds.
        settings: Window, context and sampling settings.
        seed: The job's seed; each window derives its own from it.
        on_window: Called after each window with the window and the number of windows.
        threads: PyTorch CPU threads while generating; ``None`` keeps the process's
            setting. Ignored on CUDA.

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
    with cpu_threads(loaded, threads):
        for window in windows:
            _generate_song_window(loaded, prompt, settings, seed, song, window, len(windows))
            if on_window is not None:
                on_window(window, len(windows))

    song = song[:, :total_samples]
    check_audio(song)
    return song


def _generate_song_window(
    loaded: LoadedModel,
    prompt: str,
    settings: GenerationSettings,
    seed: int,
    song: np.ndarray,
    window: Window,
    window_count: int,
) -> None:
    """Generate one window of ``song`` in place, from the song's audio so far."""
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
        window_count,
        window.context_frames,
        window.new_frames,
    )


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
