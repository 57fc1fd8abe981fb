"""The batch worker: turn a job file into stored songs, records and a cost report.

The main flow, :func:`run_batch`, reads as its steps: plan (parse the job file and check
which songs exist, before any model is loaded), load the model if anything is left,
generate the missing songs in batches (:func:`mgutil.batching.generate_songs`) and store
each one as soon as it is finished, rebuild the reports, and summarize.
"""

from __future__ import annotations

import logging
import secrets
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from mgutil import costs
from mgutil.batching import SongRequest, SongResult, default_batch_size, generate_songs
from mgutil.config import Settings, load_settings, resolve_project_path
from mgutil.errors import StoragePermissionError
from mgutil.generation import LoadedModel, load_model, plan_windows, validate_settings, write_wav
from mgutil.instance import InstanceFacts, instance_facts_from_environment
from mgutil.jobs import GenerationSettings, Job, JobFile, read_job_file
from mgutil.storage import WAV_CONTENT_TYPE, Store, open_store

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS_PATH = "prompts.txt"


def new_run_id() -> str:
    """Return a sortable, unique run id such as ``20261204T201500Z-3fa2``."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(2)}"


def _utc_now() -> str:
    # Milliseconds, so songs finished within one second still sort in order.
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class BatchPlan:
    """Everything a run needs, resolved from parameters, the environment and ``.env``.

    Attributes:
        prompts_path: Absolute path of the job file.
        output_uri: Output folder or ``s3://`` URI as given.
        model_id: Hub id or folder of the checkpoint.
        hourly_cost_usd: Rate for cost estimates, USD per hour.
        generation: Window, context and sampling settings.
        run_id: Id of this run, stored in every record.
        max_jobs: Maximum number of songs to generate in this run, or ``None`` for all.
        job_file: Parsed job file, with any invalid lines.
        store: The output location.
        settings: The configuration the plan was resolved from.
        batch_size: Most songs per ``generate`` call, or ``None`` to choose from the
            device (see :func:`mgutil.batching.default_batch_size`).
        run_started_at: ISO 8601 UTC start of the run, set by :func:`run_batch`.
        instance: EC2 instance facts, read by :func:`run_batch`; empty off EC2.
        model_load_time_s: Seconds this run spent loading the model, set by
            :func:`run_batch`; 0 when it was handed a loaded model.
    """

    prompts_path: Path
    output_uri: str
    model_id: str
    hourly_cost_usd: float
    generation: GenerationSettings
    run_id: str
    max_jobs: int | None
    job_file: JobFile
    store: Store
    settings: Settings
    batch_size: int | None = None
    # Filled in by run_batch, for the records and the run summary the cost analysis reads.
    run_started_at: str | None = None
    instance: InstanceFacts = field(default_factory=InstanceFacts)
    model_load_time_s: float | None = None

    def parameters(self) -> dict:
        """Return the effective parameters, for display and provenance."""
        return {
            "prompts_path": str(self.prompts_path),
            "output_uri": self.store.uri,
            "model_id": self.model_id,
            "hourly_cost_usd": self.hourly_cost_usd,
            **self.generation.to_dict(),
            "max_jobs": self.max_jobs,
            "batch_size": self.batch_size if self.batch_size is not None else "auto",
            "run_id": self.run_id,
            "songs": len(self.job_file.jobs),
            "invalid_lines": len(self.job_file.errors),
            "requested_audio_s": self.job_file.total_duration_s,
        }


@dataclass
class BatchSummary:
    """What a run did. Costs are estimates in USD for this run's generation time."""

    run_id: str
    generated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    estimated_cost_usd: float = 0.0
    report: pd.DataFrame | None = None
    failures: pd.DataFrame | None = None

    def line(self) -> str:
        return (
            f"generated {len(self.generated)}, skipped {len(self.skipped)}, "
            f"failed {len(self.failed)}, estimated cost ${self.estimated_cost_usd:.4f}"
        )


def prepare_batch(
    prompts_path: str | Path | None = None,
    output_uri: str | None = None,
    model_id: str | None = None,
    hourly_cost_usd: float | None = None,
    window_s: float | None = None,
    context_s: float | None = None,
    guidance_scale: float | None = None,
    top_k: int | None = None,
    skip_invalid_lines: bool = False,
    max_jobs: int | None = None,
    run_id: str | None = None,
    batch_size: int | None = None,
    settings: Settings | None = None,
    s3_client=None,
) -> BatchPlan:
    """Resolve parameters against the configuration and parse the job file.

    A parameter left as ``None`` takes the configured value (environment, then ``.env``,
    then the default). Every invalid line is reported at once, before any model loads.

    Raises:
        ConfigError: A setting is invalid.
        JobFileError: The job file has invalid lines and ``skip_invalid_lines`` is false.
        ValueError: A generation parameter is invalid.
    """
    settings = settings if settings is not None else load_settings()
    settings = settings.with_overrides(
        output_uri=output_uri, model_id=model_id, hourly_cost_usd=hourly_cost_usd
    )
    defaults = GenerationSettings()
    generation = GenerationSettings(
        window_s=float(window_s) if window_s is not None else defaults.window_s,
        context_s=float(context_s) if context_s is not None else defaults.context_s,
        guidance_scale=float(guidance_scale)
        if guidance_scale is not None
        else defaults.guidance_scale,
        top_k=int(top_k) if top_k is not None else defaults.top_k,
    )
    if max_jobs is not None and (not isinstance(max_jobs, int) or max_jobs < 0):
        raise ValueError(f"max_jobs={max_jobs!r} is invalid: expected a whole number >= 0 or None")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(
            f"batch_size={batch_size!r} is invalid: expected a whole number >= 1, or None to "
            "choose from the device"
        )

    prompts = resolve_project_path(prompts_path or DEFAULT_PROMPTS_PATH)
    job_file = read_job_file(
        prompts,
        model_id=settings.model_id,
        settings=generation,
        max_duration_s=settings.max_duration_s,
    )
    if job_file.errors:
        if not skip_invalid_lines:
            job_file.raise_for_errors()
        for error in job_file.errors:
            logger.warning("skipping invalid line of %s: %s", prompts, error)

    return BatchPlan(
        prompts_path=prompts,
        output_uri=settings.output_uri,
        model_id=settings.model_id,
        hourly_cost_usd=settings.hourly_cost_usd,
        generation=generation,
        run_id=run_id or new_run_id(),
        max_jobs=max_jobs,
        job_file=job_file,
        store=open_store(settings.output_uri, s3_client=s3_client, region=settings.region),
        settings=settings,
        batch_size=batch_size,
    )


def find_pending(plan: BatchPlan) -> tuple[list[Job], list[Job]]:
    """Split the jobs into ``(pending, existing)`` by checking the output location.

    Raises:
        StorageError: The location is unreachable; StoragePermissionError for a 403.
    """
    plan.store.check_ready()
    pending, existing = [], []
    for job in plan.job_file.jobs:
        (existing if plan.store.exists(job.output_name) else pending).append(job)
    return pending, existing


def _device_name(loaded: LoadedModel) -> str:
    if loaded.device.startswith("cuda"):
        import torch

        return f"cuda ({torch.cuda.get_device_name()})"
    return loaded.device


def _free_accelerator_memory(loaded: LoadedModel) -> None:
    if loaded.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _make_record(plan: BatchPlan, job: Job, loaded: LoadedModel, **values) -> costs.SongRecord:
    generation_time_s = values.pop("generation_time_s")
    return costs.SongRecord(
        output_key=job.output_name,
        prompt=job.prompt,
        requested_duration_s=job.duration_s,
        generation_time_s=round(generation_time_s, 3),
        estimated_cost_usd=costs.estimate_cost_usd(generation_time_s, plan.hourly_cost_usd),
        hourly_cost_usd=plan.hourly_cost_usd,
        model_id=plan.model_id,
        device=_device_name(loaded),
        run_id=plan.run_id,
        job_hash=job.job_hash,
        seed=job.seed,
        line_number=job.line_number,
        sampling_rate=loaded.sampling_rate,
        channels=loaded.audio_channels,
        settings=plan.generation.to_dict(),
        hostname=socket.gethostname(),
        # Provenance for the cost analysis: where and when the run happened.
        **plan.instance.to_dict(),
        model_load_time_s=plan.model_load_time_s,
        run_started_at=plan.run_started_at,
        **values,
    )


def _write_run_summary(plan: BatchPlan, summary: BatchSummary, status: str) -> None:
    """Store ``runs/<run_id>/run.json``, so the cost analysis knows the run's span.

    Written when the run starts (status ``running``) and again when it ends; a run cut
    short, as by a spot interruption, keeps the first one. A failed write is logged only.
    """
    finished = status != "running"
    data = {
        "run_id": plan.run_id,
        "status": status,
        "started_at": plan.run_started_at,
        "finished_at": _utc_now() if finished else None,
        **plan.instance.to_dict(),
        "hostname": socket.gethostname(),
        "model_id": plan.model_id,
        "hourly_cost_usd": plan.hourly_cost_usd,
        "model_load_time_s": plan.model_load_time_s,
        "generated": len(summary.generated),
        "skipped": len(summary.skipped),
        "failed": len(summary.failed),
        "estimated_cost_usd": summary.estimated_cost_usd,
    }
    try:
        costs.write_run_summary(plan.store, data)
    except Exception:
        logger.exception("could not store the summary of run %s", plan.run_id)


def store_song(
    plan: BatchPlan, job: Job, loaded: LoadedModel, result: SongResult, scratch: Path
) -> costs.SongRecord:
    """Store one generated song, then its record.

    The record's generation time is the song's share of the batches it was in plus the
    time storing it took, since the instance bills through both. The temporary WAV is
    removed whether or not storing succeeds.
    """
    started = time.perf_counter()
    temp_path = scratch / job.output_name
    try:
        write_wav(temp_path, result.audio, loaded.sampling_rate)
        plan.store.put_file(temp_path, job.output_name, WAV_CONTENT_TYPE)
    finally:
        temp_path.unlink(missing_ok=True)
    storage_time_s = time.perf_counter() - started

    record = _make_record(
        plan,
        job,
        loaded,
        actual_duration_s=result.audio.shape[-1] / loaded.sampling_rate,
        generation_time_s=result.generation_time_s + storage_time_s,
        started_at=result.started_at or _utc_now(),
        finished_at=_utc_now(),
        status=costs.STATUS_DONE,
        windows=result.windows,
    )
    costs.write_record(plan.store, record)
    return record


def _progress_bar(total: int, description: str, enabled: bool, leave: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="song", disable=not enabled, leave=leave)


def run_batch(
    plan: BatchPlan,
    loaded: LoadedModel | None = None,
    progress: bool = True,
    model_loader: Callable[[str], LoadedModel] = load_model,
) -> BatchSummary:
    """Generate every missing song of the plan, starting them in job file order.

    Args:
        plan: The prepared batch.
        loaded: An already loaded model; when ``None`` the model is loaded only if at
            least one song is missing.
        progress: Show tqdm progress bars over songs and windows.
        model_loader: Function that loads ``plan.model_id``.

    Returns:
        The summary; its ``line()`` is also logged.

    Raises:
        StorageError: The output location is unreachable or denies access. Songs already
            stored stay stored, and the reports are rebuilt before raising when possible.
    """
    summary = BatchSummary(run_id=plan.run_id)
    logger.info("run %s: %d song(s) in %s", plan.run_id, len(plan.job_file.jobs), plan.prompts_path)
    # Run start and instance facts, read once, for every record of this run.
    plan.run_started_at = _utc_now()
    plan.instance = instance_facts_from_environment()
    plan.model_load_time_s = 0.0

    pending, existing = find_pending(plan)
    _write_run_summary(plan, summary, "running")
    for job in existing:
        logger.info("skip %s: already stored", job.output_name)
        summary.skipped.append(job.output_name)
    if plan.max_jobs is not None and len(pending) > plan.max_jobs:
        logger.info(
            "max_jobs=%d: leaving %d song(s) for a later run",
            plan.max_jobs,
            len(pending) - plan.max_jobs,
        )
        pending = pending[: plan.max_jobs]

    try:
        if pending:
            if loaded is None:
                loaded = model_loader(plan.model_id)
                plan.model_load_time_s = round(loaded.load_time_s, 3)
            validate_settings(loaded, plan.generation)
            _generate_pending(plan, pending, loaded, summary, progress)
    except BaseException:
        # Keep the report in step with the songs stored before the failure.
        try:
            costs.rebuild_reports(plan.store)
        except Exception:
            logger.exception("could not rebuild the reports after the run failed")
        _write_run_summary(plan, summary, "failed")
        raise
    summary.report, summary.failures = costs.rebuild_reports(plan.store)
    _write_run_summary(plan, summary, "finished")

    logger.info("run %s: %s", plan.run_id, summary.line())
    return summary


def _generate_pending(
    plan: BatchPlan, pending: list[Job], loaded: LoadedModel, summary: BatchSummary, progress: bool
) -> None:
    # Another worker, or an earlier attempt, may have stored a song since planning.
    jobs = []
    for job in pending:
        if plan.store.exists(job.output_name):
            logger.info("skip %s: stored since the run started", job.output_name)
            summary.skipped.append(job.output_name)
        else:
            jobs.append(job)
    if not jobs:
        return

    by_key = {job.output_name: job for job in jobs}
    requests = [SongRequest(job.output_name, job.prompt, job.duration_s, job.seed) for job in jobs]
    batch_size = plan.batch_size or default_batch_size(loaded, plan.generation)
    logger.info(
        "generating %d song(s) in batches of up to %d on %s", len(jobs), batch_size, loaded.device
    )
    with tempfile.TemporaryDirectory(prefix="musicgen-batch-") as scratch_dir:
        scratch = Path(scratch_dir)
        songs_bar = _progress_bar(len(jobs), "songs", progress)
        windows_bar = _progress_bar(
            sum(_window_count(loaded, plan.generation, job) for job in jobs),
            "windows",
            progress,
            leave=False,
        )
        windows_bar.unit = "window"

        def on_window(request, window, total):
            windows_bar.update(1)

        def on_song(result: SongResult) -> None:
            _finish_song(plan, by_key[result.request.key], loaded, result, scratch, summary)
            songs_bar.update(1)

        try:
            generate_songs(
                loaded,
                requests,
                plan.generation,
                batch_size=batch_size,
                on_song=on_song,
                on_window=on_window,
            )
        finally:
            windows_bar.close()
            songs_bar.close()


def _window_count(loaded: LoadedModel, settings: GenerationSettings, job: Job) -> int:
    total_samples = int(round(job.duration_s * loaded.sampling_rate))
    total_frames = -(-total_samples // loaded.hop_length)
    return len(
        plan_windows(
            total_frames,
            loaded.seconds_to_frames(settings.window_s),
            loaded.seconds_to_frames(settings.context_s),
        )
    )


def _finish_song(
    plan: BatchPlan,
    job: Job,
    loaded: LoadedModel,
    result: SongResult,
    scratch: Path,
    summary: BatchSummary,
) -> None:
    """Store a finished song and its record, or record why it failed.

    One bad song must not end the batch, so every error but a denied storage access is
    recorded and logged; a 403 stops the run, as every later upload would fail too.
    """
    error = result.error
    record = None
    started = time.perf_counter()
    if error is None:
        try:
            record = store_song(plan, job, loaded, result, scratch)
        except StoragePermissionError:
            raise
        except Exception as store_error:  # recorded below, like a generation failure
            logger.exception("failed to store %s", job.output_name)
            error = store_error

    if record is not None:
        logger.info(
            "stored %s in %.1f s, estimated $%.4f",
            plan.store.location_of(job.output_name),
            record.generation_time_s,
            record.estimated_cost_usd,
        )
        summary.generated.append(job.output_name)
        summary.estimated_cost_usd += record.estimated_cost_usd
        return

    elapsed = result.generation_time_s + (time.perf_counter() - started)
    if result.error is not None:
        logger.error(
            "failed %s after %.1f s: %s",
            job.output_name,
            elapsed,
            "".join(traceback.format_exception(result.error)).rstrip(),
        )
    _free_accelerator_memory(loaded)
    _record_failure(plan, job, loaded, error, elapsed, result.started_at or _utc_now())
    summary.failed.append(job.output_name)
    summary.estimated_cost_usd += costs.estimate_cost_usd(elapsed, plan.hourly_cost_usd)


def _record_failure(
    plan: BatchPlan,
    job: Job,
    loaded: LoadedModel,
    error: Exception,
    elapsed: float,
    started_at: str,
) -> None:
    record = _make_record(
        plan,
        job,
        loaded,
        actual_duration_s=None,
        generation_time_s=elapsed,
        started_at=started_at,
        finished_at=_utc_now(),
        status=costs.STATUS_FAILED,
        error=f"{type(error).__name__}: {error}",
    )
    try:
        costs.write_record(plan.store, record)
    except Exception:  # the failure is already logged; losing its record must not stop the run
        logger.exception("could not store the failure record of %s", job.output_name)
