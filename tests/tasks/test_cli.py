"""`vlmtune tasks list` and `vlmtune tasks serve`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
from typer.testing import CliRunner

from vlmtune.cli import app
from vlmtune.tasks.http import HttpTaskClient
from vlmtune.tasks.protocol import EpisodeRequest, StepRequest
from vlmtune.tasks.registry import installed

runner = CliRunner()


def test_list_names_every_task_and_whether_it_is_installed() -> None:
    result = runner.invoke(app, ["tasks", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["lamp"]["installed"] and rows["lamp"]["actions"] == 4
    assert rows["crafter"]["installed"] == installed("crafter")
    if not installed("crafter"):
        assert rows["crafter"]["install"] == "pip install 'vlmtune[crafter]'"
    table = runner.invoke(app, ["tasks", "list"])
    assert table.exit_code == 0 and "lamp" in table.output


def test_serve_refuses_an_unknown_task() -> None:
    result = runner.invoke(app, ["tasks", "serve", "chess"])
    assert result.exit_code == 2
    assert "unknown task 'chess' (known: crafter, lamp)" in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_answers_the_protocol_behind_its_key() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmtune", "tasks", "serve", "lamp", "--port", str(port),
         "--api-key", "k1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "did not start"
            time.sleep(0.1)
        assert httpx.get(url + "/info").status_code == 401
        with HttpTaskClient(url, api_key="k1") as client:
            ep = client.start(EpisodeRequest(seed=0))
            result = client.step(ep.episode_id, StepRequest(action=ep.expert_action))
            assert result.reward == 1.0 and result.done
    finally:
        proc.terminate()
        proc.wait(timeout=30)
