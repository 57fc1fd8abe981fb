"""Drills: the real worker, as separate processes, survives interruptions, kills and faults.

Each drill starts ``python -m mgutil.worker`` with the tiny model and checks the output
location afterwards: every song stored once, at its exact length, no claim or
checkpoint left behind, and one report row per song. The drills run once per module
(module-scoped fixtures), so the summary test at the end can print their counts without
running them again.

Every server listens on 127.0.0.1: moto and SeaweedFS for S3, and an IMDSv2 look-alike
for the spot interruption notice. Each worker process runs in its own process group,
which teardown kills.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import soundfile
from loopback import LoopbackServer, QuietHandler

from mgutil import costs
from mgutil.checkpoints import CHECKPOINT_PREFIX, decode_checkpoint
from mgutil.claims import CLAIM_PREFIX, read_claim
from mgutil.config import PROJECT_ROOT
from mgutil.jobs import GenerationSettings, read_job_file
from mgutil.storage import LocalStore, S3Store, Store

SAMPLING_RATE = 32_000
# Seconds one worker process may run before a drill fails. Each worker took 10 to 30 s
# on a busy 2-core machine, most of it importing PyTorch and transformers.
WORKER_TIMEOUT_S = 240.0
# Seconds the interrupted worker may take from the notice to its exit. EC2 gives 120 s.
NOTICE_EXIT_TIMEOUT_S = 90.0
# Seconds between two looks at the store or a log while a drill waits.
POLL_S = 0.1
# Log lines the drills count: one per song whose last window a worker finished, and one
# per song a worker stored.
FINISHED_PATTERN = re.compile(r"finished generating (\S+\.wav)")
STORED_PATTERN = re.compile(r"stored (?:\S+/)?(\S+\.wav) ")


# --- helpers: processes, waits and the store ----------------------------------------


def wait_until(predicate, timeout_s: float, what: str, process: WorkerProcess | None = None):
    """Poll ``predicate`` until it returns a true value, and return that value.

    Fails the test after ``timeout_s`` seconds, or as soon as ``process`` has exited.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if process is not None and process.returncode() is not None:
            pytest.fail(
                f"worker {process.name} exited with {process.returncode()} while waiting for "
                f"{what}. Log tail:\n{process.tail()}"
            )
        if time.monotonic() > deadline:
            tail = process.tail() if process is not None else ""
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")
        time.sleep(POLL_S)


class WorkerProcess:
    """``python -m mgutil.worker`` in its own process group, logging to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path):
        self.name = name
        self.log_path = log_path
        self.args = args
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mgutil.worker", *args],
                cwd=PROJECT_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def returncode(self) -> int | None:
        return self.process.poll()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait(self, timeout_s: float = WORKER_TIMEOUT_S) -> int:
        """Wait for the exit and return the exit status; fail the test on a timeout."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(
                f"worker {self.name} still ran after {timeout_s:.0f} s. Log tail:\n{self.tail()}"
            )

    def kill(self) -> None:
        """SIGKILL the whole process group, as a spot reclaim or the OOM killer would."""
        if self.process.poll() is None:
            # The group may have exited between the poll and the kill.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


class WorkerPool:
    """Start workers with one environment, and kill any left running at teardown."""

    def __init__(self, root: Path, base_env: dict[str, str]):
        self.root = root
        self.base_env = base_env
        self.workers: list[WorkerProcess] = []

    def start(self, name: str, args: list[str], extra_env: dict[str, str] | None = None):
        env = dict(self.base_env)
        env.update(extra_env or {})
        worker = WorkerProcess(name, args, env, self.root / f"{name}.log")
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()


def worker_env(spool_dir: Path, endpoint: str | None) -> dict[str, str]:
    """The environment of a worker process: offline, one CPU thread, no AWS profile."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AWS_", "MUSICGEN_", "OMP_", "MKL_"))
        and name not in ("INSTANCE_TYPE", "INSTANCE_TYPES", "HOURLY_COST_USD")
    }
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            # Several workers share two cores: one PyTorch thread each, because
            # threads that wait for each other under load make every step far slower.
            "OMP_NUM_THREADS": "1",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(spool_dir.parent / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(spool_dir.parent / "aws-credentials"),
            "MUSICGEN_ENV_FILE": str(spool_dir.parent / "absent.env"),
            "MUSICGEN_SPOOL_DIR": str(spool_dir),
        }
    )
    if endpoint is not None:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


def worker_args(
    prompts: Path, output_uri: str, model_dir: Path, worker_id: str, *extra: str
) -> list[str]:
    return [
        "--prompts",
        str(prompts),
        "--output-uri",
        output_uri,
        "--model-id",
        str(model_dir),
        "--worker-id",
        worker_id,
        "--hourly-cost-usd",
        "0.36",
        *extra,
    ]


def s3_store(endpoint: str, bucket: str, prefix: str) -> S3Store:
    """A store that reads the drill's bucket directly, with the test credentials."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    return S3Store(bucket, prefix, client)


def create_bucket(endpoint: str) -> str:
    bucket = f"musicgen-drill-{uuid.uuid4().hex[:12]}"
    s3_store(endpoint, bucket, "").client.create_bucket(Bucket=bucket)
    return bucket


def song_keys(store: Store) -> list[str]:
    return [key for key in store.list_keys() if key.endswith(".wav") and "/" not in key]


def wav_frames(store: Store, key: str) -> int:
    return soundfile.info(io.BytesIO(store.get_bytes(key))).frames


def wait_for_claims_to_expire(store: Store, keys: list[str], timeout_s: float) -> None:
    """Sleep until no song in ``keys`` has a claim that is still valid."""

    def expired() -> bool:
        claims = [read_claim(store, key) for key in keys]
        return all(claim is None or claim.expired() for claim in claims)

    wait_until(expired, timeout_s, "the claims of killed workers to expire")


def count_lines(pattern: re.Pattern, workers: list[WorkerProcess]) -> Counter:
    counts: Counter = Counter()
    for worker in workers:
        counts.update(pattern.findall(worker.log()))
    return counts


@dataclass
class DrillResult:
    """What a drill found in the output location and in the workers' logs."""

    name: str
    requested: int
    stored: int
    generated_twice: int
    report_rows: int
    details: dict = field(default_factory=dict)

    def row(self) -> str:
        return (
            f"{self.name:<28} {self.requested:>9} {self.stored:>6} "
            f"{self.generated_twice:>15} {self.report_rows:>11}"
        )


def check_output(store: Store, jobs, workers: list[WorkerProcess], name: str) -> DrillResult:
    """Collect the counts every drill asserts on, after its last worker exited."""
    expected = {job.output_name: round(job.duration_s * SAMPLING_RATE) for job in jobs}
    stored = song_keys(store)
    report = pd.read_csv(io.BytesIO(store.get_bytes(costs.COST_REPORT_KEY)))
    finished = count_lines(FINISHED_PATTERN, workers)
    return DrillResult(
        name=name,
        requested=len(expected),
        stored=len(stored),
        generated_twice=sum(1 for count in finished.values() if count > 1),
        report_rows=len(report),
        details={
            "expected": expected,
            "stored_keys": stored,
            "frames": {key: wav_frames(store, key) for key in stored},
            "report": report,
            "finished": finished,
            "stored_lines": count_lines(STORED_PATTERN, workers),
            "claims": store.list_keys(CLAIM_PREFIX),
            "checkpoints": store.list_keys(CHECKPOINT_PREFIX),
        },
    )


def assert_complete(result: DrillResult) -> None:
    """Every song stored once at its exact length, one report row each, nothing left over."""
    details = result.details
    assert sorted(details["stored_keys"]) == sorted(details["expected"])
    for key, frames in details["expected"].items():
        assert details["frames"][key] == frames, key
    assert result.generated_twice == 0, details["finished"]
    assert sorted(details["finished"]) == sorted(details["expected"])
    assert sorted(details["report"]["s3_filename"]) == sorted(details["expected"])
    assert result.report_rows == result.requested
    assert details["claims"] == []
    assert details["checkpoints"] == []


# --- the instance metadata service ----------------------------------------------------


class SpotMetadataMock(LoopbackServer):
    """IMDSv2 on 127.0.0.1: instance facts, and a spot notice once :meth:`announce` is called.

    Every GET must carry a token from ``PUT /latest/api/token``. Until the notice,
    ``spot/instance-action`` returns 404, as EC2 does.
    """

    FACTS = {
        "/latest/meta-data/instance-id": "i-0123456789abcdef0",
        "/latest/meta-data/instance-type": "g4dn.xlarge",
        "/latest/meta-data/placement/availability-zone": "us-east-1a",
        "/latest/meta-data/placement/region": "us-east-1",
    }
    ACTION_PATH = "/latest/meta-data/spot/instance-action"

    def __init__(self):
        self.lock = threading.Lock()
        self.notice: str | None = None
        self.token_requests = 0
        self.action_polls = 0
        self.notice_reads = 0
        mock = self

        class Handler(QuietHandler):
            def do_PUT(self):  # noqa: N802 (http.server's naming)
                if self.path != "/latest/api/token":
                    self._reply(404)
                    return
                with mock.lock:
                    mock.token_requests += 1
                self._reply(200, "drill-token")

            def do_GET(self):  # noqa: N802
                if self.headers.get("X-aws-ec2-metadata-token") != "drill-token":
                    self._reply(401)
                    return
                if self.path in mock.FACTS:
                    self._reply(200, mock.FACTS[self.path])
                    return
                if self.path == mock.ACTION_PATH:
                    with mock.lock:
                        mock.action_polls += 1
                        notice = mock.notice
                        if notice is not None:
                            mock.notice_reads += 1
                    self._reply(200, notice) if notice is not None else self._reply(404)
                    return
                self._reply(404)

        super().__init__(Handler)

    def announce(self, seconds_ahead: float = 120.0) -> None:
        """Announce that EC2 terminates the instance ``seconds_ahead`` seconds from now."""
        moment = time.time() + seconds_ahead
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
        with self.lock:
            self.notice = json.dumps({"action": "terminate", "time": stamp})


# --- the drills -----------------------------------------------------------------------


def _pool(tmp_path_factory, name: str, endpoint: str | None):
    root = tmp_path_factory.mktemp(name)
    spool = root / "spool"
    return WorkerPool(root, worker_env(spool, endpoint)), root


INTERRUPTION_JOBS = "slow evolving ambient drone with warm pads ; 70 ; drone\n"
# 20 s windows with 5 s of context: the 70 s song takes five windows, so a notice read
# one window late still leaves the song unfinished.
INTERRUPTION_WINDOWS = ["--window-s", "20", "--context-s", "5"]


@pytest.fixture(scope="module")
def interruption_drill(tmp_path_factory, moto_server, tiny_model_dir):
    return _interruption_drill(tmp_path_factory, moto_server, "moto", tiny_model_dir)


@pytest.fixture(scope="module")
def interruption_seaweedfs_drill(tmp_path_factory, seaweedfs_server, tiny_model_dir):
    return _interruption_drill(tmp_path_factory, seaweedfs_server, "seaweedfs", tiny_model_dir)


def _interruption_drill(tmp_path_factory, endpoint, backend, tiny_model_dir):
    """A notice while the 70 s song is in its second window; a second worker finishes it."""
    pool, root = _pool(tmp_path_factory, f"interruption-{backend}", endpoint)
    bucket = create_bucket(endpoint)
    output_uri = f"s3://{bucket}/songs"
    store = s3_store(endpoint, bucket, "songs/")
    prompts = root / "prompts.txt"
    prompts.write_text(INTERRUPTION_JOBS, encoding="utf-8")
    jobs = _jobs(prompts, tiny_model_dir, 20.0, 5.0)
    (job,) = jobs
    checkpoint_key = f"{CHECKPOINT_PREFIX}{job.file_stem}-{job.job_hash}.npz"
    try:
        with SpotMetadataMock() as metadata:
            first = pool.start(
                "interrupted",
                worker_args(
                    prompts,
                    output_uri,
                    tiny_model_dir,
                    "worker-interrupted",
                    *INTERRUPTION_WINDOWS,
                    "--checkpoint-every-s",
                    "0",
                    "--notice-interval-s",
                    "0.2",
                ),
                {
                    "MUSICGEN_EC2_WORKER": "1",
                    "AWS_EC2_METADATA_SERVICE_ENDPOINT": metadata.endpoint,
                },
            )
            # The first checkpoint is saved after the first window: the song is now in
            # its second window.
            wait_until(
                lambda: store.exists(checkpoint_key),
                WORKER_TIMEOUT_S,
                "the checkpoint after the first window",
                first,
            )
            metadata.announce()
            announced = time.monotonic()
            first_status = first.wait(NOTICE_EXIT_TIMEOUT_S)
            exit_after_notice_s = time.monotonic() - announced
            polls = metadata.action_polls
            notice_reads = metadata.notice_reads
        checkpoint = decode_checkpoint(store.get_bytes(checkpoint_key))
        after_first = {
            "song_stored": store.exists(job.output_name),
            "claims": store.list_keys(CLAIM_PREFIX),
            "report": store.exists(costs.COST_REPORT_KEY),
            "run_summaries": [
                json.loads(store.get_bytes(key)) for key in store.list_keys(costs.RUNS_PREFIX)
            ],
        }

        second = pool.start(
            "resumed",
            worker_args(
                prompts, output_uri, tiny_model_dir, "worker-resumed", *INTERRUPTION_WINDOWS
            ),
        )
        second_status = second.wait()
        result = check_output(store, jobs, [first, second], f"interruption ({backend})")
        record = json.loads(store.get_bytes(f"{costs.RECORDS_PREFIX}{job.record_name}"))
        result.details.update(
            first_status=first_status,
            second_status=second_status,
            exit_after_notice_s=exit_after_notice_s,
            polls=polls,
            notice_reads=notice_reads,
            checkpoint=checkpoint,
            after_first=after_first,
            record=record,
            first_log=first.log(),
            second_log=second.log(),
        )
        return result
    finally:
        pool.close()


@pytest.mark.parametrize("backend", ["moto", "seaweedfs"])
def test_interruption_drill(backend, request):
    fixture = "interruption_drill" if backend == "moto" else "interruption_seaweedfs_drill"
    result = request.getfixturevalue(fixture)
    details = result.details
    assert details["first_status"] == 0, details["first_log"][-3000:]
    assert details["second_status"] == 0, details["second_log"][-3000:]
    assert details["notice_reads"] >= 1
    # The interrupted worker stored the song so far, but neither the song nor a claim.
    checkpoint = details["checkpoint"]
    assert 2 <= checkpoint.windows_done < 5
    assert checkpoint.generation_s > 0
    assert checkpoint.audio.shape[1] > 0
    after_first = details["after_first"]
    assert not after_first["song_stored"]
    assert after_first["claims"] == []
    assert after_first["report"]
    assert [summary["status"] for summary in after_first["run_summaries"]] == ["interrupted"]
    # Every step is in the log: the notice, the time left, the checkpoint, the report.
    first_log = details["first_log"]
    assert "spot interruption notice: terminate" in first_log
    assert re.search(r"interruption notice: \d+ s left", first_log)
    assert "saved checkpoint" in first_log
    assert "cost_report.csv (0 songs)" in first_log
    assert "finished generating" not in first_log
    # The second worker continued the song from the checkpoint, to the exact length.
    assert "resuming drone-" in details["second_log"]
    assert_complete(result)
    record = details["record"]
    assert record["attempts"] == 2
    assert record["generation_time_s"] > checkpoint.generation_s
    assert record["worker_id"] == "worker-resumed"
    assert list(details["report"]["generation_time_s"]) == [record["generation_time_s"]]


def _jobs(prompts: Path, model_dir: Path, window_s: float, context_s: float):
    job_file = read_job_file(
        prompts,
        model_id=str(model_dir),
        settings=GenerationSettings(window_s=window_s, context_s=context_s),
    )
    assert job_file.errors == []
    return job_file.jobs


EIGHT_JOBS = "".join(
    f"drill song {index} with {style} ; {seconds} ; song-{index}\n"
    for index, (style, seconds) in enumerate(
        [
            ("soft piano", 1.5),
            ("fast drums", 1),
            ("warm bass", 2.5),
            ("bright synths", 1),
            ("slow strings", 2),
            ("jazz trio", 1.5),
            ("ambient pads", 3),
            ("lofi beat", 1),
        ]
    )
)
SHORT_WINDOWS = ["--window-s", "2", "--context-s", "1"]


def _multi_worker_drill(tmp_path_factory, endpoint: str, backend: str, model_dir: Path):
    pool, root = _pool(tmp_path_factory, f"fleet-{backend}", endpoint)
    bucket = create_bucket(endpoint)
    output_uri = f"s3://{bucket}/fleet"
    store = s3_store(endpoint, bucket, "fleet/")
    prompts = root / "prompts.txt"
    prompts.write_text(EIGHT_JOBS, encoding="utf-8")
    jobs = _jobs(prompts, model_dir, 2.0, 1.0)
    try:
        # Two songs per batch, so that the three workers take turns at claiming songs.
        workers = [
            pool.start(
                f"worker-{index}",
                worker_args(
                    prompts,
                    output_uri,
                    model_dir,
                    f"worker-{index}",
                    *SHORT_WINDOWS,
                    "--batch-size",
                    "2",
                ),
            )
            for index in range(3)
        ]
        statuses = [worker.wait() for worker in workers]
        result = check_output(store, jobs, workers, f"three workers ({backend})")
        records = [
            json.loads(store.get_bytes(f"{costs.RECORDS_PREFIX}{job.record_name}")) for job in jobs
        ]
        stored_report = store.get_bytes(costs.COST_REPORT_KEY)
        # Each worker's view: the report it would write if it finished last.
        rebuilt = []
        for _ in workers:
            view = s3_store(endpoint, bucket, "fleet/")
            report, _failures = costs.rebuild_reports(view)
            rebuilt.append(view.get_bytes(costs.COST_REPORT_KEY))
        stored_by = {
            worker.name: sorted(STORED_PATTERN.findall(worker.log())) for worker in workers
        }
        result.details.update(
            statuses=statuses,
            records=records,
            stored_report=stored_report,
            rebuilt=rebuilt,
            stored_by=stored_by,
            logs={worker.name: worker.log() for worker in workers},
        )
        return result
    finally:
        pool.close()


@pytest.fixture(scope="module")
def fleet_moto_drill(tmp_path_factory, moto_server, tiny_model_dir):
    return _multi_worker_drill(tmp_path_factory, moto_server, "moto", tiny_model_dir)


@pytest.fixture(scope="module")
def fleet_seaweedfs_drill(tmp_path_factory, seaweedfs_server, tiny_model_dir):
    return _multi_worker_drill(tmp_path_factory, seaweedfs_server, "seaweedfs", tiny_model_dir)


@pytest.mark.parametrize("backend", ["moto", "seaweedfs"])
def test_three_workers_one_job_file(backend, request):
    result = request.getfixturevalue(f"fleet_{backend}_drill")
    details = result.details
    assert details["statuses"] == [0, 0, 0], details["logs"]
    assert_complete(result)
    # Each song was stored by one worker, and its record names that worker.
    stored_lines = details["stored_lines"]
    assert all(count == 1 for count in stored_lines.values()), stored_lines
    for record in details["records"]:
        owners = [
            name for name, keys in details["stored_by"].items() if record["output_key"] in keys
        ]
        assert owners == [record["worker_id"]]
        assert record["attempts"] == 1
    # The report is the same whichever worker rebuilds it last.
    assert details["rebuilt"] == [details["stored_report"]] * 3


KILL_JOBS = "".join(
    f"killed song {index} with {style} ; {seconds} ; kill-{index}\n"
    for index, (style, seconds) in enumerate(
        [
            ("soft piano", 14),
            ("fast drums", 9),
            ("warm bass", 16),
            ("bright synths", 8),
            ("slow strings", 12.5),
            ("ambient pads", 10.5),
        ]
    )
)
# 4 s windows with 1 s of context: 3 to 5 windows a song, 6 s or more of work in all
# for one worker on one core, so that each kill lands in the middle of a run.
KILL_WINDOWS = ["--window-s", "4", "--context-s", "1"]
# Kills before the clean rerun, each at a random moment of a run.
KILLS = 3
# Seconds after the model has loaded within which each kill lands.
KILL_WITHIN_S = (0.5, 3.0)
# Seconds a killed worker's claims last, so that the next worker may take them over soon.
KILL_CLAIM_TTL_S = 3.0


@pytest.fixture(scope="module")
def kill_drill(tmp_path_factory, tiny_model_dir):
    """SIGKILL a worker at random moments, then rerun it cleanly into a local folder."""
    pool, root = _pool(tmp_path_factory, "kill", None)
    output = root / "output"
    store = LocalStore(output)
    prompts = root / "prompts.txt"
    prompts.write_text(KILL_JOBS, encoding="utf-8")
    jobs = _jobs(prompts, tiny_model_dir, 4.0, 1.0)
    expected = {job.output_name: round(job.duration_s * SAMPLING_RATE) for job in jobs}
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    common = [
        *KILL_WINDOWS,
        "--batch-size",
        "2",
        "--checkpoint-every-s",
        "0",
        "--claim-ttl-s",
        str(KILL_CLAIM_TTL_S),
    ]
    kills = []
    try:
        for attempt in range(KILLS):
            wait_for_claims_to_expire(store, list(expected), KILL_CLAIM_TTL_S * 4)
            worker = pool.start(
                f"killed-{attempt}",
                worker_args(prompts, str(output), tiny_model_dir, f"killed-{attempt}", *common),
            )
            # Kill at a random moment once the model is loaded: while generating, saving
            # a checkpoint, storing a song or writing a record.
            wait_until(
                lambda worker=worker: "loaded " in worker.log() or worker.returncode() is not None,
                WORKER_TIMEOUT_S,
                "the model to load",
            )
            delay_s = rng.uniform(*KILL_WITHIN_S)
            time.sleep(delay_s)
            ran_to_end = worker.returncode() is not None
            worker.kill()
            # A song that counts as done is whole, whatever moment the kill hit.
            partial_songs = [
                key for key in song_keys(store) if wav_frames(store, key) != expected.get(key)
            ]
            kills.append(
                {
                    "delay_s": round(delay_s, 2),
                    "ran_to_end": ran_to_end,
                    "stored": len(song_keys(store)),
                    "partial_songs": partial_songs,
                }
            )
        wait_for_claims_to_expire(store, list(expected), KILL_CLAIM_TTL_S * 4)
        rerun = pool.start(
            "rerun",
            worker_args(prompts, str(output), tiny_model_dir, "rerun", *KILL_WINDOWS),
        )
        rerun_status = rerun.wait()
        result = check_output(store, jobs, pool.workers, "SIGKILL x3 + rerun (local)")
        result.details.update(
            seed=seed, kills=kills, rerun_status=rerun_status, rerun_log=rerun.log()
        )
        return result
    finally:
        pool.close()


def test_kill_drill(kill_drill):
    details = kill_drill.details
    assert details["rerun_status"] == 0, details["rerun_log"][-3000:]
    # At least one kill hit a worker in the middle of its run.
    assert not all(kill["ran_to_end"] for kill in details["kills"]), details["kills"]
    for kill in details["kills"]:
        assert kill["partial_songs"] == [], (details["seed"], kill)
    assert_complete(kill_drill)


def test_drill_summary(
    interruption_drill,
    interruption_seaweedfs_drill,
    kill_drill,
    fleet_moto_drill,
    fleet_seaweedfs_drill,
    capsys,
):
    results = [
        interruption_drill,
        interruption_seaweedfs_drill,
        kill_drill,
        fleet_moto_drill,
        fleet_seaweedfs_drill,
    ]
    header = (
        f"{'drill':<28} {'requested':>9} {'stored':>6} {'generated twice':>15} {'report rows':>11}"
    )
    lines = [header, *(result.row() for result in results)]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    for result in results:
        assert result.generated_twice == 0, result.name
        assert result.stored == result.requested, result.name
        assert result.report_rows == result.requested, result.name


# --- storage faults -------------------------------------------------------------------

FAULT_JOBS = "".join(
    f"faulty storage song {index} ; {seconds} ; faulty-{index}\n"
    for index, seconds in enumerate([1.5, 1, 2, 1])
)


def test_worker_through_flaky_s3(tmp_path, moto_server, tiny_model_dir):
    from test_storage_faults import FaultProxy

    pool = WorkerPool(tmp_path, worker_env(tmp_path / "spool", None))
    bucket = create_bucket(moto_server)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(FAULT_JOBS, encoding="utf-8")
    jobs = _jobs(prompts, tiny_model_dir, 2.0, 1.0)
    try:
        # Every fourth request to S3 fails: 500, 503 or a dropped connection.
        with FaultProxy(moto_server, every=4) as proxy:
            worker = pool.start(
                "flaky",
                worker_args(
                    prompts, f"s3://{bucket}/flaky", tiny_model_dir, "worker-flaky", *SHORT_WINDOWS
                ),
                {"AWS_ENDPOINT_URL": proxy.endpoint},
            )
            status = worker.wait()
            faults = list(proxy.faults)
    finally:
        pool.close()
    assert status == 0, worker.tail()
    assert len(faults) >= 5
    # Nothing lost: every song and record is stored, read past the proxy.
    result = check_output(s3_store(moto_server, bucket, "flaky/"), jobs, [worker], "flaky S3")
    assert_complete(result)
    # Every retry is logged, and counted at the end of the run.
    log = worker.log()
    assert log.count(": try 2 of 10") >= 1
    assert f"storage retries this run: {len(faults)} S3 request(s) retried by botocore" in log


def test_failed_upload_spooled_then_stored(tmp_path, moto_server, tiny_model, monkeypatch):
    import boto3
    from botocore.config import Config
    from test_storage_faults import FaultProxy

    from mgutil.worker import prepare_batch, run_batch

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    bucket = create_bucket(moto_server)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(FAULT_JOBS, encoding="utf-8")
    spool_dir = tmp_path / "spool"

    def plan_through(endpoint: str):
        # One try a request and two whole uploads, so that a failing upload gives up fast.
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
        )
        plan = prepare_batch(
            prompts_path=prompts,
            output_uri=f"s3://{bucket}/spooled",
            model_id=tiny_model.model_id,
            hourly_cost_usd=0.36,
            window_s=2.0,
            context_s=1.0,
            spool_dir=spool_dir,
            s3_client=client,
        )
        plan.store.upload_attempts = 2
        plan.store.upload_backoff_s = 0.01
        return plan

    def song_upload(method: str, path: str) -> bool:
        # Songs lie at the top of the prefix; claims/<song>.wav must get through.
        return method == "PUT" and re.search(r"/spooled/[^/?]+\.wav($|\?)", path) is not None

    # Every upload of a song fails; records, claims and reports still get through.
    with FaultProxy(moto_server, every=1, kinds=(503,), max_faults=100, match=song_upload) as proxy:
        first_plan = plan_through(proxy.endpoint)
        first = run_batch(first_plan, loaded=tiny_model, progress=False)
    names = sorted(job.output_name for job in first_plan.job_file.jobs)
    assert sorted(first.upload_failed) == names
    assert first.generated == []
    store = s3_store(moto_server, bucket, "spooled/")
    assert song_keys(store) == []
    assert sorted(entry.key for entry in first_plan.spool.entries()) == names
    failures = pd.read_csv(io.BytesIO(store.get_bytes(costs.FAILURES_KEY)))
    assert sorted(failures["s3_filename"]) == names
    assert set(failures["status"]) == {costs.STATUS_FAILED}
    assert set(failures["failure"]) == {costs.FAILURE_UPLOAD}
    assert store.list_keys(CLAIM_PREFIX) == []

    # The rerun uploads the spooled songs without loading the model.
    def refuse_to_load(model_id):
        raise AssertionError("the model must not load: every song waits in the spool")

    second_plan = plan_through(moto_server)
    second = run_batch(second_plan, progress=False, model_loader=refuse_to_load)
    assert sorted(second.from_spool) == names
    assert second.generated == []
    assert second_plan.spool.entries() == []
    for job in second_plan.job_file.jobs:
        assert wav_frames(store, job.output_name) == round(job.duration_s * SAMPLING_RATE)
        record = json.loads(store.get_bytes(f"{costs.RECORDS_PREFIX}{job.record_name}"))
        assert record["status"] == costs.STATUS_DONE
        assert record["run_id"] == first_plan.run_id
    report = pd.read_csv(io.BytesIO(store.get_bytes(costs.COST_REPORT_KEY)))
    assert sorted(report["s3_filename"]) == names
    failures = pd.read_csv(io.BytesIO(store.get_bytes(costs.FAILURES_KEY)))
    assert failures["resolved"].all()
