"""The Launch panel: its callbacks without a browser, then for real in JupyterLab.

The browser test starts JupyterLab on 127.0.0.1 with the moto endpoint in its
environment (the kernel inherits it), drives Debian's Chromium headless with
Playwright, runs every cell, ticks the box, clicks Launch, and finds the request in the
moto server.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import nbformat
import pytest

from mgutil.aws.widgets import ConfirmPanel
from tests.conftest import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
TAG = "musicgen-batch-worker"


def test_panel_button_needs_tick():
    calls = []
    panel = ConfirmPanel(
        "t", [("a", 1)], "bills", "I understand", "Launch", lambda: calls.append(1)
    )
    assert panel.button.disabled
    panel.button.click()
    assert calls == []
    panel.checkbox.value = True
    assert not panel.button.disabled
    panel.button.click()
    assert calls == [1] and panel.button.disabled and panel.checkbox.disabled

    def broken():
        raise RuntimeError("no capacity")

    failing = ConfirmPanel("t", [], "bills", "ok", "Launch", broken)
    failing.checkbox.value = True
    failing.button.click()
    assert isinstance(failing.error, RuntimeError)
    # After an error the box is cleared, so the user can fix the cause and try again.
    assert failing.checkbox.value is False and failing.button.disabled


def _tagged_instances(ec2):
    found = ec2.describe_instances(
        Filters=[
            {"Name": "tag:Name", "Values": [TAG]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
    )
    return [i for r in found["Reservations"] for i in r["Instances"]]


def _wait_for_server(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer at {url.split('?')[0]}")


def test_jupyterlab_launch_click(aws, s3_bucket, monkeypatch, tmp_path):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")

    boto3.client("iam").create_instance_profile(InstanceProfileName="musicgen-worker")
    image = boto3.client("ec2").describe_images(Owners=["amazon"])["Images"][0]
    monkeypatch.setenv("AMI_ID", image["ImageId"])
    monkeypatch.setenv("MUSICGEN_OUTPUT_URI", f"s3://{s3_bucket}/songs")
    monkeypatch.setenv("REPO_URL", "https://git.example.com/musicgen-batch.git")
    monkeypatch.setenv("REPO_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("calm piano ; 20 ; piano\n")
    notebook_dir = tmp_path / "lab"
    notebook_dir.mkdir()
    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "02_launch.ipynb", as_version=4)
    (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    parameters.source += (
        f"\nprompts_path = {str(prompts)!r}\nartifacts_dir = {str(tmp_path / 'art')!r}"
        "\npoll_interval_s = 0.2\n"
    )
    nbformat.write(notebook, notebook_dir / "02_launch.ipynb")

    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip", "127.0.0.1",
        "--port", str(port), f"--ServerApp.token={token}", "--notebook-dir", str(notebook_dir),
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
        # CI containers often run as root; the server still listens on 127.0.0.1 only.
        "--allow-root",
    ]  # fmt: skip
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    env["JUPYTER_CONFIG_DIR"] = str(tmp_path / "config")
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(tmp_path / "workspaces")
    log = (tmp_path / "lab.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    ec2 = boto3.client("ec2")
    try:
        deadline = time.monotonic() + 90
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_for_server(f"{base}/api/status?token={token}", deadline)
        except TimeoutError:
            log.flush()
            pytest.fail((tmp_path / "lab.log").read_text()[-3000:])
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run",
                ],
            )  # fmt: skip
            try:
                page = browser.new_page()
                page.set_default_timeout(45_000)
                page.goto(f"{base}/lab/tree/02_launch.ipynb?token={token}")
                page.wait_for_function(
                    "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                    " && window.jupyterapp.shell.currentWidget.sessionContext"
                    " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                    " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                )
                page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
                panel = page.locator(".musicgen-confirm-panel").first
                panel.wait_for(state="visible")
                button = panel.get_by_role("button", name="Launch")
                assert button.is_disabled()
                # Running all cells launched nothing.
                assert _tagged_instances(ec2) == []
                panel.get_by_role("checkbox").check()
                page.wait_for_function(
                    "() => [...document.querySelectorAll('.musicgen-confirm-panel button')]"
                    ".some(b => b.textContent.includes('Launch') && !b.disabled)"
                )
                button.click()
                found = []
                while not found and time.monotonic() < deadline:
                    found = _tagged_instances(ec2)
                    time.sleep(0.5)
                assert len(found) == 1, "no tagged instance appeared after clicking Launch"
                assert found[0]["InstanceLifecycle"] == "spot"
                panel.get_by_text("running").first.wait_for()
            finally:
                browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    shutil.rmtree(tmp_path / "runtime", ignore_errors=True)
