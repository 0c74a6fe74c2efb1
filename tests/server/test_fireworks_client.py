"""The official Fireworks training client (fireworks-ai 1.2.30), unchanged, against vlmtune.

It runs the guide's snippet (examples/fireworks/vlm_sft.py: shape, trainer job, 20
steps of a custom loss on a datum with a real image chunk, save, promote) in a
subprocess: the client pins pydantic<2.13, so it lives in its own folder
(``make test`` builds .cache/fireworks-client) on that process's PYTHONPATH only.
Only FIREWORKS_BASE_URL and FIREWORKS_API_KEY point it here; the server maps the
hosted model name to the tiny model (``--model-alias``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from vlmtune.models.tiny import tiny_model_dir
from vlmtune.server import ServerThread
from vlmtune.server.auth import create_key, fireworks_spelling

REPO = Path(__file__).resolve().parents[2]
CLIENT_DIR = REPO / ".cache" / "fireworks-client"
EXAMPLE = REPO / "examples" / "fireworks" / "vlm_sft.py"
HOSTED_8B = "accounts/fireworks/models/qwen3-vl-8b-instruct"
TENANT = "fw-guide"

pytestmark = pytest.mark.skipif(
    not (CLIENT_DIR / "fireworks").is_dir(),
    reason=f"the Fireworks client is not cached in {CLIENT_DIR} (`make test` builds it; "
    "or run `make .cache/fireworks-client/installed`)",
)


def red_square() -> str:
    """The example's default picture, as a data URL."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (220, 20, 20)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, str]]:
    aliases = {HOSTED_8B: "tiny-qwen3-vl"}
    srv = ServerThread(tmp_path_factory.mktemp("fw-client"), model_aliases=aliases).start()
    key = create_key(srv.context.store, "fireworks client", tenant=TENANT)
    yield srv, fireworks_spelling(key)
    srv.stop()


def test_the_guides_snippet_trains_saves_promotes_and_the_model_answers(served):
    srv, key = served
    env = {**os.environ, "PYTHONPATH": str(CLIENT_DIR), "FIREWORKS_API_KEY": key,
           "FIREWORKS_BASE_URL": srv.url}  # fmt: skip
    args = ["--steps", "20", "--learning-rate", "1e-4", "--output-model", "fw-guide-model",
            "--processor", str(tiny_model_dir())]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), *args], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.rsplit("RESULT ", 1)[1])
    losses = result["losses"]
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5])
    # The job ran on the guide's shape, its checkpoint is listed, and deleting the
    # trainer (the example's last step) kept both.
    job = srv.context.store.job(result["job_id"])
    assert job["state"] == "deleted" and job["tenant"] == TENANT
    assert job["config"]["profile"]["shape_id"] == "qwen3-vl-8b-65k"
    (row,) = result["checkpoints"]
    assert row["name"].endswith(f"/checkpoints/{result['snapshot']}") and row["promotable"]
    model = result["model"]
    assert model["name"] == f"accounts/{TENANT}/models/fw-guide-model"
    assert model["state"] == "READY" and model["kind"] == "HF_BASE_MODEL"
    # The promoted model, named by its resource name, answers about the image as taught.
    content = [{"type": "image_url", "image_url": {"url": red_square()}},
               {"type": "text", "text": "What color is this picture?"}]  # fmt: skip
    chat = httpx.post(
        f"{srv.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": model["name"],
            "max_tokens": 4,
            "temperature": 0,
            "messages": [{"role": "user", "content": content}],
        },  # fmt: skip
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
    assert "red" in chat.json()["choices"][0]["message"]["content"]
