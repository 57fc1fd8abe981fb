"""Cost estimates for a worker: per hour, and for a job file.

Prices are USD per instance-hour, durations seconds. The run time of a job file is its
requested audio times the compute seconds per audio second, plus a fixed allowance for
booting, installing the environment and loading the model.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass

import pandas as pd

from mgutil import costs
from mgutil.errors import StorageError
from mgutil.storage import Store

logger = logging.getLogger(__name__)

ESTIMATE_HOURS = (1, 4, 8)
# Compute seconds per second of audio for musicgen-small on a T4, a first guess that
# earlier cost records replace.
DEFAULT_COMPUTE_S_PER_AUDIO_S = 4.0
# Boot, uv sync and model download and load, in seconds.
DEFAULT_BOOT_ALLOWANCE_S = 900.0


def hourly_estimates(
    max_price_usd: float, current_price_usd: float | None, hours=ESTIMATE_HOURS
) -> pd.DataFrame:
    """Return the cost of running ``hours`` hours at the maximum and at the current price.

    Returns:
        Columns ``hours``, ``at_max_price_usd`` and ``at_current_price_usd`` (NaN when
        the current price is unknown).
    """
    rows = []
    for count in hours:
        rows.append(
            {
                "hours": count,
                "at_max_price_usd": round(count * max_price_usd, 4),
                "at_current_price_usd": math.nan
                if current_price_usd is None
                else round(count * current_price_usd, 4),
            }
        )
    return pd.DataFrame(rows)


def compute_ratio_from_records(
    store: Store, model_id: str | None = None
) -> tuple[float | None, int]:
    """Return the median compute seconds per audio second of earlier songs, and how many.

    Only success records with a positive requested duration count, generated on a CUDA
    device (a CPU run says nothing about a GPU worker) and, when ``model_id`` is given,
    with that model.

    Returns:
        ``(median, count)``; ``(None, 0)`` when there are no usable records.
    """
    ratios = []
    for record in costs.read_records(store):
        try:
            audio_s = float(record.get("requested_duration_s") or 0)
            compute_s = float(record.get("generation_time_s") or 0)
        except (TypeError, ValueError):
            continue
        if record.get("status", costs.STATUS_DONE) != costs.STATUS_DONE:
            continue
        if not str(record.get("device") or "").startswith("cuda"):
            continue
        if model_id is not None and record.get("model_id") != model_id:
            continue
        if audio_s > 0 and compute_s > 0 and math.isfinite(compute_s / audio_s):
            ratios.append(compute_s / audio_s)
    if not ratios:
        return None, 0
    return statistics.median(ratios), len(ratios)


@dataclass(frozen=True)
class JobEstimate:
    """Expected run time and cost of a job file on one worker.

    Attributes:
        songs: Songs in the job file.
        audio_s: Requested audio, seconds.
        compute_s_per_audio_s: Ratio used.
        ratio_source: Where the ratio came from, for display.
        boot_allowance_s: Fixed allowance, seconds.
        run_time_s: ``audio_s * ratio + boot_allowance_s``.
        max_price_usd: Maximum price, USD per hour.
        current_price_usd: Current price in the chosen zone, or ``None``.
    """

    songs: int
    audio_s: float
    compute_s_per_audio_s: float
    ratio_source: str
    boot_allowance_s: float
    run_time_s: float
    max_price_usd: float
    current_price_usd: float | None

    @property
    def cost_at_max_usd(self) -> float:
        return self.run_time_s / 3600.0 * self.max_price_usd

    @property
    def cost_at_current_usd(self) -> float | None:
        if self.current_price_usd is None:
            return None
        return self.run_time_s / 3600.0 * self.current_price_usd

    def table(self) -> pd.DataFrame:
        """Two columns, ``item`` and ``value``, for display."""
        current = self.cost_at_current_usd
        rows = [
            ("songs", self.songs),
            ("requested audio (s)", round(self.audio_s, 1)),
            ("compute s per audio s", f"{self.compute_s_per_audio_s:.2f} ({self.ratio_source})"),
            ("boot and model load allowance (s)", round(self.boot_allowance_s)),
            ("expected run time (h)", round(self.run_time_s / 3600.0, 2)),
            ("cost at maximum price (USD)", round(self.cost_at_max_usd, 4)),
            ("cost at current price (USD)", "unknown" if current is None else round(current, 4)),
        ]
        return pd.DataFrame(rows, columns=["item", "value"])


def estimate_job_file(
    audio_s: float,
    songs: int,
    max_price_usd: float,
    current_price_usd: float | None,
    compute_s_per_audio_s: float = DEFAULT_COMPUTE_S_PER_AUDIO_S,
    boot_allowance_s: float = DEFAULT_BOOT_ALLOWANCE_S,
    store: Store | None = None,
    model_id: str | None = None,
) -> JobEstimate:
    """Estimate the run time and cost of generating ``audio_s`` seconds of audio.

    Args:
        audio_s: Requested audio of the job file, seconds.
        songs: Number of songs, for display.
        max_price_usd: Maximum spot price, USD per hour.
        current_price_usd: Current spot price, USD per hour, or ``None``.
        compute_s_per_audio_s: Ratio used when ``store`` holds no earlier records.
        boot_allowance_s: Seconds added for boot, environment and model load.
        store: The output location; the median ratio of its GPU records wins when it has
            any.
        model_id: Count only records of this model; every model when ``None``.

    Raises:
        ValueError: A ratio or allowance is negative or not a number.
    """
    if not (math.isfinite(compute_s_per_audio_s) and compute_s_per_audio_s > 0):
        raise ValueError(
            f"compute_s_per_audio_s={compute_s_per_audio_s!r}: expected a positive number, "
            "such as 4.0"
        )
    if not (math.isfinite(boot_allowance_s) and boot_allowance_s >= 0):
        raise ValueError(
            f"boot_allowance_s={boot_allowance_s!r}: expected a number of seconds >= 0"
        )
    ratio, source = float(compute_s_per_audio_s), "parameter"
    if store is not None:
        try:
            median, count = compute_ratio_from_records(store, model_id)
        except StorageError as error:
            logger.warning("cannot read earlier records, using the parameter: %s", error)
            median, count = None, 0
        if median is not None:
            ratio, source = median, f"median of {count} earlier record(s)"
            logger.info("using %.3f compute s per audio s from %d record(s)", median, count)
    return JobEstimate(
        songs=songs,
        audio_s=float(audio_s),
        compute_s_per_audio_s=ratio,
        ratio_source=source,
        boot_allowance_s=float(boot_allowance_s),
        run_time_s=float(audio_s) * ratio + float(boot_allowance_s),
        max_price_usd=float(max_price_usd),
        current_price_usd=current_price_usd,
    )
