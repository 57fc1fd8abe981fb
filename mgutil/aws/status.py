"""Status of a running worker: states, uptime and cost so far, progress, and its log.

Progress and logs come from the output location: songs stored out of the job file, the
time of the newest cost record, ``runs/<run id>/bootstrap.log`` (uploaded when the
bootstrap exits) and ``runs/<run id>/FAILED``. While the log is not uploaded yet, the
instance's console output stands in.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd

from mgutil import costs
from mgutil.aws.bootstrap import JOB_FILE_NAME, RUNS_PREFIX
from mgutil.aws.workers import Workers, explain_status, find_workers, uptime_and_cost
from mgutil.errors import StorageError
from mgutil.jobs import GenerationSettings, JobFile, parse_job_text
from mgutil.storage import Store

logger = logging.getLogger(__name__)

BOOTSTRAP_LOG_NAME = "bootstrap.log"
FAILED_MARKER_NAME = "FAILED"


@dataclass
class WorkerStatus:
    """A snapshot of the workers and the run. Costs USD, times seconds.

    Attributes:
        workers: Tagged instances and requests.
        table: One row per instance: state, request status and meaning, uptime, cost.
        run_id: The run shown, from the parameter or the newest instance's tag.
        songs_done: Songs of the job file stored in the output location.
        songs_total: Songs in the job file.
        last_record_at: ``finished_at`` of the newest cost record, or ``None``.
        failure: Content of ``runs/<run id>/FAILED``, or ``None``.
        log_source: Where ``log_tail`` came from.
        log_tail: Last lines of the bootstrap log or the console output.
    """

    workers: Workers
    table: pd.DataFrame
    run_id: str | None
    songs_done: int | None = None
    songs_total: int | None = None
    last_record_at: str | None = None
    failure: str | None = None
    log_source: str = ""
    log_tail: str = ""
    notes: list[str] = field(default_factory=list)

    def progress_line(self) -> str:
        if self.songs_total is None:
            return "progress: no job file given"
        last = self.last_record_at or "none yet"
        return f"songs done: {self.songs_done} of {self.songs_total}; last record: {last}"


def _decode_console(text: str) -> str:
    # EC2 returns the console output base64-encoded; some servers return plain text.
    try:
        return base64.b64decode(text, validate=True).decode("utf-8", errors="replace")
    except (binascii.Error, ValueError):
        return text


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def worker_status(
    ec2,
    tag: str,
    store: Store,
    max_price_usd: float,
    job_file: JobFile | None = None,
    run_id: str | None = None,
    log_lines: int = 30,
    now: datetime | None = None,
    model_id: str | None = None,
) -> WorkerStatus:
    """Collect the status of the tagged workers and of the run.

    Args:
        ec2: A boto3 EC2 client.
        tag: Value of the ``Name`` tag of the workers.
        store: The output location of the run.
        max_price_usd: Rate for the cost so far when an instance has no price tag.
        job_file: The job file, for songs done out of the total. The copy the launcher
            uploaded for the run (``runs/<run id>/prompts.txt``) wins when ``model_id``
            is given, since that is the file the worker reads.
        run_id: The run to show; ``None`` takes the newest instance's run id tag.
        log_lines: Lines of log to keep.
        now: Current time, for tests.
        model_id: Model of the run, which the output names depend on.
    """
    from botocore.exceptions import ClientError

    now = now or datetime.now(UTC)
    workers = find_workers(ec2, tag)
    rows = []
    for instance in workers.instances.itertuples():
        request = workers.requests[workers.requests["instance_id"] == instance.instance_id]
        code = request.iloc[0]["status_code"] if len(request) else None
        price = instance.max_price_usd if pd.notna(instance.max_price_usd) else max_price_usd
        uptime_s, cost = uptime_and_cost(instance.launch_time, price, now)
        rows.append(
            {
                "instance_id": instance.instance_id,
                "state": instance.state,
                "request_state": request.iloc[0]["state"] if len(request) else None,
                "status": f"{code}: {explain_status(code)}" if code else None,
                "uptime_h": round(uptime_s / 3600.0, 3),
                "cost_so_far_usd": round(cost, 4),
                "max_price_usd": price,
                "run_id": instance.run_id,
            }
        )
    table = pd.DataFrame(rows)
    if run_id is None and len(workers.instances):
        newest = workers.instances.sort_values("launch_time").iloc[-1]
        run_id = newest["run_id"] if isinstance(newest["run_id"], str) else None

    status = WorkerStatus(workers=workers, table=table, run_id=run_id)
    try:
        if run_id and model_id:
            job_file = _uploaded_job_file(store, run_id, model_id) or job_file
        _read_progress(status, store, job_file)
        _read_run_files(status, store, run_id, log_lines)
    except StorageError as error:
        status.notes.append(f"cannot read the output location: {error}")
    if not status.log_tail and len(workers.instances):
        instance_id = workers.instances.iloc[0]["instance_id"]
        try:
            output = ec2.get_console_output(InstanceId=instance_id, Latest=True).get("Output")
        except ClientError as error:
            status.notes.append(f"console output of {instance_id} unavailable: {error}")
            output = None
        if output:
            status.log_source = f"console output of {instance_id}"
            status.log_tail = _tail(_decode_console(output), log_lines)
    return status


def _uploaded_job_file(store: Store, run_id: str, model_id: str) -> JobFile | None:
    """Parse the job file the launcher uploaded for ``run_id``, or return ``None``."""
    key = f"{RUNS_PREFIX}{run_id}/{JOB_FILE_NAME}"
    if not store.exists(key):
        return None
    text = store.get_bytes(key).decode("utf-8-sig", "replace")
    return parse_job_text(
        text, model_id=model_id, settings=GenerationSettings(), path=store.location_of(key)
    )


def _read_progress(status: WorkerStatus, store: Store, job_file: JobFile | None) -> None:
    if job_file is not None:
        stored = set(store.list_keys())
        status.songs_total = len(job_file.jobs)
        status.songs_done = sum(job.output_name in stored for job in job_file.jobs)
    finished = [r.get("finished_at") for r in costs.read_records(store) if r.get("finished_at")]
    status.last_record_at = max(finished) if finished else None


def _read_run_files(status: WorkerStatus, store: Store, run_id: str | None, lines: int) -> None:
    if not run_id:
        return
    folder = f"{RUNS_PREFIX}{run_id}/"
    if store.exists(folder + FAILED_MARKER_NAME):
        status.failure = store.get_bytes(folder + FAILED_MARKER_NAME).decode("utf-8", "replace")
    if store.exists(folder + BOOTSTRAP_LOG_NAME):
        text = store.get_bytes(folder + BOOTSTRAP_LOG_NAME).decode("utf-8", "replace")
        status.log_source = store.location_of(folder + BOOTSTRAP_LOG_NAME)
        status.log_tail = _tail(text, lines)
