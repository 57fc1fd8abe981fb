"""The batch worker: turn a job file into stored songs, records and a cost report.

The main flow, :func:`run_batch`, reads as its steps: plan (parse the job file and check
which songs exist, before any model is loaded), load the model if anything is left,
generate the missing songs in batches (:func:`mgutil.batching.generate_songs`) and store
each one as soon as it is finished, rebuild the reports, and summarize.

Several workers may share one job file and output location. Each song is claimed right
before it enters generation and checkpointed as it goes (:mod:`mgutil.coordination`), a
spot interruption notice ends the run between two windows with every song in progress
checkpointed (:mod:`mgutil.interruption`), and a song whose upload fails waits in a local
spool for the next run (:mod:`mgutil.spool`).

Run it from a shell with ``python -m mgutil.worker --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import secrets
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from mgutil import costs
from mgutil.batching import (
    Resume,
    SongProgress,
    SongRequest,
    SongResult,
    default_batch_size,
    generate_songs,
    tune_for_batches,
)
from mgutil.claims import DEFAULT_TTL_S, new_worker_id
from mgutil.config import Settings, load_settings, resolve_project_path
from mgutil.coordination import DEFAULT_CHECKPOINT_EVERY_S, SongCoordinator
from mgutil.errors import MusicGenBatchError, StorageError, StoragePermissionError
from mgutil.generation import LoadedModel, load_model, plan_windows, validate_settings
from mgutil.instance import InstanceFacts, instance_facts_from_environment
from mgutil.interruption import DEFAULT_INTERVAL_S, InterruptionWatcher, watcher_from_environment
from mgutil.jobs import GenerationSettings, Job, JobFile, read_job_file
from mgutil.spool import Spool
from mgutil.storage import WAV_CONTENT_TYPE, S3Store, Store, open_store

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
        batch_size: Maximum number of songs per ``generate`` call, or ``None`` to choose
            from the device (see :func:`mgutil.batching.default_batch_size`).
        worker_id: Id of this worker, written into its claims and records.
        claim_ttl_s: Seconds a claim on a song lasts without renewal.
        checkpoint_every_s: Seconds of generation between two checkpoints of a song.
        notice_interval_s: Seconds between two polls for a spot interruption notice.
        spool: Local folder that keeps songs whose upload failed.
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
    worker_id: str = ""
    claim_ttl_s: float = DEFAULT_TTL_S
    checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S
    notice_interval_s: float = DEFAULT_INTERVAL_S
    spool: Spool | None = None
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
            "worker_id": self.worker_id,
            "songs": len(self.job_file.jobs),
            "invalid_lines": len(self.job_file.errors),
            "requested_audio_s": self.job_file.total_duration_s,
        }


@dataclass
class BatchSummary:
    """What a run did. Costs are estimates in USD for this run's generation time.

    Attributes:
        run_id: Id of the run.
        generated: Songs generated and stored by this run.
        skipped: Songs found stored already.
        failed: Songs that failed, in generation or in storage.
        upload_failed: The failed songs that were generated but not stored; each waits
            in the spool.
        from_spool: Songs a failed upload of an earlier run left in the spool, stored now.
        claimed_elsewhere: Songs left to the other workers that had claimed them.
        resumed: Songs continued from a checkpoint.
        handed_on: Songs in progress when the run stopped, checkpointed for the next one.
        interrupted: Whether a spot interruption notice ended the run early.
    """

    run_id: str
    generated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    upload_failed: list[str] = field(default_factory=list)
    from_spool: list[str] = field(default_factory=list)
    claimed_elsewhere: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    handed_on: list[str] = field(default_factory=list)
    interrupted: bool = False
    estimated_cost_usd: float = 0.0
    report: pd.DataFrame | None = None
    failures: pd.DataFrame | None = None

    def line(self) -> str:
        text = (
            f"generated {len(self.generated)}, skipped {len(self.skipped)}, "
            f"failed {len(self.failed)}, estimated cost ${self.estimated_cost_usd:.4f}"
        )
        # Counts that are usually zero appear only when they are not.
        extras = [
            (self.upload_failed, "of the failed kept in the spool after a failed upload"),
            (self.from_spool, "uploaded from the spool"),
            (self.claimed_elsewhere, "left to other workers"),
            (self.resumed, "resumed from checkpoints"),
        ]
        for songs, label in extras:
            if songs:
                text += f", {len(songs)} {label}"
        if self.interrupted:
            text += (
                f"; interrupted by a spot notice, {len(self.handed_on)} song(s) checkpointed "
                "for the next run"
            )
        return text


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
    worker_id: str | None = None,
    claim_ttl_s: float | None = None,
    checkpoint_every_s: float | None = None,
    notice_interval_s: float | None = None,
    spool_dir: str | Path | None = None,
    settings: Settings | None = None,
    s3_client=None,
) -> BatchPlan:
    """Resolve parameters against the configuration and parse the job file.

    A parameter left as ``None`` takes the configured value (environment, then ``.env``,
    then the default). Every invalid line is reported at once, before any model loads.
    ``worker_id`` defaults to a new id (host name, process id and a random suffix),
    ``claim_ttl_s`` to 300 s, ``checkpoint_every_s`` to 60 s, ``notice_interval_s`` to
    5 s, and ``spool_dir`` to :func:`mgutil.spool.default_spool_root`.

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
    claim_ttl_s = DEFAULT_TTL_S if claim_ttl_s is None else float(claim_ttl_s)
    checkpoint_every_s = (
        DEFAULT_CHECKPOINT_EVERY_S if checkpoint_every_s is None else float(checkpoint_every_s)
    )
    notice_interval_s = (
        DEFAULT_INTERVAL_S if notice_interval_s is None else float(notice_interval_s)
    )
    if not claim_ttl_s > 0:
        raise ValueError(f"claim_ttl_s={claim_ttl_s!r} is invalid: expected seconds > 0")
    if not checkpoint_every_s >= 0:
        raise ValueError(
            f"checkpoint_every_s={checkpoint_every_s!r} is invalid: expected seconds >= 0, "
            "0 for a checkpoint after every window"
        )
    if not notice_interval_s > 0:
        raise ValueError(
            f"notice_interval_s={notice_interval_s!r} is invalid: expected seconds > 0"
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

    store = open_store(settings.output_uri, s3_client=s3_client, region=settings.region)
    return BatchPlan(
        prompts_path=prompts,
        output_uri=settings.output_uri,
        model_id=settings.model_id,
        hourly_cost_usd=settings.hourly_cost_usd,
        generation=generation,
        run_id=run_id or new_run_id(),
        max_jobs=max_jobs,
        job_file=job_file,
        store=store,
        settings=settings,
        batch_size=batch_size,
        worker_id=worker_id or new_worker_id(),
        claim_ttl_s=claim_ttl_s,
        checkpoint_every_s=checkpoint_every_s,
        notice_interval_s=notice_interval_s,
        spool=Spool(store.uri, spool_dir),
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
        worker_id=plan.worker_id,
        # Provenance for the cost analysis: where and when the run happened.
        **plan.instance.to_dict(),
        model_load_time_s=plan.model_load_time_s,
        run_started_at=plan.run_started_at,
        **values,
    )


def _write_run_summary(plan: BatchPlan, summary: BatchSummary, status: str) -> None:
    """Store ``runs/<run_id>/run.json``, so the cost analysis knows the run's span.

    Written when the run starts (status ``running``) and again when it ends (``finished``,
    ``interrupted`` by a spot notice, or ``failed``). A killed run keeps the first one. A
    failed write is logged only.
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
    plan: BatchPlan,
    job: Job,
    loaded: LoadedModel,
    result: SongResult,
    prior_generation_s: float = 0.0,
    attempts: int = 1,
) -> costs.SongRecord:
    """Store one generated song, then its record.

    The song is written to the spool first, with the record it will get. If the upload
    fails, both stay there for the next run, which uploads the file instead of
    generating the song again. The spool entry is removed once the record is stored.

    The record's generation time is the song's share of the batches it was in, plus
    ``prior_generation_s`` of earlier attempts (from its checkpoint), plus the time
    storing it took, since the instance bills through all of them.

    Raises:
        StorageError: The upload or the record failed; the spool keeps the song.
    """
    started = time.perf_counter()
    generation_time_s = prior_generation_s + result.generation_time_s
    values = {
        "actual_duration_s": result.audio.shape[-1] / loaded.sampling_rate,
        "started_at": result.started_at or _utc_now(),
        "status": costs.STATUS_DONE,
        "windows": result.windows,
        "attempts": attempts,
    }
    spooled = _make_record(
        plan, job, loaded, generation_time_s=generation_time_s, finished_at=_utc_now(), **values
    )
    path = plan.spool.put(
        job.output_name, result.audio, loaded.sampling_rate, dataclasses.asdict(spooled)
    )
    plan.store.put_file(path, job.output_name, WAV_CONTENT_TYPE)
    record = _make_record(
        plan,
        job,
        loaded,
        generation_time_s=generation_time_s + (time.perf_counter() - started),
        finished_at=_utc_now(),
        **values,
    )
    costs.write_record(plan.store, record)
    plan.spool.remove(job.output_name)
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

    Songs that an earlier run generated but could not upload are uploaded from the spool
    first. Each song is claimed right before it enters generation, so that other workers
    on the same job file and output location skip it, and a song with a checkpoint
    continues from it. On EC2 (``MUSICGEN_EC2_WORKER=1``) a spot interruption notice
    stops the run before the next batch of windows: every song in progress is
    checkpointed and its claim released, the reports are rebuilt, and the summary's
    ``interrupted`` is set.

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
    logger.info(
        "run %s, worker %s: %d song(s) in %s",
        plan.run_id,
        plan.worker_id,
        len(plan.job_file.jobs),
        plan.prompts_path,
    )
    # Run start and instance facts, read once, for every record of this run.
    plan.run_started_at = _utc_now()
    plan.instance = instance_facts_from_environment()
    plan.model_load_time_s = 0.0
    watcher = watcher_from_environment(interval_s=plan.notice_interval_s)
    coordinator = SongCoordinator(
        plan.store,
        plan.worker_id,
        claim_ttl_s=plan.claim_ttl_s,
        checkpoint_every_s=plan.checkpoint_every_s,
    )
    try:
        _run(plan, loaded, progress, model_loader, summary, coordinator, watcher)
    except BaseException:
        # Hand the songs in progress on and keep the report in step with the songs
        # stored before the failure.
        coordinator.save_in_progress()
        try:
            costs.rebuild_reports(plan.store)
        except Exception:
            logger.exception("could not rebuild the reports after the run failed")
        _write_run_summary(plan, summary, "failed")
        _log_storage_retries(plan.store)
        raise
    finally:
        if watcher is not None:
            watcher.stop()

    summary.claimed_elsewhere = list(dict.fromkeys(coordinator.claimed_elsewhere))
    summary.skipped.extend(coordinator.stored_elsewhere)
    if summary.interrupted:
        _finish_interrupted_run(plan, summary, watcher)
    else:
        summary.report, summary.failures = costs.rebuild_reports(plan.store)
        _write_run_summary(plan, summary, "finished")
        logger.info("run %s: %s", plan.run_id, summary.line())
    _log_storage_retries(plan.store)
    return summary


def _run(
    plan: BatchPlan,
    loaded: LoadedModel | None,
    progress: bool,
    model_loader: Callable[[str], LoadedModel],
    summary: BatchSummary,
    coordinator: SongCoordinator,
    watcher: InterruptionWatcher | None,
) -> None:
    """Plan, upload what the spool holds, load the model, generate; the steps of run_batch."""
    pending, existing = find_pending(plan)
    _write_run_summary(plan, summary, "running")
    for job in existing:
        logger.info("skip %s: already stored", job.output_name)
        summary.skipped.append(job.output_name)
    pending = _store_spooled_songs(plan, pending, existing, summary, coordinator)
    if plan.max_jobs is not None and len(pending) > plan.max_jobs:
        logger.info(
            "max_jobs=%d: leaving %d song(s) for a later run",
            plan.max_jobs,
            len(pending) - plan.max_jobs,
        )
        pending = pending[: plan.max_jobs]
    if not pending or _interrupted(watcher, summary):
        return
    if loaded is None:
        loaded = model_loader(plan.model_id)
        plan.model_load_time_s = round(loaded.load_time_s, 3)
        # Only a model this run loaded itself: a caller's model stays as it was given.
        tune_for_batches(loaded)
    validate_settings(loaded, plan.generation)
    coordinator.sampling_rate = loaded.sampling_rate
    if _interrupted(watcher, summary):
        return
    _generate_pending(plan, pending, loaded, summary, progress, coordinator, watcher)
    _interrupted(watcher, summary)


def _interrupted(watcher: InterruptionWatcher | None, summary: BatchSummary) -> bool:
    """Return whether a spot interruption notice has arrived, and note it in the summary."""
    if watcher is not None and watcher.interrupted.is_set():
        summary.interrupted = True
    return summary.interrupted


def _finish_interrupted_run(
    plan: BatchPlan, summary: BatchSummary, watcher: InterruptionWatcher
) -> None:
    """Write the reports and the run summary after a notice, logging the time left."""
    notice = watcher.notice

    def seconds_left() -> float:
        return notice.seconds_left() if notice is not None else 0.0

    logger.warning(
        "interruption notice: %.0f s left before EC2 will %s the instance; "
        "%d song(s) in progress checkpointed, claims released",
        seconds_left(),
        notice.action if notice is not None else "reclaim",
        len(summary.handed_on),
    )
    try:
        summary.report, summary.failures = costs.rebuild_reports(plan.store)
    except StorageError:
        logger.exception("could not rebuild the reports after the interruption notice")
    _write_run_summary(plan, summary, "interrupted")
    logger.warning(
        "interruption notice: records, reports and run summary written, %.0f s left. "
        "Exiting; a bootstrapped worker uploads its log and notebook next",
        seconds_left(),
    )
    logger.info("run %s: %s", plan.run_id, summary.line())


def _log_storage_retries(store: Store) -> None:
    if not isinstance(store, S3Store):
        return
    level = logging.WARNING if store.request_retries or store.upload_retries else logging.INFO
    logger.log(
        level,
        "storage retries this run: %d S3 request(s) retried by botocore, %d whole "
        "upload(s) retried",
        store.request_retries,
        store.upload_retries,
    )


def _store_spooled_songs(
    plan: BatchPlan,
    pending: list[Job],
    existing: list[Job],
    summary: BatchSummary,
    coordinator: SongCoordinator,
) -> list[Job]:
    """Store the songs that earlier runs left in the spool; return the jobs still to generate.

    A spooled song that is stored already may lack its record, when its worker died
    between the upload and the record, so the record is written from the spool.
    """
    entries = {entry.key: entry for entry in plan.spool.entries()}
    if not entries:
        return pending
    logger.info("%d song(s) in the spool %s", len(entries), plan.spool.folder)
    for job in existing:
        entry = entries.get(job.output_name)
        if entry is None:
            continue
        record_key = f"{costs.RECORDS_PREFIX}{job.record_name}"
        if not plan.store.exists(record_key):
            logger.warning("writing the missing record of %s from the spool", job.output_name)
            costs.write_record(plan.store, _record_from_dict(entry.record))
        plan.spool.remove(job.output_name)

    still_pending = []
    for job in pending:
        entry = entries.get(job.output_name)
        if entry is None or not _spooled_song_matches(entry, job):
            still_pending.append(job)
            continue
        if coordinator.claim(job) is None:
            continue
        try:
            plan.store.put_file(entry.wav_path, job.output_name, WAV_CONTENT_TYPE)
            record = _record_from_dict(entry.record)
            costs.write_record(plan.store, record)
        except StoragePermissionError:
            coordinator.release(job.output_name)
            raise
        except StorageError as error:
            logger.error(
                "upload of %s from the spool failed again; it stays at %s: %s",
                job.output_name,
                entry.wav_path,
                error,
            )
            coordinator.release(job.output_name)
            summary.failed.append(job.output_name)
            summary.upload_failed.append(job.output_name)
            continue
        coordinator.finish(job.output_name)
        plan.spool.remove(job.output_name)
        logger.info(
            "stored %s from the spool, generated in %.1f s by run %s",
            plan.store.location_of(job.output_name),
            record.generation_time_s,
            record.run_id,
        )
        summary.from_spool.append(job.output_name)
    return still_pending


def _spooled_song_matches(entry, job: Job) -> bool:
    """Return whether a spooled WAV is this job's whole song; remove a stale one."""
    import soundfile

    reason = None
    if entry.record.get("job_hash") != job.job_hash:
        reason = f"job hash {entry.record.get('job_hash')}, expected {job.job_hash}"
    else:
        try:
            info = soundfile.info(str(entry.wav_path))
        except RuntimeError as error:
            reason = f"unreadable WAV: {error}"
        else:
            expected = int(round(job.duration_s * info.samplerate))
            if info.frames != expected:
                reason = f"{info.frames} samples, expected {expected}"
    if reason is None:
        return True
    logger.warning("discarding spooled %s (%s): generating it again", entry.key, reason)
    entry.wav_path.unlink(missing_ok=True)
    return False


def _record_from_dict(values: dict) -> costs.SongRecord:
    names = {item.name for item in dataclasses.fields(costs.SongRecord)}
    return costs.SongRecord(**{name: value for name, value in values.items() if name in names})


def _generate_pending(
    plan: BatchPlan,
    pending: list[Job],
    loaded: LoadedModel,
    summary: BatchSummary,
    progress: bool,
    coordinator: SongCoordinator,
    watcher: InterruptionWatcher | None,
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
    songs_bar = _progress_bar(len(jobs), "songs", progress)
    windows_bar = _progress_bar(
        sum(_window_count(loaded, plan.generation, job) for job in jobs),
        "windows",
        progress,
        leave=False,
    )
    windows_bar.unit = "window"

    def admit(request: SongRequest) -> bool | Resume:
        job = by_key[request.key]
        try:
            state = coordinator.claim(job)
        except StoragePermissionError:
            raise
        except StorageError as error:
            logger.error("cannot claim %s, leaving it for a later run: %s", request.key, error)
            state = None
        if state is None:
            songs_bar.update(1)
            return False
        logger.info("start %s (%.1f s, line %d)", job.output_name, job.duration_s, job.line_number)
        if state.resume_audio is None:
            return True
        summary.resumed.append(request.key)
        windows_bar.update(state.resumed_windows)
        return Resume(state.resume_audio, state.resumed_windows)

    def on_window(request, window, total):
        windows_bar.update(1)

    def on_progress(song: SongProgress) -> bool:
        key = song.request.key
        if coordinator.lost(key):
            logger.error(
                "dropping %s: its claim was taken over by worker %s",
                key,
                coordinator.holder(key),
            )
            coordinator.drop(key)
            return False
        coordinator.progress(
            key, song.audio, song.windows_done, song.frames_done, song.generation_time_s
        )
        return True

    def on_song(result: SongResult) -> None:
        _finish_song(plan, by_key[result.request.key], loaded, result, summary, coordinator)
        songs_bar.update(1)

    def should_stop() -> bool:
        return watcher is not None and watcher.interrupted.is_set()

    try:
        generate_songs(
            loaded,
            requests,
            plan.generation,
            batch_size=batch_size,
            on_song=on_song,
            on_window=on_window,
            admit=admit,
            on_progress=on_progress,
            should_stop=should_stop,
        )
    finally:
        windows_bar.close()
        songs_bar.close()
    if should_stop():
        logger.warning(
            "interruption notice: no new window started; checkpointing %d song(s) in progress",
            len(coordinator.songs),
        )
        summary.handed_on = coordinator.save_in_progress()


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
    summary: BatchSummary,
    coordinator: SongCoordinator,
) -> None:
    """Store a finished song and its record, or record why it failed.

    One bad song must not end the batch, so every error but a denied storage access is
    recorded and logged; a 403 stops the run, as every later upload would fail too. A
    song whose upload fails stays in the spool and is recorded as ``upload_failed``.
    """
    key = job.output_name
    if coordinator.lost(key):
        logger.error(
            "not storing %s: its claim was taken over by worker %s", key, coordinator.holder(key)
        )
        coordinator.drop(key)
        return
    state = coordinator.songs.get(key)
    prior_s = state.prior_generation_s if state is not None else 0.0
    attempts = state.attempts if state is not None else 1
    error = result.error
    record = None
    started = time.perf_counter()
    if error is None:
        logger.info("finished generating %s in %.1f s", key, result.generation_time_s)
        try:
            record = store_song(plan, job, loaded, result, prior_s, attempts)
        except StoragePermissionError:
            coordinator.release(key)
            raise
        except StorageError as store_error:
            elapsed = result.generation_time_s + (time.perf_counter() - started)
            _record_upload_failure(plan, job, loaded, store_error, prior_s + elapsed, attempts)
            coordinator.release(key)
            summary.failed.append(key)
            summary.upload_failed.append(key)
            summary.estimated_cost_usd += costs.estimate_cost_usd(elapsed, plan.hourly_cost_usd)
            return
        except Exception as store_error:  # recorded below, like a generation failure
            logger.exception("failed to store %s", key)
            error = store_error

    if record is not None:
        coordinator.finish(key)
        logger.info(
            "stored %s in %.1f s, estimated $%.4f",
            plan.store.location_of(key),
            record.generation_time_s,
            record.estimated_cost_usd,
        )
        summary.generated.append(key)
        # The summary counts this run's time only; the record counts every attempt.
        summary.estimated_cost_usd += record.estimated_cost_usd - costs.estimate_cost_usd(
            prior_s, plan.hourly_cost_usd
        )
        return

    elapsed = result.generation_time_s + (time.perf_counter() - started)
    if result.error is not None:
        logger.error(
            "failed %s after %.1f s: %s",
            key,
            elapsed,
            "".join(traceback.format_exception(result.error)).rstrip(),
        )
    _free_accelerator_memory(loaded)
    _record_failure(plan, job, loaded, error, prior_s + elapsed, result.started_at or _utc_now())
    coordinator.finish(key)
    summary.failed.append(key)
    summary.estimated_cost_usd += costs.estimate_cost_usd(elapsed, plan.hourly_cost_usd)


def _record_upload_failure(
    plan: BatchPlan,
    job: Job,
    loaded: LoadedModel,
    error: StorageError,
    generation_time_s: float,
    attempts: int,
) -> None:
    path = plan.spool.wav_path(job.output_name)
    logger.error(
        "upload of %s failed; the song stays at %s and the next run on this machine "
        "uploads it instead of generating it again: %s",
        job.output_name,
        path,
        error,
    )
    record = _make_record(
        plan,
        job,
        loaded,
        actual_duration_s=None,
        generation_time_s=generation_time_s,
        started_at=_utc_now(),
        finished_at=_utc_now(),
        status=costs.STATUS_FAILED,
        failure=costs.FAILURE_UPLOAD,
        error=f"{type(error).__name__}: {error} (the song is kept at {path})",
        attempts=attempts,
    )
    try:
        costs.write_record(plan.store, record)
    except Exception:  # the store failed the upload; its record may fail too
        logger.exception("could not store the upload failure record of %s", job.output_name)


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
        failure=costs.FAILURE_GENERATION,
        error=f"{type(error).__name__}: {error}",
    )
    try:
        costs.write_record(plan.store, record)
    except Exception:  # the failure is already logged; losing its record must not stop the run
        logger.exception("could not store the failure record of %s", job.output_name)


# --- command line -----------------------------------------------------------------------

# Exit statuses of the command line.
EXIT_OK = 0  # every song stored, or the run handed its songs on after a spot notice
EXIT_SONGS_FAILED = 1  # some songs failed or wait in the spool; a rerun retries them
EXIT_INVALID_INPUT = 2  # invalid arguments, settings or job file; nothing was generated


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m mgutil.worker``."""
    parser = argparse.ArgumentParser(
        prog="python -m mgutil.worker",
        description=(
            "Generate every missing song of a job file into a folder or an S3 prefix, "
            "then rebuild the cost report. Any number of workers may share one job file "
            "and output location."
        ),
    )
    parser.add_argument("--prompts", help="job file (default: prompts.txt)")
    parser.add_argument(
        "--output-uri", help="folder or s3://bucket/prefix (default: MUSICGEN_OUTPUT_URI)"
    )
    parser.add_argument("--model-id", help="hub id or local folder (default: MUSICGEN_MODEL)")
    parser.add_argument(
        "--worker-id", help="id in claims and records (default: host name, process id, random)"
    )
    parser.add_argument("--hourly-cost-usd", type=float, help="USD per hour for estimates")
    parser.add_argument("--window-s", type=float, help="seconds per window (default: 30)")
    parser.add_argument(
        "--context-s", type=float, help="seconds of audio prompt per window (default: 10)"
    )
    parser.add_argument(
        "--guidance-scale", type=float, help="classifier-free guidance (default: 3)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="maximum songs per generate call (default: from the device)"
    )
    parser.add_argument("--max-jobs", type=int, help="maximum songs to generate in this run")
    parser.add_argument("--run-id", help="id stored in every record (default: time-based)")
    parser.add_argument(
        "--skip-invalid-lines",
        action="store_true",
        help="generate the valid lines and log the invalid ones",
    )
    parser.add_argument(
        "--claim-ttl-s",
        type=float,
        help=f"seconds a claim lasts without renewal (default: {DEFAULT_TTL_S:.0f})",
    )
    parser.add_argument(
        "--checkpoint-every-s",
        type=float,
        help=(
            "seconds of generation between two checkpoints of a song, 0 for every window "
            f"(default: {DEFAULT_CHECKPOINT_EVERY_S:.0f})"
        ),
    )
    parser.add_argument(
        "--notice-interval-s",
        type=float,
        help=(
            "seconds between polls for a spot interruption notice, on EC2 only "
            f"(default: {DEFAULT_INTERVAL_S:.0f})"
        ),
    )
    parser.add_argument(
        "--spool-dir",
        help="folder for songs whose upload failed (default: MUSICGEN_SPOOL_DIR, else the "
        "system's temporary folder)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of the mgutil loggers (default: INFO)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one worker from the command line; return its exit status.

    Returns:
        0 when every song is stored or the run handed its songs on after a spot
        interruption notice, 1 when songs failed or wait in the spool, 2 for invalid
        arguments, settings or job file.
    """
    from mgutil.notebook import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        plan = prepare_batch(
            prompts_path=args.prompts,
            output_uri=args.output_uri,
            model_id=args.model_id,
            hourly_cost_usd=args.hourly_cost_usd,
            window_s=args.window_s,
            context_s=args.context_s,
            guidance_scale=args.guidance_scale,
            skip_invalid_lines=args.skip_invalid_lines,
            max_jobs=args.max_jobs,
            run_id=args.run_id,
            batch_size=args.batch_size,
            worker_id=args.worker_id,
            claim_ttl_s=args.claim_ttl_s,
            checkpoint_every_s=args.checkpoint_every_s,
            notice_interval_s=args.notice_interval_s,
            spool_dir=args.spool_dir,
        )
    except (MusicGenBatchError, ValueError) as error:
        logger.error("%s", error)
        return EXIT_INVALID_INPUT
    summary = run_batch(plan, progress=False)
    if summary.failed:
        return EXIT_SONGS_FAILED
    return EXIT_OK


if __name__ == "__main__":
    # Run the main of the imported module, so that its loggers are named mgutil.worker
    # and the handler that configure_logging adds to "mgutil" receives their records.
    from mgutil.worker import main as _main

    sys.exit(_main())
