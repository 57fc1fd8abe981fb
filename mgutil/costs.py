"""Per-song cost records and the reports rebuilt from them.

Each generated song gets a JSON record under ``records/`` beside the audio, written only
after the audio is stored. A failed attempt gets its own record under
``records/failed/``, with status ``failed`` and ``failure`` set to ``generation_failed``,
or to ``upload_failed`` when the song was generated but could not be stored (the worker
then keeps it in its local spool).
``cost_report.csv`` and ``failures.csv`` at the root of the output location are rebuilt
from all records at the end of every run, so no run loses the rows of an earlier one.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass, field

import pandas as pd

from mgutil.storage import Store

logger = logging.getLogger(__name__)

RECORDS_PREFIX = "records/"
FAILED_RECORDS_PREFIX = "records/failed/"
COST_REPORT_KEY = "cost_report.csv"
FAILURES_KEY = "failures.csv"
# One summary per run, runs/<run_id>/run.json: start, end, instance facts and counts.
RUNS_PREFIX = "runs/"

STATUS_DONE = "done"
STATUS_FAILED = "failed"
# Why an attempt failed, in the ``failure`` field of its record.
FAILURE_GENERATION = "generation_failed"
FAILURE_UPLOAD = "upload_failed"

# The first columns of cost_report.csv, in this order. s3_filename holds the output key,
# for a local store too, so the report reads the same wherever it was made.
REPORT_COLUMNS = [
    "s3_filename",
    "prompt",
    "requested_duration_s",
    "generation_time_s",
    "estimated_cost_usd",
]
FAILURE_COLUMNS = [
    "s3_filename",
    "prompt",
    "requested_duration_s",
    "generation_time_s",
    "estimated_cost_usd",
    "error",
    "resolved",
]


def estimate_cost_usd(generation_time_s: float, hourly_cost_usd: float) -> float:
    """Return the estimated cost of ``generation_time_s`` seconds at an hourly rate in USD."""
    return generation_time_s / 3600.0 * hourly_cost_usd


@dataclass
class SongRecord:
    """Provenance and cost of one generation attempt.

    Times are seconds; ``started_at`` and ``finished_at`` are ISO 8601 in UTC; costs are
    USD, the rate USD per hour.
    """

    output_key: str
    prompt: str
    requested_duration_s: float
    actual_duration_s: float | None
    generation_time_s: float
    estimated_cost_usd: float
    hourly_cost_usd: float
    model_id: str
    device: str
    started_at: str
    finished_at: str
    run_id: str
    status: str
    error: str | None = None
    job_hash: str = ""
    seed: int = 0
    line_number: int = 0
    sampling_rate: int | None = None
    channels: int | None = None
    windows: int | None = None
    settings: dict = field(default_factory=dict)
    hostname: str = ""
    # Added for the cost analysis; None in records written before, and off EC2 for the
    # instance facts (read from the instance metadata service by mgutil.instance).
    instance_id: str | None = None
    instance_type: str | None = None
    availability_zone: str | None = None
    region: str | None = None
    model_load_time_s: float | None = None  # seconds this run spent loading the model
    run_started_at: str | None = None  # ISO 8601 UTC start of the run that made the record
    # The worker that wrote the record, and how many worker attempts the song took: more
    # than 1 when a worker continued another one's checkpoint. generation_time_s counts
    # the time of every attempt.
    worker_id: str = ""
    attempts: int = 1
    # FAILURE_GENERATION or FAILURE_UPLOAD for a failed attempt, else None.
    failure: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False).encode("utf-8")


def record_key(record: SongRecord) -> str:
    """Return the key a record is stored under.

    A song has one success record; each failed attempt has its own, named by run, so a
    later success never hides what a failure cost.
    """
    stem = record.output_key.rsplit("/", 1)[-1].removesuffix(".wav")
    if record.status == STATUS_DONE:
        return f"{RECORDS_PREFIX}{stem}.json"
    return f"{FAILED_RECORDS_PREFIX}{stem}-{record.run_id}.json"


def write_record(store: Store, record: SongRecord) -> str:
    """Store a record and return its key."""
    key = record_key(record)
    store.put_bytes(record.to_json(), key, "application/json")
    return key


def run_summary_key(run_id: str) -> str:
    """Return the key of a run's summary."""
    return f"{RUNS_PREFIX}{run_id}/run.json"


def write_run_summary(store: Store, summary: dict) -> str:
    """Store a run summary (a JSON object with at least ``run_id``) and return its key."""
    key = run_summary_key(summary["run_id"])
    data = json.dumps(summary, indent=2, ensure_ascii=False).encode("utf-8")
    store.put_bytes(data, key, "application/json")
    return key


def read_records(store: Store) -> list[dict]:
    """Read every record in the store; unreadable ones are logged and skipped."""
    records = []
    for key in store.list_keys(RECORDS_PREFIX):
        if not key.endswith(".json"):
            continue
        try:
            records.append(json.loads(store.get_bytes(key)))
        except (ValueError, UnicodeDecodeError) as error:
            logger.warning("skipping unreadable record %s: %s", store.location_of(key), error)
    return records


def _records_frame(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(records)
    if frame.empty:
        return frame
    frame = frame.rename(columns={"output_key": "s3_filename"})
    frame = frame.drop(columns=["settings"], errors="ignore")
    # Chronological; songs started in the same second keep job file order.
    order = [column for column in ("started_at", "line_number", "s3_filename") if column in frame]
    return frame.sort_values(order, kind="stable").reset_index(drop=True)


def build_cost_report(records: list[dict]) -> pd.DataFrame:
    """Return one row per stored song, the report columns first."""
    done = [record for record in records if record.get("status") == STATUS_DONE]
    frame = _records_frame(done)
    if frame.empty:
        return pd.DataFrame(columns=REPORT_COLUMNS)
    extra = [column for column in frame.columns if column not in REPORT_COLUMNS]
    return frame[REPORT_COLUMNS + extra]


def build_failures(records: list[dict]) -> pd.DataFrame:
    """Return one row per failed attempt; ``resolved`` says whether a later run stored it."""
    done_keys = {record["output_key"] for record in records if record.get("status") == STATUS_DONE}
    failed = [record for record in records if record.get("status") == STATUS_FAILED]
    frame = _records_frame(failed)
    if frame.empty:
        return pd.DataFrame(columns=FAILURE_COLUMNS)
    frame["resolved"] = frame["s3_filename"].isin(done_keys)
    extra = [column for column in frame.columns if column not in FAILURE_COLUMNS]
    return frame[FAILURE_COLUMNS + extra]


def _csv_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue().encode("utf-8")


def write_reports(
    store: Store, report: pd.DataFrame, failures: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write tables with extra columns (such as the cost analysis) as the two reports.

    The report and failure columns stay first, in their usual order, so readers of
    ``cost_report.csv`` find the same columns where they expect them.

    Returns:
        The two tables as written.
    """
    tables = []
    for frame, first in ((report, REPORT_COLUMNS), (failures, FAILURE_COLUMNS)):
        frame = frame.rename(columns={"output_key": "s3_filename"})
        for column in first:
            if column not in frame:
                frame[column] = pd.Series(dtype=object)
        tables.append(frame[first + [column for column in frame.columns if column not in first]])
    store.put_bytes(_csv_bytes(tables[0]), COST_REPORT_KEY, "text/csv")
    store.put_bytes(_csv_bytes(tables[1]), FAILURES_KEY, "text/csv")
    return tables[0], tables[1]


def rebuild_reports(store: Store) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rebuild ``cost_report.csv`` and ``failures.csv`` from every record in the store.

    Returns:
        The cost report and the failures table.
    """
    records = read_records(store)
    report = build_cost_report(records)
    failures = build_failures(records)
    store.put_bytes(_csv_bytes(report), COST_REPORT_KEY, "text/csv")
    store.put_bytes(_csv_bytes(failures), FAILURES_KEY, "text/csv")
    logger.info(
        "wrote %s (%d songs) and %s (%d failed attempts)",
        store.location_of(COST_REPORT_KEY),
        len(report),
        store.location_of(FAILURES_KEY),
        len(failures),
    )
    return report, failures
