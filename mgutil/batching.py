"""Generate many songs together: windows of several songs share one ``generate`` call.

Autoregressive decoding reads every weight of the decoder once per step whatever the
batch size, so songs decoded together cost little more than one on a GPU, and far less
than one each on a CPU too. :func:`generate_songs` groups the windows of pending songs
into batches of up to ``batch_size`` songs:

- A batch contains windows with the same audio-prompt length: first windows (no audio
  prompt) with first windows, continuations (``context_s`` of audio prompt) with
  continuations. Equal lengths need no padding, so each song's decoder prompt holds its
  own codes only, exactly as when it is generated alone.
- Continuations of started songs go first once there are enough of them to fill a
  batch, so songs finish, and are stored, early, and at most about two batches of songs
  are held in memory. New songs start while the continuations would not fill a batch.
- Songs of different lengths share batches: the batch runs for its longest window and
  each song keeps its own frames (:func:`mgutil.generation.generate_windows`).
- A finished song is handed to ``on_song`` at once, not at the end of its batch.
- A failing batch is split in two and each half retried, so one bad song fails alone;
  out of memory also halves the batch size for the rest of the run.
- A caller that coordinates with other workers admits each song right before its first
  batch (``admit``), may hand in a song's earlier windows to continue from, hears of
  each song's progress after every window (``on_progress``), and may stop the run
  between two batches (``should_stop``).

Each song's generation time is its share of every batch it was in: the batch's wall
time divided among its songs by the audio seconds each one gained, so the shares of all
songs sum to the time the batches took.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from mgutil.errors import GenerationError
from mgutil.generation import (
    LoadedModel,
    Window,
    check_audio,
    cpu_threads,
    generate_windows,
    lookahead_frames,
    plan_windows,
    validate_settings,
    window_seed,
)
from mgutil.jobs import GenerationSettings

logger = logging.getLogger(__name__)

# The clock of the batch times; tests replace it to check how time is shared.
_clock = time.perf_counter

# Songs per batch on a CPU: the batch of the CPU runs in docs/benchmarks.md (2-core
# Xeon with AMX, musicgen-small architecture). No other size was measured there.
CPU_BATCH_SIZE = 16
# Upper bound on CUDA, where the memory estimate allows more: beyond this the decoding
# steps are compute-bound and larger batches only delay the first stored song.
MAX_CUDA_BATCH_SIZE = 64
# Share of free GPU memory that the KV caches may fill; the rest covers activations,
# logits and the cache's growth by concatenation, which briefly needs two copies.
CUDA_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class SongRequest:
    """One song to generate.

    Attributes:
        key: The caller's name for the song, such as its output file name.
        prompt: Text prompt.
        duration_s: Requested duration in seconds.
        seed: The song's seed; each window derives its own from it.
    """

    key: str
    prompt: str
    duration_s: float
    seed: int


@dataclass
class SongResult:
    """A finished song, or a failed one.

    Attributes:
        request: What was asked for.
        audio: ``(channels, samples)`` float32 with ``round(duration_s * sampling_rate)``
            samples, or ``None`` when the song failed.
        generation_time_s: The song's share of the wall time of every batch it was in.
        windows: Number of windows of the song.
        batch_sizes: Songs in each batch that generated one of its windows.
        error: Why the song failed, or ``None``.
        started_at: ISO 8601 UTC time its first window started.
    """

    request: SongRequest
    audio: np.ndarray | None
    generation_time_s: float
    windows: int
    batch_sizes: list[int] = field(default_factory=list)
    error: Exception | None = None
    started_at: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Resume:
    """Windows of a song generated earlier, to continue from.

    Attributes:
        audio: ``(channels, samples)`` float32 audio of the first ``windows_done``
            windows: exactly the samples up to the start of the next window.
        windows_done: Number of windows generated so far.
    """

    audio: np.ndarray
    windows_done: int


@dataclass(frozen=True)
class SongProgress:
    """A song after one of its windows, with more windows to go.

    Attributes:
        request: The song.
        audio: ``(channels, samples)`` float32 audio so far, a view of the song's buffer
            that later windows do not change.
        windows_done: Windows generated so far, resumed ones included.
        frames_done: Codec frames generated so far.
        windows: Number of windows of the song.
        generation_time_s: The song's share of this run's batches so far.
    """

    request: SongRequest
    audio: np.ndarray
    windows_done: int
    frames_done: int
    windows: int
    generation_time_s: float


class _Song:
    """A song being generated: its windows, its audio so far and its time share."""

    def __init__(self, request: SongRequest, loaded: LoadedModel, settings: GenerationSettings):
        self.request = request
        self.total_samples = int(round(request.duration_s * loaded.sampling_rate))
        total_frames = math.ceil(self.total_samples / loaded.hop_length)
        self.windows = plan_windows(
            total_frames,
            loaded.seconds_to_frames(settings.window_s),
            loaded.seconds_to_frames(settings.context_s),
        )
        self.hop_length = loaded.hop_length
        self.audio = np.zeros(
            (loaded.audio_channels, total_frames * loaded.hop_length), dtype=np.float32
        )
        self.next_index = 0
        self.time_s = 0.0
        self.batch_sizes: list[int] = []
        self.error: Exception | None = None
        self.started_at: str | None = None

    @property
    def window(self) -> Window:
        return self.windows[self.next_index]

    def resume(self, resume: Resume) -> bool:
        """Continue from earlier windows; return False, and start afresh, when they do not fit."""
        if not 0 < resume.windows_done < len(self.windows):
            logger.warning(
                "cannot resume %s after %d of its %d windows: starting it afresh",
                self.request.key,
                resume.windows_done,
                len(self.windows),
            )
            return False
        samples = self.windows[resume.windows_done].start_frame * self.hop_length
        expected = (self.audio.shape[0], samples)
        if resume.audio.shape != expected:
            logger.warning(
                "cannot resume %s: its earlier audio is %s, expected %s (channels, samples); "
                "starting it afresh",
                self.request.key,
                resume.audio.shape,
                expected,
            )
            return False
        self.audio[:, :samples] = resume.audio
        self.next_index = resume.windows_done
        return True

    def progress(self) -> SongProgress:
        frames_done = self.windows[self.next_index].start_frame
        return SongProgress(
            request=self.request,
            audio=self.audio[:, : frames_done * self.hop_length],
            windows_done=self.next_index,
            frames_done=frames_done,
            windows=len(self.windows),
            generation_time_s=self.time_s,
        )

    @property
    def finished(self) -> bool:
        return self.error is not None or self.next_index >= len(self.windows)

    def audio_prompt(self) -> np.ndarray | None:
        window = self.window
        if not window.context_frames:
            return None
        start = (window.start_frame - window.context_frames) * self.hop_length
        return self.audio[:, start : window.start_frame * self.hop_length]

    def add(self, new_audio: np.ndarray) -> None:
        begin = self.window.start_frame * self.hop_length
        self.audio[:, begin : begin + new_audio.shape[-1]] = new_audio
        self.next_index += 1

    def result(self) -> SongResult:
        audio = None
        error = self.error
        if error is None:
            audio = self.audio[:, : self.total_samples]
            try:
                check_audio(audio)
            except GenerationError as bad_audio:
                audio, error = None, bad_audio
        return SongResult(
            request=self.request,
            audio=audio,
            generation_time_s=self.time_s,
            windows=len(self.windows),
            batch_sizes=list(self.batch_sizes),
            error=error,
            started_at=self.started_at,
        )


def is_out_of_memory(error: BaseException) -> bool:
    """Return whether ``error`` means that the accelerator ran out of memory."""
    import torch

    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(error, out_of_memory):
        return True
    # Some kernels report it as a plain RuntimeError.
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def window_cache_bytes(loaded: LoadedModel, settings: GenerationSettings) -> int:
    """Bytes of decoder KV cache that one song's window fills, guidance included.

    Keys and values of every decoder layer for every position of a full window (the
    start token, the window's frames, the lookahead and the delay steps), twice with
    classifier-free guidance, which decodes an unconditional copy of every song.
    """
    import torch

    decoder = loaded.model.config.decoder
    positions = (
        loaded.seconds_to_frames(settings.window_s)
        + lookahead_frames(loaded)
        + loaded.codebooks_per_channel
    )
    element_bytes = torch.empty((), dtype=loaded.dtype).element_size()
    guidance_copies = 2 if settings.guidance_scale > 1 else 1
    return (
        2
        * int(decoder.num_hidden_layers)
        * int(decoder.hidden_size)
        * positions
        * element_bytes
        * guidance_copies
    )


def default_batch_size(loaded: LoadedModel, settings: GenerationSettings) -> int:
    """Songs per batch for this device.

    On CUDA, as many songs as fit in :data:`CUDA_MEMORY_SHARE` of the free memory with
    the KV cache of a full window each (:func:`window_cache_bytes`), at most
    :data:`MAX_CUDA_BATCH_SIZE`. On a CPU, :data:`CPU_BATCH_SIZE`.
    """
    if not loaded.device.startswith("cuda"):
        return CPU_BATCH_SIZE
    import torch

    free_bytes, _total = torch.cuda.mem_get_info(torch.device(loaded.device))
    per_song = window_cache_bytes(loaded, settings)
    size = int(free_bytes * CUDA_MEMORY_SHARE // per_song)
    size = max(1, min(size, MAX_CUDA_BATCH_SIZE))
    logger.info(
        "batch size %d: %.1f GiB free, %.2f GiB of KV cache per song",
        size,
        free_bytes / 2**30,
        per_song / 2**30,
    )
    return size


class _Scheduler:
    """Pick the next batch of windows, run it, and split it when it fails."""

    def __init__(
        self,
        loaded: LoadedModel,
        settings: GenerationSettings,
        batch_size: int,
        on_window: Callable[[SongRequest, Window, int], None] | None,
        admit: Callable[[SongRequest], bool | Resume] | None = None,
    ):
        self.loaded = loaded
        self.settings = settings
        self.batch_size = batch_size
        self.on_window = on_window
        self.admit = admit

    def next_batch(self, pending: deque[_Song], active: list[_Song]) -> list[_Song]:
        """Return up to ``batch_size`` songs whose next windows have one context length.

        Empty when every pending song was refused and no song is in progress.
        """
        batch = self._continuations(active, only_full=bool(pending))
        if batch:
            return batch
        while pending and len(batch) < self.batch_size:
            song = pending.popleft()
            if not self._admit(song):
                continue
            active.append(song)
            # A resumed song needs an audio prompt, so it joins the continuations.
            if song.next_index == 0:
                batch.append(song)
        return batch or self._continuations(active, only_full=False)

    def _continuations(self, active: list[_Song], only_full: bool) -> list[_Song]:
        continuing = [song for song in active if song.next_index > 0]
        if not continuing:
            return []
        context = continuing[0].window.context_frames
        same_context = [song for song in continuing if song.window.context_frames == context]
        if only_full and len(same_context) < self.batch_size:
            return []
        return same_context[: self.batch_size]

    def _admit(self, song: _Song) -> bool:
        if self.admit is None:
            return True
        decision = self.admit(song.request)
        if isinstance(decision, Resume):
            song.resume(decision)
            return True
        return bool(decision)

    def run(self, batch: list[_Song]) -> None:
        """Generate the next window of every song in ``batch``; mark failures on the songs."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        for song in batch:
            song.started_at = song.started_at or now
        started = _clock()
        try:
            new_audio = generate_windows(
                self.loaded,
                [song.request.prompt for song in batch],
                [song.window.new_frames for song in batch],
                self.settings,
                [window_seed(song.request.seed, song.window.index) for song in batch],
                None if batch[0].window.context_frames == 0 else [s.audio_prompt() for s in batch],
            )
        except Exception as error:
            self._share_time(batch, _clock() - started)
            self._recover(batch, error)
            return
        self._share_time(batch, _clock() - started)
        for song, audio in zip(batch, new_audio, strict=True):
            window = song.window
            song.batch_sizes.append(len(batch))
            song.add(audio)
            if self.on_window is not None:
                self.on_window(song.request, window, len(song.windows))

    def _recover(self, batch: list[_Song], error: Exception) -> None:
        out_of_memory = is_out_of_memory(error)
        if out_of_memory:
            _free_accelerator_memory(self.loaded)
        if len(batch) == 1:
            logger.error("window failed for %s: %s", batch[0].request.key, error)
            batch[0].error = error
            return
        if out_of_memory:
            self.batch_size = max(1, len(batch) // 2)
            logger.warning(
                "out of memory with %d songs: batch size now %d", len(batch), self.batch_size
            )
        else:
            logger.warning(
                "batch of %d songs failed (%s: %s): retrying in halves",
                len(batch),
                type(error).__name__,
                error,
            )
        half = len(batch) // 2
        for part in (batch[:half], batch[half:]):
            self.run(part)

    @staticmethod
    def _share_time(batch: list[_Song], elapsed_s: float) -> None:
        frames = [song.window.new_frames for song in batch]
        total = sum(frames)
        for song, song_frames in zip(batch, frames, strict=True):
            song.time_s += elapsed_s * song_frames / total


def _free_accelerator_memory(loaded: LoadedModel) -> None:
    if loaded.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def cpu_has_fast_bfloat16() -> bool:
    """Return whether this CPU multiplies bfloat16 matrices natively (AMX or AVX-512 BF16)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def tune_for_batches(loaded: LoadedModel) -> list[str]:
    """Set up a loaded model for fast batched generation on its device; say what changed.

    On a CPU with native bfloat16 matrix units, the text encoder, its projection and the
    decoder, which run at every step, are cast to bfloat16, about three times faster
    per batch there; EnCodec stays in float32, so the audio is decoded at full precision
    from the codes. Sampling then follows bfloat16 logits, as it follows float16 logits
    on CUDA, so the codes differ from a float32 run with the same seed. On CUDA the model
    is already float16 with SDPA attention (:func:`mgutil.generation.load_model`), and
    nothing changes.

    Modifies ``loaded.model`` in place; call it on a model this process loaded for itself.
    """
    import torch

    changes = []
    if loaded.device == "cpu" and loaded.dtype == torch.float32 and cpu_has_fast_bfloat16():
        model = loaded.model
        parts = [model.text_encoder, model.decoder]
        if getattr(model, "enc_to_dec_proj", None) is not None:
            parts.append(model.enc_to_dec_proj)
        for part in parts:
            part.to(torch.bfloat16)
        changes.append("text encoder and decoder in bfloat16")
    attention = getattr(loaded.model.config.decoder, "_attn_implementation", None)
    if attention:
        changes.append(f"{attention} attention")
    logger.info("tuned %s for batches: %s", loaded.model_id, ", ".join(changes) or "no change")
    return changes


def generate_songs(
    loaded: LoadedModel,
    requests: list[SongRequest],
    settings: GenerationSettings,
    batch_size: int | None = None,
    on_song: Callable[[SongResult], None] | None = None,
    on_window: Callable[[SongRequest, Window, int], None] | None = None,
    threads: int | None = None,
    admit: Callable[[SongRequest], bool | Resume] | None = None,
    on_progress: Callable[[SongProgress], bool | None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[SongResult]:
    """Generate songs in batches; each song is what :func:`generate_song` gives alone.

    Args:
        loaded: The model.
        requests: The songs, in the order to start them.
        settings: Window, context and sampling settings, shared by all songs.
        batch_size: Maximum number of songs per ``generate`` call; ``None`` for
            :func:`default_batch_size`.
        on_song: Called with each song's result as soon as its last window is done, or
            as soon as it fails. An exception it raises stops the run.
        on_window: Called after each window with the song, the window and the song's
            number of windows.
        threads: PyTorch CPU threads while generating; ``None`` keeps the process's
            setting. Ignored on CUDA.
        admit: Called with each song right before its first batch. ``False`` skips the
            song (it gets no result), ``True`` starts it, and a :class:`Resume`
            continues it from earlier windows (or starts it afresh when they do not fit
            the song, which is logged).
        on_progress: Called after each window that leaves a song unfinished. ``False``
            drops the song: it leaves the run without a result.
        should_stop: Called before each batch; ``True`` ends the run there. Songs in
            progress then get no result: their latest state is the last
            :class:`SongProgress` handed to ``on_progress``.

    Returns:
        The results in the order the songs finished.

    Raises:
        ValueError: ``batch_size`` is not a positive whole number, or the settings do
            not fit the model.
    """
    validate_settings(loaded, settings)
    if batch_size is None:
        batch_size = default_batch_size(loaded, settings)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected a whole number >= 1")

    scheduler = _Scheduler(loaded, settings, batch_size, on_window, admit)
    pending = deque(_Song(request, loaded, settings) for request in requests)
    active: list[_Song] = []
    results: list[SongResult] = []
    with cpu_threads(loaded, threads):
        while pending or active:
            if should_stop is not None and should_stop():
                logger.warning(
                    "stopping before the next batch: %d song(s) in progress, %d not started",
                    len(active),
                    len(pending),
                )
                break
            batch = scheduler.next_batch(pending, active)
            if not batch:
                continue
            logger.debug(
                "batch of %d: %s", len(batch), ", ".join(song.request.key for song in batch)
            )
            scheduler.run(batch)
            for song in batch:
                if song.finished:
                    active.remove(song)
                    result = song.result()
                    results.append(result)
                    if on_song is not None:
                        on_song(result)
                elif on_progress is not None and on_progress(song.progress()) is False:
                    logger.warning("dropped %s at the caller's request", song.request.key)
                    active.remove(song)
    return results
