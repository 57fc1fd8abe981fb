"""Measure what batched generation buys: one song at a time against the project's worker.

Runs the same job list through two generation paths in one process and reports, for
each, audio seconds per wall second, the real-time factor, peak memory and the ratio of
the two throughputs:

- baseline: one song at a time in float32, window by window, with Hugging Face's own
  sampling, which is how a straightforward worker (and this project before batching)
  generates;
- worker: :func:`mgutil.batching.generate_songs` on a model set up by
  :func:`mgutil.batching.tune_for_batches`, the path the batch worker takes.

The model is built offline. By default it is a randomly initialised model with the
architecture of ``facebook/musicgen-small``: generation speed depends on the shapes of
the weights, not their values. ``--model tiny`` measures the tiny test model (a quick
run); any other value is loaded as a checkpoint folder.

Run it from the repository root::

    uv run python benchmarks/throughput.py --songs 16 --seconds 1 --json out.json

See docs/benchmarks.md for the method and recorded runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mgutil.batching import SongRequest, default_batch_size, generate_songs, tune_for_batches
from mgutil.config import DEFAULT_MAX_SPOT_PRICE_USD
from mgutil.generation import (
    LoadedModel,
    plan_windows,
    window_seed,
    wrap_model,
)
from mgutil.jobs import GenerationSettings

logger = logging.getLogger("throughput")

# Memory bandwidth of common inference GPUs, GB/s, from their vendors' data sheets,
# keyed by a part of torch.cuda.get_device_name(). --bandwidth-gbs overrides it.
GPU_BANDWIDTH_GBS = {
    "T4": 320,
    "A10G": 600,
    "L4": 300,
    "L40S": 864,
    "A100-SXM4-80GB": 2039,
    "A100": 1555,
    "H100": 3350,
    "H200": 4800,
}

PROMPTS = [
    "lofi hip hop beat with warm piano chords and vinyl crackle",
    "epic orchestral soundtrack with strings, brass and timpani",
    "upbeat synthwave track with a driving bassline",
    "acoustic folk guitar ballad, gentle fingerpicking",
    "ambient drone with evolving pads and slow reverb",
    "jazz trio with walking bass and brushed drums",
    "heavy metal riff with distorted guitars",
    "bossa nova with nylon guitar and light percussion",
]


def build_small_architecture(seed: int = 0):
    """Build a random model shaped like ``facebook/musicgen-small``, and a processor.

    Decoder: 24 layers, 1024 wide, 16 heads, 4 codebooks of 2048 codes. Text encoder:
    t5-base (12 layers, 768 wide). Audio codec: EnCodec 32 kHz with 4 codebooks. The
    processor is the tiny model's, whose tokenizer gives ids inside t5-base's vocabulary;
    prompt tokens only change the few text positions the decoder attends to.

    Returns:
        A ``(model, processor)`` pair, the model in float32 and eval mode.
    """
    import torch
    from transformers import (
        EncodecConfig,
        GenerationConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        T5Config,
    )

    from mgutil.tiny_model import build_tiny_model

    _tiny, processor = build_tiny_model()
    audio_encoder = EncodecConfig(
        sampling_rate=32_000,
        audio_channels=1,
        target_bandwidths=[2.2],  # 4 codebooks of 11 bits at 50 frames per second
        upsampling_ratios=[8, 5, 4, 4],
        num_filters=64,
        hidden_size=128,
        num_lstm_layers=2,
        codebook_size=2048,
        codebook_dim=128,
        use_causal_conv=False,
        normalize=False,
        chunk_length_s=None,
        overlap=None,
    )
    text_encoder = T5Config(
        vocab_size=32_128,
        d_model=768,
        d_kv=64,
        d_ff=3072,
        num_layers=12,
        num_heads=12,
        feed_forward_proj="relu",
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=2048,
        max_position_embeddings=2048,
        num_hidden_layers=24,
        ffn_dim=4096,
        num_attention_heads=16,
        hidden_size=1024,
        num_codebooks=4,
        audio_channels=1,
        pad_token_id=2048,
        bos_token_id=2048,
    )
    config = MusicgenConfig(text_encoder=text_encoder, audio_encoder=audio_encoder, decoder=decoder)
    config.decoder_start_token_id = 2048
    config.pad_token_id = 2048
    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        do_sample=True,
        guidance_scale=3.0,
        top_k=250,
        max_length=1500,
        bos_token_id=2048,
        pad_token_id=2048,
        decoder_start_token_id=2048,
    )
    return model.eval(), processor


def build_model(name: str, device: str) -> LoadedModel:
    """Return the float32 model to measure: ``small``, ``tiny`` or a checkpoint folder."""
    import torch

    if name == "small":
        model, processor = build_small_architecture()
        model_id = "musicgen-small architecture (random weights)"
    elif name == "tiny":
        from mgutil.tiny_model import build_tiny_model

        model, processor = build_tiny_model()
        model_id = "tiny test model"
    else:
        from transformers import AutoProcessor, MusicgenForConditionalGeneration

        processor = AutoProcessor.from_pretrained(name)
        model = MusicgenForConditionalGeneration.from_pretrained(name, dtype=torch.float32)
        model_id = name
    return wrap_model(model, processor, model_id, device, torch.float32)


def worker_model(baseline: LoadedModel) -> LoadedModel:
    """Copy the baseline model and set it up as the worker would load and tune it."""
    import torch

    model = copy.deepcopy(baseline.model)
    if baseline.device.startswith("cuda"):
        # load_model loads float16 weights on CUDA.
        model.half()
        loaded = wrap_model(
            model, baseline.processor, baseline.model_id, baseline.device, torch.float16
        )
    else:
        loaded = wrap_model(model, baseline.processor, baseline.model_id, "cpu", torch.float32)
    tune_for_batches(loaded)
    return loaded


def make_requests(songs: int, seconds: float) -> list[SongRequest]:
    """``songs`` songs of ``seconds`` each, with distinct prompts and seeds."""
    return [
        SongRequest(
            key=f"song-{index:03d}",
            prompt=f"{PROMPTS[index % len(PROMPTS)]}, take {index // len(PROMPTS) + 1}",
            duration_s=seconds,
            seed=1000 + index,
        )
        for index in range(songs)
    ]


def baseline_songs(
    loaded: LoadedModel, requests: list[SongRequest], settings: GenerationSettings
) -> list[np.ndarray]:
    """Generate one song at a time, window by window, as a straightforward worker does.

    Each window is one ``generate`` call with Hugging Face's sampling from the global
    RNG, seeded per window, and the prompt audio cut off the decoded result.
    """
    import torch

    songs = []
    for request in requests:
        total_samples = int(round(request.duration_s * loaded.sampling_rate))
        total_frames = math.ceil(total_samples / loaded.hop_length)
        windows = plan_windows(
            total_frames,
            loaded.seconds_to_frames(settings.window_s),
            loaded.seconds_to_frames(settings.context_s),
        )
        song = np.zeros((loaded.audio_channels, total_frames * loaded.hop_length), np.float32)
        for window in windows:
            kwargs = {"text": [request.prompt], "padding": True, "return_tensors": "pt"}
            start = window.start_frame * loaded.hop_length
            if window.context_frames:
                context = song[:, start - window.context_frames * loaded.hop_length : start]
                kwargs["audio"] = [context[0] if loaded.audio_channels == 1 else context]
                kwargs["sampling_rate"] = loaded.sampling_rate
            inputs = {
                name: value.to(loaded.device) for name, value in loaded.processor(**kwargs).items()
            }
            torch.manual_seed(window_seed(request.seed, window.index))
            with torch.inference_mode():
                output = loaded.model.generate(
                    **inputs,
                    do_sample=True,
                    guidance_scale=settings.guidance_scale,
                    top_k=settings.top_k,
                    temperature=settings.temperature,
                    max_new_tokens=window.new_frames + loaded.codebooks_per_channel - 1,
                )
            audio = output[0].float().cpu().numpy()
            skip = window.context_frames * loaded.hop_length
            new = audio[:, skip : skip + window.new_frames * loaded.hop_length]
            song[:, start : start + new.shape[-1]] = new
        songs.append(song[:, :total_samples])
    return songs


class PeakMemory:
    """Peak memory while a block runs: GPU memory allocated on CUDA, else process RSS.

    On the CPU a thread samples the resident set size every few milliseconds; the
    figure includes the weights of every model this process holds.
    """

    def __init__(self, device: str):
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss_bytes() -> int:
        try:
            with open("/proc/self/statm", encoding="ascii") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the lifetime peak is the best figure there
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())

    def __enter__(self):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak_bytes = self.rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())


class StepCounter:
    """Count decoder forward passes, one per decoding step of a ``generate`` call."""

    def __init__(self, loaded: LoadedModel):
        self.decoder = loaded.model.decoder
        self.steps = 0

    def _count(self, *args):
        self.steps += 1

    def __enter__(self):
        self.handle = self.decoder.register_forward_hook(self._count)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def measure(
    name: str,
    loaded: LoadedModel,
    run: Callable[[], object],
    audio_s: float,
) -> dict:
    """Run one repeat of a path; return its wall time, steps and peak memory."""
    import torch

    with PeakMemory(loaded.device) as memory, StepCounter(loaded) as steps:
        started = time.perf_counter()
        run()
        if loaded.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - started
    logger.info("%s: %.2f s for %.1f s of audio, %d steps", name, wall_s, audio_s, steps.steps)
    return {"wall_s": wall_s, "steps": steps.steps, "peak_memory_bytes": memory.peak_bytes}


def summarize(name: str, runs: list[dict], audio_s: float, settings: dict) -> dict:
    """Median figures of a path's repeats."""
    wall_s = statistics.median(run["wall_s"] for run in runs)
    steps = runs[0]["steps"]
    return {
        "name": name,
        **settings,
        "repeats": len(runs),
        "wall_s": wall_s,
        "wall_s_all": [round(run["wall_s"], 3) for run in runs],
        "audio_s_per_s": audio_s / wall_s,
        "real_time_factor": wall_s / audio_s,
        "decoding_steps": steps,
        "s_per_step": wall_s / steps if steps else None,
        "peak_memory_mib": max(run["peak_memory_bytes"] for run in runs) / 2**20,
    }


def decoder_weight_bytes(loaded: LoadedModel) -> int:
    """Bytes of the decoder's weights, which every decoding step reads once."""
    return sum(p.numel() * p.element_size() for p in loaded.model.decoder.parameters())


def gpu_bandwidth_gbs(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for part, bandwidth in sorted(GPU_BANDWIDTH_GBS.items(), key=lambda item: -len(item[0])):
        if part in device_name:
            return float(bandwidth)
    return None


def hardware() -> dict:
    """Describe the machine the figures come from."""
    import torch

    facts = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    facts["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import transformers

        facts["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def run_benchmark(args: argparse.Namespace) -> dict:
    """Build the model, run every path ``args.repeats`` times after a warm-up, summarize."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    default_threads = torch.get_num_threads()
    settings = GenerationSettings(window_s=args.window_s, context_s=args.context_s)
    requests = make_requests(args.songs, args.seconds)
    warm_up = make_requests(args.songs, min(args.seconds, 0.2))
    audio_s = args.songs * args.seconds

    logger.info("building %s on %s", args.model, device)
    baseline = build_model(args.model, device)
    worker = worker_model(baseline)
    batch_size = args.batch_size or default_batch_size(worker, settings)
    threads = args.threads or default_threads

    paths = {
        "baseline": (
            baseline,
            lambda songs: baseline_songs(baseline, songs, settings),
            {"batch_size": 1, "threads": default_threads, "dtype": "float32"},
        ),
    }
    if args.ablations:
        # Batching alone: the worker's batches on the baseline's float32 model.
        paths["batched"] = (
            baseline,
            lambda songs: generate_songs(baseline, songs, settings, batch_size),
            {"batch_size": batch_size, "threads": default_threads, "dtype": "float32"},
        )
    worker_dtype = str(worker.model.decoder.dtype).replace("torch.", "")
    paths["worker"] = (
        worker,
        lambda songs: generate_songs(worker, songs, settings, batch_size, threads=threads),
        {"batch_size": batch_size, "threads": threads, "dtype": worker_dtype},
    )
    if device.startswith("cuda"):
        for _name, (_loaded, _run, path_settings) in paths.items():
            path_settings["threads"] = default_threads

    for name, (_loaded, run, _settings) in paths.items():
        logger.info("warm-up: %s", name)
        run(warm_up[:1] if name.startswith("baseline") else warm_up)

    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for repeat in range(args.repeats):
        # Paths alternate within each repeat, so a slow spell hits them alike.
        for name, (loaded, run, _settings) in paths.items():
            logger.info("repeat %d/%d: %s", repeat + 1, args.repeats, name)
            runs[name].append(measure(name, loaded, lambda run=run: run(requests), audio_s))

    results = {
        name: summarize(name, runs[name], audio_s, path_settings)
        for name, (_loaded, _run, path_settings) in paths.items()
    }
    summary = {
        "command": args.command,
        "model": baseline.model_id,
        "device": device,
        "songs": args.songs,
        "seconds_per_song": args.seconds,
        "window_s": settings.window_s,
        "context_s": settings.context_s,
        "hardware": hardware(),
        "paths": results,
        "baseline_audio_s_per_s": results["baseline"]["audio_s_per_s"],
        "worker_audio_s_per_s": results["worker"]["audio_s_per_s"],
        "ratio": results["worker"]["audio_s_per_s"] / results["baseline"]["audio_s_per_s"],
        "price_usd_per_hour": args.price_usd_per_hour,
    }
    for result in results.values():
        # Instance hours per hour of audio, times the price of an instance hour.
        result["usd_per_audio_hour"] = result["real_time_factor"] * args.price_usd_per_hour
    if device.startswith("cuda"):
        bandwidth = gpu_bandwidth_gbs(torch.cuda.get_device_name(), args.bandwidth_gbs)
        for name, (loaded, _run, _settings) in paths.items():
            result = results[name]
            result["decoder_weight_bytes"] = decoder_weight_bytes(loaded)
            if bandwidth and result["s_per_step"]:
                floor_s = result["decoder_weight_bytes"] / (bandwidth * 1e9)
                result["bandwidth_floor_s_per_step"] = floor_s
                result["times_over_floor"] = result["s_per_step"] / floor_s
        summary["gpu_bandwidth_gbs"] = bandwidth
    return summary


def format_table(summary: dict) -> str:
    """The figures as a plain-text table."""
    columns = [
        ("path", "{name}"),
        ("batch", "{batch_size}"),
        ("threads", "{threads}"),
        ("dtype", "{dtype}"),
        ("wall s", "{wall_s:.2f}"),
        ("audio s/s", "{audio_s_per_s:.3f}"),
        ("RTF", "{real_time_factor:.2f}"),
        ("s/step", "{s_per_step:.3f}"),
        ("peak MiB", "{peak_memory_mib:.0f}"),
        ("$/audio h", "{usd_per_audio_hour:.2f}"),
    ]
    if "gpu_bandwidth_gbs" in summary:
        columns.append(("x floor", "{times_over_floor:.1f}"))
    rows = [[title for title, _ in columns]]
    for result in summary["paths"].values():
        cells = []
        for _title, template in columns:
            try:
                cells.append(template.format(**result))
            except (KeyError, TypeError, ValueError):
                cells.append("-")
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    hardware_line = ", ".join(f"{key} {value}" for key, value in summary["hardware"].items())
    lines += [
        "",
        f"{summary['songs']} songs of {summary['seconds_per_song']:g} s, {summary['model']}, "
        f"{summary['device']}; costs at ${summary['price_usd_per_hour']:.2f} per instance hour",
        hardware_line,
        f"baseline {summary['baseline_audio_s_per_s']:.3f} audio s/s, "
        f"worker {summary['worker_audio_s_per_s']:.3f} audio s/s, ratio {summary['ratio']:.2f}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare one-song-at-a-time generation with the batched worker path."
    )
    parser.add_argument("--songs", type=int, default=16, help="songs in the job list")
    parser.add_argument("--seconds", type=float, default=1.0, help="duration of each song, s")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path")
    parser.add_argument(
        "--model",
        default="small",
        help="'small' (musicgen-small architecture, random weights), 'tiny', or a checkpoint folder",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    parser.add_argument("--batch-size", type=int, help="songs per batch; default: the worker's")
    parser.add_argument(
        "--threads", type=int, help="CPU threads of the worker path; default: PyTorch's"
    )
    parser.add_argument("--window-s", type=float, default=30.0, help="seconds per window")
    parser.add_argument("--context-s", type=float, default=10.0, help="seconds of context")
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="also run the worker's batches on the float32 model: what batching alone buys",
    )
    parser.add_argument(
        "--price-usd-per-hour",
        type=float,
        default=DEFAULT_MAX_SPOT_PRICE_USD,
        help="instance price for the cost per hour of audio, USD",
    )
    parser.add_argument("--bandwidth-gbs", type=float, help="GPU memory bandwidth, GB/s")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    for name in ("songs", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    args.command = "python benchmarks/throughput.py " + " ".join(argv or [])
    return args


def main(argv: list[str] | None = None) -> dict:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = run_benchmark(args)
    print(format_table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return summary


if __name__ == "__main__":
    main()
