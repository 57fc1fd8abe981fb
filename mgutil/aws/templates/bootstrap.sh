#!/bin/bash
# MusicGen Batch worker bootstrap, rendered by mgutil.aws.bootstrap.render_user_data.
# cloud-init runs it once, as root, with neither HOME nor PATH set. It arms a hard
# runtime cap, installs uv, clones the pinned commit, syncs the environment, fetches the
# job file, runs notebooks/03_generate.ipynb with papermill, and on any exit uploads its
# log and the executed notebook to <output>/runs/<run id>/ before shutting down.
# The instance reaches S3 with its IAM role: this script holds no credentials.
set -euo pipefail

# Settings (each value is shell-quoted by the renderer).
RUN_ID=@@{RUN_ID}
REPO_URL=@@{REPO_URL}
REPO_COMMIT=@@{REPO_COMMIT}
WORK_DIR=@@{WORK_DIR}
HOME_DIR=@@{HOME_DIR}
OUTPUT_URI=@@{OUTPUT_URI}
RUNS_URI=@@{RUNS_URI}
JOBS_URI=@@{JOBS_URI}
MODEL_ID=@@{MODEL_ID}
REGION=@@{REGION}
PAPERMILL_PARAMETERS=@@{PAPERMILL_PARAMETERS}
MAX_RUNTIME_MINUTES=@@{MAX_RUNTIME_MINUTES}
HARD_CAP_COMMAND=@@{HARD_CAP_COMMAND}
AUTO_SHUTDOWN=@@{AUTO_SHUTDOWN}
SHUTDOWN_COMMAND=@@{SHUTDOWN_COMMAND}
UV_INSTALL_COMMAND=@@{UV_INSTALL_COMMAND}
LOG_FILE=@@{LOG_FILE}

export HOME="$HOME_DIR"
export PATH="$HOME/.local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export AWS_REGION="$REGION" AWS_DEFAULT_REGION="$REGION"
# Extra environment from the launcher (never credentials).
@@{EXTRA_ENV}
REPO_DIR="$WORK_DIR/repo"
RUN_DIR="$WORK_DIR/runs/$RUN_ID"
PROMPTS_FILE="$RUN_DIR/prompts.txt"
NOTEBOOK_OUT="$RUN_DIR/03_generate.ipynb"
UV_BIN=""
STEP="start"

mkdir -p "$RUN_DIR" "$(dirname "$LOG_FILE")"
# Everything from here on goes to the log file and to the console output.
exec > >(tee -a "$LOG_FILE") 2>&1
TEE_PID=$!

log() {
    printf '%s [musicgen-bootstrap] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"
}

# Copy one file between the local disk and S3 with boto3 alone, for when the clone or
# the sync failed: uv fetches boto3 into a throwaway environment.
STANDALONE_COPY='
import sys
import boto3
source, target = sys.argv[1], sys.argv[2]
s3 = boto3.client("s3")
if source.startswith("s3://"):
    bucket, key = source[5:].split("/", 1)
    s3.download_file(bucket, key, target)
else:
    bucket, key = target[5:].split("/", 1)
    s3.upload_file(source, bucket, key)
'

# Copy a local file to an s3:// URI, or an s3:// URI to a local file: with the synced
# environment's boto3, else the AWS CLI, else boto3 in a throwaway uv environment.
# Returns 1 when all of them fail.
transfer() {
    local source=$1 target=$2
    if [[ -n "$UV_BIN" && -x "$REPO_DIR/.venv/bin/python" ]]; then
        if (cd "$REPO_DIR" && "$UV_BIN" run --frozen --no-sync python -m mgutil.aws.bootstrap copy "$source" "$target"); then
            return 0
        fi
    fi
    if command -v aws >/dev/null 2>&1; then
        if aws s3 cp --only-show-errors "$source" "$target"; then
            return 0
        fi
    fi
    if [[ -n "$UV_BIN" ]]; then
        if "$UV_BIN" run --quiet --no-project --with boto3 python -c "$STANDALONE_COPY" "$source" "$target"; then
            return 0
        fi
    fi
    log "could not copy $source to $target: no synced environment, no AWS CLI, and uv could not run boto3"
    return 1
}

on_exit() {
    local code=$?
    set +e
    # Stop the tee, so the log file is complete before it is uploaded.
    exec >>"$LOG_FILE" 2>&1
    for _ in {1..50}; do
        kill -0 "$TEE_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [[ "$code" -eq 0 ]]; then
        log "finished: step $STEP succeeded"
    else
        log "FAILED with exit code $code during step: $STEP"
        printf 'exit_code=%s\nstep=%s\ntime=%s\n' "$code" "$STEP" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$RUN_DIR/FAILED"
        transfer "$RUN_DIR/FAILED" "$RUNS_URI/FAILED"
    fi
    if [[ -f "$NOTEBOOK_OUT" ]]; then
        transfer "$NOTEBOOK_OUT" "$RUNS_URI/03_generate.ipynb"
    fi
    transfer "$LOG_FILE" "$RUNS_URI/bootstrap.log"
    if [[ "$AUTO_SHUTDOWN" == "1" ]]; then
        log "auto_shutdown is on: running $SHUTDOWN_COMMAND"
        /bin/sh -c "$SHUTDOWN_COMMAND" </dev/null
    else
        log "auto_shutdown is off: the instance keeps running and billing until it is terminated"
    fi
    exit "$code"
}
trap on_exit EXIT
trap 'exit 143' TERM
trap 'exit 129' HUP

STEP="arm the hard runtime cap"
log "run $RUN_ID: arming a hard cap of $MAX_RUNTIME_MINUTES minute(s)"
/bin/sh -c "$HARD_CAP_COMMAND" </dev/null >>"$LOG_FILE" 2>&1

STEP="install uv"
if command -v uv >/dev/null 2>&1; then
    UV_BIN=$(command -v uv)
else
    log "uv is missing: installing it"
    /bin/sh -c "$UV_INSTALL_COMMAND"
    UV_BIN="$HOME/.local/bin/uv"
fi
log "uv: $UV_BIN ($("$UV_BIN" --version))"

STEP="clone $REPO_URL at $REPO_COMMIT"
rm -rf "$REPO_DIR"
git clone --quiet --no-checkout "$REPO_URL" "$REPO_DIR"
git -C "$REPO_DIR" checkout --quiet --detach "$REPO_COMMIT"
log "checked out $(git -C "$REPO_DIR" rev-parse HEAD)"

STEP="uv sync --frozen"
cd "$REPO_DIR"
# The dev group (test servers, browser driver) is not needed on a worker.
"$UV_BIN" sync --frozen --no-dev

STEP="fetch the job file $JOBS_URI"
transfer "$JOBS_URI" "$PROMPTS_FILE"

STEP="run notebooks/03_generate.ipynb"
export MUSICGEN_EC2_WORKER=1
export MUSICGEN_OUTPUT_URI="$OUTPUT_URI" MUSICGEN_MODEL="$MODEL_ID"
export HF_HOME="$WORK_DIR/hf-cache"
log "generating into $OUTPUT_URI with $MODEL_ID"
"$UV_BIN" run --frozen --no-sync papermill notebooks/03_generate.ipynb "$NOTEBOOK_OUT" \
    -k python3 --log-output -y "$PAPERMILL_PARAMETERS"
STEP="done"
