"""Cost analysis of the songs in an output location: estimated and actual cost per song.

Everything here reads the records the worker writes (``records/`` and
``records/failed/``) and the run summaries (``runs/<run_id>/run.json``), so it works on
a finished run, on one still going, and on one that was cut short.

Costs are USD, rates USD per hour, times seconds unless a name says otherwise.

The *estimated* cost of a song is its generation time at the hourly rate of its record
(``hourly_cost_usd``, by default the maximum spot price). The *actual* cost needs EC2:
the spot price history of the instance's zone is a step function (each price applies from
its timestamp until the next one), and a song costs the integral of that function over
the seconds it took. The instance costs the integral over its whole life, billed per
second with a 60 second minimum; what is not spent on songs is overhead (boot and
environment sync, model load, idle). Since spot never bills above the maximum price, the
estimate at that price is an upper bound, and a song that breaks it is flagged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from mgutil import costs
from mgutil.storage import Store

logger = logging.getLogger(__name__)

# Seconds between instance launch and the first run start assumed when EC2 no longer
# shows the instance: boot, environment sync and worker start.
DEFAULT_BOOT_ALLOWANCE_S = 180.0
# EC2 bills a Linux spot instance per second, with this minimum per launch.
MINIMUM_BILLED_S = 60.0
# Spot prices are looked up from this long before the first song, so the price in
# effect at its start is known even when it was set days earlier.
PRICE_LOOKBACK = timedelta(days=7)
TOTALS_KEY = "reports/totals.csv"
INSTANCES_KEY = "reports/instances.csv"
# Relative difference that counts as rounding, not as a broken upper bound.
COST_TOLERANCE = 1e-9


def _within_bound(bound_usd: float, actual_usd: float) -> bool:
    """Return whether ``actual_usd`` stays at or under ``bound_usd``, up to rounding."""
    return actual_usd <= bound_usd * (1.0 + COST_TOLERANCE) + 1e-15


SONG_COLUMNS = costs.REPORT_COLUMNS + [
    "actual_duration_s",
    "real_time_factor",
    "estimated_cost_per_audio_minute_usd",
    "status",
    "actual_cost_usd",
    "peak_spot_price_usd",
    "upper_bound_ok",
    "flag",
]
_TIME_COLUMNS = ("started_at", "finished_at", "run_started_at")
_OPTIONAL_COLUMNS = (
    "actual_duration_s",
    "hourly_cost_usd",
    "run_id",
    "error",
    "instance_id",
    "instance_type",
    "availability_zone",
    "region",
    "model_load_time_s",
    "run_started_at",
)


@dataclass
class CostAnalysis:
    """The result of :func:`analyze`.

    Attributes:
        uri: The output location analysed.
        songs: One row per generation attempt, done and failed, oldest first; the report
            columns first, then the metrics (see ``SONG_COLUMNS``) and the record fields.
        runs: One row per run summary.
        instances: One row per EC2 instance, with its life, actual cost and overhead;
            empty for local runs.
        price_history: Spot prices of the instances' zones over the runs.
        notes: Why actual costs are missing or partial, for the reader.
    """

    uri: str
    songs: pd.DataFrame
    runs: pd.DataFrame
    instances: pd.DataFrame
    price_history: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.songs.empty

    @property
    def has_actual_costs(self) -> bool:
        return bool(len(self.songs)) and self.songs["actual_cost_usd"].notna().any()


def _parse_times(frame: pd.DataFrame, columns) -> pd.DataFrame:
    for column in columns:
        if column in frame:
            frame[column] = pd.to_datetime(frame[column], utc=True, errors="coerce")
    return frame


def load_records(store: Store) -> pd.DataFrame:
    """Return every record in the store as a frame, oldest first, times as UTC timestamps.

    Records from before the cost analysis lack the instance and run columns; they are
    added empty. ``ended_at`` is the start plus the generation time: the span the song
    was billed for.
    """
    records = costs.read_records(store)
    frame = pd.DataFrame(records)
    if frame.empty:
        return frame
    for column in _OPTIONAL_COLUMNS:
        if column not in frame:
            frame[column] = None
    frame = frame.rename(columns={"output_key": "s3_filename"})
    frame = frame.drop(columns=["settings"], errors="ignore")
    frame = _parse_times(frame, _TIME_COLUMNS)
    frame["ended_at"] = frame["started_at"] + pd.to_timedelta(
        frame["generation_time_s"].astype(float), unit="s"
    )
    order = ["started_at", "line_number", "s3_filename"]
    return frame.sort_values(
        [c for c in order if c in frame], kind="stable", na_position="first"
    ).reset_index(drop=True)


def load_runs(store: Store) -> pd.DataFrame:
    """Return the run summaries (``runs/<run_id>/run.json``), times as UTC timestamps."""
    rows = []
    for key in store.list_keys(costs.RUNS_PREFIX):
        if not key.endswith("/run.json"):
            continue
        try:
            rows.append(json.loads(store.get_bytes(key)))
        except (ValueError, UnicodeDecodeError) as error:
            logger.warning("skipping unreadable run summary %s: %s", store.location_of(key), error)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return _parse_times(frame, ("started_at", "finished_at")).sort_values("started_at")


def song_table(records: pd.DataFrame) -> pd.DataFrame:
    """Return the per-song table with its metrics; actual costs are left empty.

    Adds ``real_time_factor`` (generation seconds per second of audio) and
    ``estimated_cost_per_audio_minute_usd``; both are empty for failed attempts.
    """
    if records.empty:
        return pd.DataFrame(columns=SONG_COLUMNS)
    songs = records.copy()
    songs["actual_duration_s"] = pd.to_numeric(songs["actual_duration_s"], errors="coerce")
    audio_s = songs["actual_duration_s"].where(songs["actual_duration_s"] > 0)
    songs["real_time_factor"] = songs["generation_time_s"] / audio_s
    songs["estimated_cost_per_audio_minute_usd"] = songs["estimated_cost_usd"] / (audio_s / 60.0)
    songs["actual_cost_usd"] = float("nan")
    songs["peak_spot_price_usd"] = float("nan")
    songs["upper_bound_ok"] = pd.Series([None] * len(songs), dtype=object)
    songs["flag"] = ""
    rest = [column for column in songs.columns if column not in SONG_COLUMNS]
    return songs[SONG_COLUMNS + rest]


def price_at(history: pd.DataFrame, moment: pd.Timestamp) -> float:
    """Return the price (USD per hour) in effect at ``moment``.

    ``history`` contains one zone and instance type, oldest first. Before its first record
    the first price is assumed.
    """
    index = int(history["timestamp"].searchsorted(moment, side="right")) - 1
    return float(history["price_usd"].iloc[max(index, 0)])


def price_integral_usd(history: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> float:
    """Return what an instance costs from ``start`` to ``end`` under a spot price history.

    Each price applies from its timestamp until the next one, so the cost is the sum over
    the price segments inside ``[start, end]`` of price times seconds / 3600.

    Args:
        history: ``timestamp`` and ``price_usd`` (USD per hour) of one zone and instance
            type, oldest first, not empty.
        start: Start of the span.
        end: End of the span; nothing is charged when it is not after ``start``.

    Returns:
        USD.
    """
    if not end > start:
        return 0.0
    inside = history["timestamp"][(history["timestamp"] > start) & (history["timestamp"] < end)]
    points = [start, *inside.tolist(), end]
    total = 0.0
    for left, right in zip(points, points[1:], strict=False):
        total += price_at(history, left) * (right - left).total_seconds()
    return total / 3600.0


def peak_price_usd(history: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> float:
    """Return the highest price (USD per hour) in effect during ``[start, end]``."""
    inside = history["price_usd"][(history["timestamp"] > start) & (history["timestamp"] < end)]
    return max([price_at(history, start), *inside.tolist()])


def _history_for(history: pd.DataFrame, zone: str, instance_type: str) -> pd.DataFrame:
    if history.empty:
        return history
    selected = history[
        (history["availability_zone"] == zone) & (history["instance_type"] == instance_type)
    ]
    return selected.sort_values("timestamp", kind="stable").reset_index(drop=True)


def _ec2_groups(songs: pd.DataFrame) -> pd.DataFrame:
    """Return the songs that ran on EC2 with a known zone and instance type."""
    if songs.empty:
        return songs
    known = songs["instance_id"].notna() & songs["availability_zone"].notna()
    return songs[known & songs["instance_type"].notna()]


def fetch_price_history(
    songs: pd.DataFrame,
    ec2_factory=None,
    region: str | None = None,
    now: datetime | None = None,
    lifetimes: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Return the spot price history of every zone and instance type the songs ran in.

    Args:
        songs: The song table; rows without instance facts are ignored.
        ec2_factory: ``factory(region) -> EC2 client``; :func:`mgutil.aws.clients.make_client`
            when ``None``.
        region: Region for the calls when the records do not name one.
        now: Latest time to look up; now when ``None``.
        lifetimes: Instance lives from :func:`instance_lifetimes`, so the history covers
            boot and idle time too.

    Returns:
        Columns of :func:`mgutil.aws.pricing.spot_price_history`, limited to the zones
        and types used.
    """
    from mgutil.aws.pricing import HISTORY_COLUMNS, spot_price_history

    ec2_songs = _ec2_groups(songs)
    if ec2_songs.empty:
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    factory = ec2_factory or _default_ec2_factory
    end = now or datetime.now(UTC)
    frames = []
    regions = ec2_songs["region"].fillna(region or "").replace("", None)
    for song_region, group in ec2_songs.groupby(regions, dropna=False):
        start = group["started_at"].min()
        if lifetimes is not None and not lifetimes.empty:
            start = min(start, lifetimes["launched_at"].min())
        ec2 = factory(song_region or region)
        history = spot_price_history(
            ec2,
            sorted(group["instance_type"].unique()),
            (start - PRICE_LOOKBACK).to_pydatetime(),
            end,
        )
        pairs = set(zip(group["availability_zone"], group["instance_type"], strict=True))
        keep = [
            (zone, kind) in pairs
            for zone, kind in zip(
                history["availability_zone"], history["instance_type"], strict=True
            )
        ]
        frames.append(history[keep])
    history = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=HISTORY_COLUMNS)
    )
    return history.sort_values(["timestamp", "availability_zone"], kind="stable").reset_index(
        drop=True
    )


def _default_ec2_factory(region: str | None):
    from mgutil.aws.clients import make_client

    # A short retry budget: the analysis must fall back to estimates quickly when AWS is
    # unreachable.
    return make_client(
        "ec2",
        region=region,
        retries={"mode": "standard", "total_max_attempts": 2},
        connect_timeout=3,
        read_timeout=10,
    )


def add_actual_costs(songs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """Fill ``actual_cost_usd``, ``peak_spot_price_usd`` and the upper-bound check.

    A song's actual cost is the price integral over ``[started_at, ended_at]``. The
    check passes when the estimate (at the record's hourly rate) is at least the actual
    cost; when it fails, ``flag`` says why.
    """
    songs = songs.copy()
    for index, song in _ec2_groups(songs).iterrows():
        zone_history = _history_for(history, song["availability_zone"], song["instance_type"])
        if zone_history.empty or pd.isna(song["started_at"]):
            continue
        actual = price_integral_usd(zone_history, song["started_at"], song["ended_at"])
        peak = peak_price_usd(zone_history, song["started_at"], song["ended_at"])
        songs.at[index, "actual_cost_usd"] = actual
        songs.at[index, "peak_spot_price_usd"] = peak
        ok = _within_bound(song["estimated_cost_usd"], actual)
        songs.at[index, "upper_bound_ok"] = bool(ok)
        if not ok:
            songs.at[index, "flag"] = (
                f"actual ${actual:.6f} exceeds the estimate ${song['estimated_cost_usd']:.6f}: "
                f"the spot price reached ${peak:.4f}/h, above the hourly rate "
                f"${song['hourly_cost_usd']:.4f}/h of the estimate. Set HOURLY_COST_USD to at "
                "least MAX_SPOT_PRICE_USD"
            )
    return songs


# EC2 writes "User initiated (2026-12-04 20:30:00 GMT)"; some tools write UTC.
_TRANSITION_TIME = re.compile(r"\((\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) (?:GMT|UTC)\)")


def _describe_instance(ec2, instance_id: str) -> dict | None:
    """Return the EC2 description of one instance, or ``None`` when EC2 no longer has it."""
    from botocore.exceptions import ClientError

    try:
        response = ec2.describe_instances(InstanceIds=[instance_id])
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
            return None
        raise
    for reservation in response.get("Reservations", []):
        for instance in reservation.get("Instances", []):
            return instance
    return None


def instance_lifetimes(
    songs: pd.DataFrame,
    runs: pd.DataFrame,
    ec2_factory=None,
    boot_allowance_s: float = DEFAULT_BOOT_ALLOWANCE_S,
    now: datetime | None = None,
) -> pd.DataFrame:
    """Return launch and end of every instance the songs ran on.

    EC2 is asked first (``LaunchTime``; the end from ``StateTransitionReason`` once the
    instance stopped or terminated, now while it runs). An instance EC2 no longer shows
    is taken to have launched ``boot_allowance_s`` before its first run started and to
    have ended with its last record or run summary.

    Returns:
        Columns ``instance_id``, ``instance_type``, ``availability_zone``, ``region``,
        ``launched_at``, ``ended_at``, ``state`` and ``source`` (how the life was found).
    """
    ec2_songs = _ec2_groups(songs)
    columns = [
        "instance_id",
        "instance_type",
        "availability_zone",
        "region",
        "launched_at",
        "ended_at",
        "state",
        "source",
    ]
    if ec2_songs.empty:
        return pd.DataFrame(columns=columns)
    factory = ec2_factory or _default_ec2_factory
    now_ts = pd.Timestamp(now or datetime.now(UTC))
    rows = []
    for instance_id, group in ec2_songs.groupby("instance_id", sort=True):
        first = group.iloc[0]
        run_rows = _runs_of(runs, instance_id)
        starts = [group["run_started_at"].min(), group["started_at"].min()]
        ends = [group["ended_at"].max(), group["finished_at"].max()]
        if not run_rows.empty:
            starts.append(run_rows["started_at"].min())
            ends.append(run_rows["finished_at"].max())
        first_start = min(t for t in starts if pd.notna(t))
        last_end = max(t for t in ends if pd.notna(t))
        row = {
            "instance_id": instance_id,
            "instance_type": first["instance_type"],
            "availability_zone": first["availability_zone"],
            "region": first["region"],
            "launched_at": first_start - pd.Timedelta(seconds=boot_allowance_s),
            "ended_at": last_end,
            "state": "unknown",
            "source": f"records, with {boot_allowance_s:g} s boot allowance",
        }
        described = _describe_instance(factory(first["region"]), instance_id)
        if described is not None:
            row["launched_at"] = pd.Timestamp(described["LaunchTime"]).tz_convert("UTC")
            state = described.get("State", {}).get("Name", "unknown")
            row["state"] = state
            row["source"] = "EC2"
            if state in ("pending", "running"):
                row["ended_at"] = now_ts
            else:
                match = _TRANSITION_TIME.search(described.get("StateTransitionReason", ""))
                if match:
                    row["ended_at"] = pd.Timestamp(match.group(1), tz="UTC")
                else:
                    row["source"] = "EC2 launch time, end from the records"
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def _runs_of(runs: pd.DataFrame, instance_id: str) -> pd.DataFrame:
    if runs.empty or "instance_id" not in runs:
        return pd.DataFrame(columns=["run_id", "started_at", "finished_at", "model_load_time_s"])
    return runs[runs["instance_id"] == instance_id]


def instance_costs(
    lifetimes: pd.DataFrame, songs: pd.DataFrame, runs: pd.DataFrame, history: pd.DataFrame
) -> pd.DataFrame:
    """Return each instance's actual cost over its life and the overhead outside songs.

    The life is billed per second, rounded up, with a 60 second minimum. Overhead is
    split into boot and environment sync (launch to first run start), model load (the
    runs' load times) and idle (the rest outside songs). The upper bound is the billed
    seconds at the highest hourly rate of the instance's records.

    Returns:
        The lifetimes with ``billed_s``, ``actual_cost_usd``, ``songs_cost_usd``,
        ``boot_s``, ``boot_usd``, ``model_load_s``, ``model_load_usd``, ``idle_s``,
        ``idle_usd``, ``overhead_usd``, ``overhead_percent``, ``upper_bound_usd``,
        ``upper_bound_ok`` and ``flag``.
    """
    rows = []
    for _, life in lifetimes.iterrows():
        row = life.to_dict()
        zone_history = _history_for(history, life["availability_zone"], life["instance_type"])
        mine = songs[songs["instance_id"] == life["instance_id"]]
        life_s = max((life["ended_at"] - life["launched_at"]).total_seconds(), 0.0)
        billed_s = max(math.ceil(life_s), MINIMUM_BILLED_S)
        first_run = min(
            t for t in [mine["run_started_at"].min(), mine["started_at"].min()] if pd.notna(t)
        )
        boot_s = max((first_run - life["launched_at"]).total_seconds(), 0.0)
        loads = (
            mine.dropna(subset=["run_id"])
            .groupby("run_id")
            .agg(
                run_started_at=("run_started_at", "min"),
                model_load_time_s=("model_load_time_s", "max"),
            )
        )
        model_load_s = float(loads["model_load_time_s"].fillna(0).sum())
        songs_s = float(mine["generation_time_s"].sum())
        row.update(
            billed_s=billed_s,
            songs_s=songs_s,
            boot_s=boot_s,
            model_load_s=model_load_s,
            idle_s=max(billed_s - boot_s - model_load_s - songs_s, 0.0),
            hourly_cost_usd=float(mine["hourly_cost_usd"].max()),
        )
        row["upper_bound_usd"] = billed_s / 3600.0 * row["hourly_cost_usd"]
        if zone_history.empty:
            rows.append(row)
            continue
        end = life["launched_at"] + pd.Timedelta(seconds=billed_s)
        actual = price_integral_usd(zone_history, life["launched_at"], end)
        songs_usd = float(mine["actual_cost_usd"].sum())
        boot_usd = price_integral_usd(zone_history, life["launched_at"], first_run)
        load_usd = sum(
            price_integral_usd(
                zone_history, start, start + pd.Timedelta(seconds=float(load or 0.0))
            )
            for start, load in zip(loads["run_started_at"], loads["model_load_time_s"], strict=True)
            if pd.notna(start)
        )
        overhead = actual - songs_usd
        ok = _within_bound(row["upper_bound_usd"], actual)
        row.update(
            actual_cost_usd=actual,
            songs_cost_usd=songs_usd,
            boot_usd=boot_usd,
            model_load_usd=load_usd,
            idle_usd=overhead - boot_usd - load_usd,
            overhead_usd=overhead,
            overhead_percent=100.0 * overhead / actual if actual > 0 else float("nan"),
            upper_bound_ok=bool(ok),
            flag=""
            if ok
            else (
                f"instance cost ${actual:.4f} exceeds ${row['upper_bound_usd']:.4f}, its "
                f"billed {billed_s:g} s at ${row['hourly_cost_usd']:.4f}/h"
            ),
        )
        rows.append(row)
    return pd.DataFrame(rows)


def analyze(
    store: Store,
    ec2_factory=None,
    region: str | None = None,
    boot_allowance_s: float = DEFAULT_BOOT_ALLOWANCE_S,
    check_aws: bool = True,
    now: datetime | None = None,
) -> CostAnalysis:
    """Read the records of an output location and work out estimated and actual costs.

    Actual costs need instance facts in the records and EC2 access; without either the
    analysis contains estimates only and ``notes`` explains why. AWS errors never raise.

    Args:
        store: The output location.
        ec2_factory: ``factory(region) -> EC2 client``; the project's client by default.
        region: Region for EC2 calls when the records name none.
        boot_allowance_s: Seconds of boot assumed before the first run of an instance
            EC2 no longer shows.
        check_aws: ``False`` skips every AWS call.
        now: The present, for instances still running; now when ``None``.
    """
    records = load_records(store)
    runs = load_runs(store)
    songs = song_table(records)
    notes: list[str] = []
    empty_history = pd.DataFrame(
        columns=["timestamp", "availability_zone", "instance_type", "price_usd"]
    )
    analysis = CostAnalysis(store.uri, songs, runs, pd.DataFrame(), empty_history, notes)
    if songs.empty:
        notes.append(
            f"No records in {store.uri}: nothing was generated there yet. Run "
            "notebooks/03_generate.ipynb with this output_uri, or check the location."
        )
        return analysis
    if _ec2_groups(songs).empty:
        notes.append(
            "Estimates only: the records carry no EC2 instance facts, so these songs were "
            "made on a local machine (or by a worker not started by the bootstrap), which "
            "has no spot bill to compare with."
        )
        return analysis
    if len(_ec2_groups(songs)) < len(songs):
        notes.append("Some records carry no instance facts; they have estimates only.")
    if not check_aws:
        notes.append("Estimates only: check_aws is False, so EC2 was not asked for prices.")
        return analysis
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        lifetimes = instance_lifetimes(songs, runs, ec2_factory, boot_allowance_s, now)
        history = fetch_price_history(songs, ec2_factory, region, now, lifetimes)
    except (BotoCoreError, ClientError) as error:
        logger.warning("cannot reach EC2 for the actual costs: %s", error)
        notes.append(
            f"Estimates only: EC2 could not be asked for the spot price history ({error}). "
            "Check the credentials and network, then run this notebook again."
        )
        return analysis
    analysis.price_history = history
    analysis.songs = add_actual_costs(songs, history)
    analysis.instances = instance_costs(lifetimes, analysis.songs, runs, history)
    missing = _ec2_groups(analysis.songs)["actual_cost_usd"].isna().sum()
    if missing:
        notes.append(
            f"{missing} song(s) have no actual cost: EC2 returned no spot price for their "
            "zone and instance type (the history covers the last 90 days only)."
        )
    for _, life in lifetimes.iterrows():
        if life["source"] != "EC2":
            notes.append(
                f"Instance {life['instance_id']}: life taken from {life['source']}, since "
                "EC2 no longer shows its termination time."
            )
    return analysis


def totals(analysis: CostAnalysis) -> pd.DataFrame:
    """Return the run's totals as a two-column table (``quantity``, ``value``).

    Estimated cost counts every attempt, failed ones too, since the instance billed
    them; costs per minute and per hour of audio divide it by the audio of stored songs.
    """
    songs = analysis.songs
    done = songs[songs["status"] == costs.STATUS_DONE] if len(songs) else songs
    failed = songs[songs["status"] == costs.STATUS_FAILED] if len(songs) else songs
    audio_s = float(done["actual_duration_s"].sum()) if len(done) else 0.0
    estimated = float(songs["estimated_cost_usd"].sum()) if len(songs) else 0.0
    rows = [
        ("songs done", len(done)),
        ("failed attempts", len(failed)),
        ("minutes of audio", audio_s / 60.0),
        (
            "generation hours",
            float(songs["generation_time_s"].sum()) / 3600.0 if len(songs) else 0.0,
        ),
        ("estimated cost (USD, at the hourly rate)", estimated),
        (
            "estimated cost per minute of audio (USD)",
            estimated / (audio_s / 60.0) if audio_s else None,
        ),
        (
            "estimated cost per hour of audio (USD)",
            estimated / (audio_s / 3600.0) if audio_s else None,
        ),
    ]
    if analysis.has_actual_costs:
        songs_actual = float(songs["actual_cost_usd"].sum())
        rows.append(("actual spot cost of songs (USD)", songs_actual))
        instances = analysis.instances
        if len(instances) and "actual_cost_usd" in instances:
            total = float(instances["actual_cost_usd"].sum())
            overhead = float(instances["overhead_usd"].sum())
            rows += [
                ("actual spot cost of instance life (USD)", total),
                ("overhead outside generation (USD)", overhead),
                ("overhead outside generation (%)", 100.0 * overhead / total if total else None),
                ("  boot and environment sync (USD)", float(instances["boot_usd"].sum())),
                ("  model load (USD)", float(instances["model_load_usd"].sum())),
                ("  idle (USD)", float(instances["idle_usd"].sum())),
                ("upper bound of instance life (USD)", float(instances["upper_bound_usd"].sum())),
                (
                    "actual cost per minute of audio (USD)",
                    total / (audio_s / 60.0) if audio_s else None,
                ),
            ]
        flagged = int((songs["upper_bound_ok"] == False).sum())  # noqa: E712 (object column)
        rows.append(("songs above the upper bound", flagged))
    return pd.DataFrame(
        {
            "quantity": [name for name, _ in rows],
            # Object dtype, so counts show as whole numbers beside the amounts.
            "value": pd.Series([value for _, value in rows], dtype=object),
        }
    )


def styled_songs(songs: pd.DataFrame):
    """Return the song table styled for display: a flagged row in red."""

    def color(row):
        bad = row.get("upper_bound_ok") is False
        return ["background-color: #f4b6b6; color: #7a0000" if bad else "" for _ in row]

    return songs.style.apply(color, axis=1).format(precision=6, na_rep="")


def write_reports(store: Store, analysis: CostAnalysis) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write ``cost_report.csv`` (stored songs) and ``failures.csv`` with the analysis columns.

    The five report columns stay first. The totals go to ``reports/totals.csv`` and, with
    EC2 facts, the instances to ``reports/instances.csv``. Returns the two tables as written.
    """
    table = totals(analysis)
    store.put_bytes(table.to_csv(index=False).encode("utf-8"), TOTALS_KEY, "text/csv")
    if len(analysis.instances):
        data = analysis.instances.to_csv(index=False).encode("utf-8")
        store.put_bytes(data, INSTANCES_KEY, "text/csv")
    songs = analysis.songs
    if songs.empty:
        return costs.write_reports(
            store,
            pd.DataFrame(columns=costs.REPORT_COLUMNS),
            pd.DataFrame(columns=costs.FAILURE_COLUMNS),
        )
    done = songs[songs["status"] == costs.STATUS_DONE]
    failed = songs[songs["status"] == costs.STATUS_FAILED].copy()
    done_keys = set(done["s3_filename"])
    failed["resolved"] = failed["s3_filename"].isin(done_keys)
    return costs.write_reports(store, done.reset_index(drop=True), failed.reset_index(drop=True))


def open_output(output_uri: str | None = None, region: str | None = None) -> Store:
    """Open the output location, resolving ``None`` as the generation notebook does.

    Raises:
        ConfigError: The configured location is invalid.
    """
    from mgutil.config import load_settings
    from mgutil.storage import open_store

    settings = load_settings().with_overrides(output_uri=output_uri, region=region)
    return open_store(settings.output_uri, region=settings.region)


def notes_markdown(analysis: CostAnalysis) -> str:
    """Return the analysis notes as a Markdown list, or a line saying all is known."""
    if not analysis.notes:
        return f"Records of **{analysis.uri}**: estimated and actual costs are both known."
    lines = [f"Records of **{analysis.uri}**:", ""]
    lines += [f"- {note}" for note in analysis.notes]
    return "\n".join(lines)


def local_audio_path(store: Store, key: str, cache_dir: str | Path | None = None) -> Path:
    """Return a local path of a stored song, downloading it to a cache when needed.

    A local store's file is used in place. Other stores download into ``cache_dir``
    (a folder under the system's temporary folder when ``None``); a cached file is
    reused, since song keys carry their job hash and never change content.
    """
    from mgutil.storage import LocalStore

    if isinstance(store, LocalStore):
        return store.root / key
    if cache_dir is None:
        folder = hashlib.sha256(store.uri.encode("utf-8")).hexdigest()[:12]
        cache_dir = Path(tempfile.gettempdir()) / "musicgen-batch-cache" / folder
    path = Path(cache_dir) / key
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        store.download_file(key, partial)
        partial.replace(path)
    return path


def song_players(
    store: Store, analysis: CostAnalysis, max_players: int = 10, cache_dir=None
) -> list:
    """Return display objects for up to ``max_players`` stored songs, newest first.

    Each song gets a caption (prompt, duration, cost), a waveform thumbnail and an inline
    player of the stored WAV file, which keeps its channels, so stereo plays in stereo.
    A song that cannot be read gets a line saying why instead.
    """
    import html

    from IPython.display import HTML, Audio, Image

    from mgutil.charts import waveform_png

    songs = analysis.songs
    if songs.empty or max_players <= 0:
        return []
    # Songs finished within the same timestamp resolution keep job file order, reversed.
    order = [column for column in ("finished_at", "line_number") if column in songs]
    done = songs[songs["status"] == costs.STATUS_DONE].sort_values(
        order, ascending=False, kind="stable"
    )
    display_items = []
    for _, song in done.head(max_players).iterrows():
        actual = song.get("actual_cost_usd")
        cost = f"estimated ${song['estimated_cost_usd']:.6f}"
        if pd.notna(actual):
            cost += f", actual ${actual:.6f}"
        caption = (
            f"<b>{html.escape(str(song['s3_filename']))}</b>: {html.escape(str(song['prompt']))}"
            f"<br>{song['actual_duration_s']:.1f} s of audio, {cost}"
        )
        display_items.append(HTML(caption))
        try:
            path = local_audio_path(store, song["s3_filename"], cache_dir)
            display_items.append(Image(data=waveform_png(path), format="png"))
            display_items.append(Audio(filename=str(path)))
        except Exception as error:  # one unreadable song must not hide the others
            logger.warning("cannot show %s: %s", song["s3_filename"], error)
            display_items.append(HTML(f"<i>cannot play it: {html.escape(str(error))}</i>"))
    return display_items
