"""Charts of a cost analysis, as matplotlib figures and PNG files in the output location.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through pyplot,
so nothing depends on a display or on global state, and they render the same in a
notebook, under papermill and in a test. Each chart copes with a local run (estimates
only) and with an empty table.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pandas as pd
from matplotlib.dates import DateFormatter
from matplotlib.figure import Figure

from mgutil import costs
from mgutil.analysis import CostAnalysis, price_integral_usd
from mgutil.storage import Store

logger = logging.getLogger(__name__)

REPORTS_PREFIX = "reports/"
CHART_NAMES = ("cost_per_song", "generation_time", "cumulative_cost", "spot_price")
_ESTIMATE_COLOR = "#4c72b0"
_ACTUAL_COLOR = "#dd8452"
_BOOT_COLOR = "#999999"
_IDLE_COLOR = "#f2c14e"


def _done(analysis: CostAnalysis) -> pd.DataFrame:
    songs = analysis.songs
    if songs.empty:
        return songs
    return songs[songs["status"] == costs.STATUS_DONE]


def _no_data(axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, wrap=True)
    axes.set_xticks([])
    axes.set_yticks([])


def cost_per_song_chart(analysis: CostAnalysis) -> Figure:
    """Bar chart of each attempt's estimated and actual cost (USD), side by side."""
    songs = analysis.songs
    figure = Figure(figsize=(max(6.0, 0.6 * len(songs) + 2), 4), layout="constrained")
    axes = figure.subplots()
    axes.set_title("Cost per song")
    if songs.empty:
        _no_data(axes, "no songs yet")
        return figure
    positions = range(len(songs))
    labels = [
        Path(key).stem + (" (failed)" if status == costs.STATUS_FAILED else "")
        for key, status in zip(songs["s3_filename"], songs["status"], strict=True)
    ]
    width = 0.4
    axes.bar(
        [p - width / 2 for p in positions],
        songs["estimated_cost_usd"],
        width,
        label="estimated (hourly rate)",
        color=_ESTIMATE_COLOR,
    )
    actual = songs["actual_cost_usd"].astype(float)
    if actual.notna().any():
        axes.bar(
            [p + width / 2 for p in positions],
            actual.fillna(0.0),
            width,
            label="actual (spot price)",
            color=_ACTUAL_COLOR,
        )
    axes.set_xticks(list(positions), labels, rotation=45, ha="right")
    axes.set_ylabel("USD")
    axes.legend()
    return figure


def generation_time_chart(analysis: CostAnalysis) -> Figure:
    """Scatter of generation time against requested duration, with the real-time factor."""
    done = _done(analysis)
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    axes.set_title("Generation time against requested duration")
    if done.empty:
        _no_data(axes, "no stored songs yet")
        return figure
    axes.scatter(done["requested_duration_s"], done["generation_time_s"], color=_ESTIMATE_COLOR)
    audio_s = float(done["actual_duration_s"].sum())
    if audio_s > 0:
        factor = float(done["generation_time_s"].sum()) / audio_s
        top = float(done["requested_duration_s"].max()) * 1.05
        axes.plot(
            [0, top], [0, factor * top], color=_ACTUAL_COLOR, label=f"real-time factor {factor:.2f}"
        )
        axes.legend()
    axes.set_xlabel("requested duration (s)")
    axes.set_ylabel("generation time (s)")
    axes.set_xlim(left=0)
    axes.set_ylim(bottom=0)
    return figure


def _idle_spans(songs: pd.DataFrame, start, end) -> list[tuple]:
    """Return the gaps in ``[start, end]`` not covered by a song."""
    spans, cursor = [], start
    for song_start, song_end in sorted(zip(songs["started_at"], songs["ended_at"], strict=True)):
        if song_start > cursor:
            spans.append((cursor, song_start))
        cursor = max(cursor, song_end)
    if end > cursor:
        spans.append((cursor, end))
    return spans


def cumulative_cost_chart(analysis: CostAnalysis) -> Figure:
    """Cumulative cost over the run's wall time, with boot and idle periods shaded.

    The estimate grows at the end of each attempt. With EC2 facts, the instance's actual
    spot cost grows with wall time from launch, and boot (launch to first run start) and
    idle periods (no song running) are shaded; otherwise the gaps between songs are.
    """
    songs = analysis.songs.dropna(subset=["started_at"]) if len(analysis.songs) else analysis.songs
    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.subplots()
    axes.set_title("Cumulative cost over the run")
    if songs.empty:
        _no_data(axes, "no songs yet")
        return figure
    ordered = songs.sort_values("ended_at")
    times = [ordered["started_at"].min(), *ordered["ended_at"]]
    estimated = [0.0, *ordered["estimated_cost_usd"].cumsum()]
    axes.step(times, estimated, where="post", color=_ESTIMATE_COLOR, label="estimated (songs)")

    instances = analysis.instances
    shaded = set()
    if len(instances) and "actual_cost_usd" in instances:
        for _, life in instances.iterrows():
            if pd.isna(life.get("actual_cost_usd")):
                continue
            history = analysis.price_history[
                (analysis.price_history["availability_zone"] == life["availability_zone"])
                & (analysis.price_history["instance_type"] == life["instance_type"])
            ].sort_values("timestamp")
            samples = pd.date_range(life["launched_at"], life["ended_at"], periods=200)
            cumulative = [price_integral_usd(history, life["launched_at"], t) for t in samples]
            axes.plot(
                samples,
                cumulative,
                color=_ACTUAL_COLOR,
                label=f"actual, instance {life['instance_id']}",
            )
            mine = songs[songs["instance_id"] == life["instance_id"]]
            first_run = min(
                t for t in [mine["run_started_at"].min(), mine["started_at"].min()] if pd.notna(t)
            )
            axes.axvspan(
                life["launched_at"],
                first_run,
                color=_BOOT_COLOR,
                alpha=0.3,
                label=None if "boot" in shaded else "boot and environment sync",
            )
            shaded.add("boot")
            for left, right in _idle_spans(mine, first_run, life["ended_at"]):
                axes.axvspan(
                    left,
                    right,
                    color=_IDLE_COLOR,
                    alpha=0.3,
                    label=None if "idle" in shaded else "idle or model load",
                )
                shaded.add("idle")
    else:
        for left, right in _idle_spans(songs, songs["started_at"].min(), songs["ended_at"].max()):
            axes.axvspan(
                left,
                right,
                color=_IDLE_COLOR,
                alpha=0.3,
                label=None if "idle" in shaded else "between songs",
            )
            shaded.add("idle")
    axes.set_xlabel("time (UTC)")
    axes.set_ylabel("USD")
    axes.legend(loc="upper left")
    axes.xaxis.set_major_formatter(DateFormatter("%H:%M:%S"))
    figure.autofmt_xdate()
    return figure


def spot_price_chart(analysis: CostAnalysis) -> Figure:
    """Spot price over the run for each zone and instance type, with the maximum price line.

    The maximum price is the highest hourly rate of the records, the rate the estimates
    use.
    """
    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.subplots()
    axes.set_title("Spot price over the run")
    songs = analysis.songs
    if songs.empty:
        _no_data(axes, "no songs yet")
        return figure
    history = analysis.price_history
    rate = float(songs["hourly_cost_usd"].max())
    if history.empty:
        _no_data(
            axes, f"no spot price history (local run or EC2 unreachable)\nhourly rate ${rate:.4f}/h"
        )
        return figure
    start = songs["started_at"].min()
    end = songs["ended_at"].max()
    if len(analysis.instances):
        start = min(start, analysis.instances["launched_at"].min())
        end = max(end, analysis.instances["ended_at"].max())
    for (zone, kind), group in history.groupby(["availability_zone", "instance_type"]):
        group = group.sort_values("timestamp")
        before = group[group["timestamp"] <= start]
        inside = group[(group["timestamp"] > start) & (group["timestamp"] < end)]
        first_price = before["price_usd"].iloc[-1] if len(before) else group["price_usd"].iloc[0]
        times = [start, *inside["timestamp"], end]
        prices = [
            first_price,
            *inside["price_usd"],
            inside["price_usd"].iloc[-1] if len(inside) else first_price,
        ]
        axes.step(times, prices, where="post", label=f"{kind} in {zone}")
    axes.axhline(rate, color="#c44e52", linestyle="--", label=f"maximum price ${rate:.4f}/h")
    axes.set_xlabel("time (UTC)")
    axes.set_ylabel("USD per hour")
    axes.set_ylim(bottom=0)
    axes.legend(loc="lower left")
    axes.xaxis.set_major_formatter(DateFormatter("%H:%M:%S"))
    figure.autofmt_xdate()
    return figure


def figure_png(figure: Figure, dpi: int = 100) -> bytes:
    """Return the figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_charts(store: Store, analysis: CostAnalysis) -> dict[str, bytes]:
    """Build the four charts and store each as ``reports/<name>.png``.

    Returns:
        PNG bytes by key, in the order of ``CHART_NAMES``.
    """
    builders = {
        "cost_per_song": cost_per_song_chart,
        "generation_time": generation_time_chart,
        "cumulative_cost": cumulative_cost_chart,
        "spot_price": spot_price_chart,
    }
    charts = {}
    for name in CHART_NAMES:
        png = figure_png(builders[name](analysis))
        key = f"{REPORTS_PREFIX}{name}.png"
        store.put_bytes(png, key, "image/png")
        logger.info("saved chart %s", store.location_of(key))
        charts[key] = png
    return charts


def waveform_png(path: str | Path, width_in: float = 4.0, height_in: float = 0.8) -> bytes:
    """Return a small waveform thumbnail of a WAV file as PNG bytes, one trace per channel."""
    import numpy as np
    import soundfile

    audio, _ = soundfile.read(str(path), dtype="float32", always_2d=True)
    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    axes = figure.subplots()
    # Min and max per column of pixels keep the thumbnail small for long songs.
    columns = max(min(len(audio), 400), 1)
    for channel in range(audio.shape[1]):
        chunks = np.array_split(audio[:, channel], columns)
        low = [chunk.min() if len(chunk) else 0.0 for chunk in chunks]
        high = [chunk.max() if len(chunk) else 0.0 for chunk in chunks]
        axes.fill_between(range(columns), low, high, linewidth=0, alpha=0.7)
    axes.set_axis_off()
    axes.set_ylim(-1, 1)
    return figure_png(figure, dpi=80)
