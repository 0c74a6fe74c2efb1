"""The README's SDK loop against ``vlmtune serve``: the README's own text, with only the
``connect()`` line pointed at the server (and the loop 10x shorter, to stay fast)."""

from __future__ import annotations

import re

from tests.test_readme import readme_sdk_code, run_readme_code
from vlmtune.sdk import TrainingClient
from vlmtune.sdk.http import HttpTrainingClient

SHRINK = 10  # a remote step takes ~0.5 s on CPU; 100 of them would dominate the suite


def remote_variant(code: str, url: str, key: str) -> str:
    """``code`` on the server at ``url``, its loop and print interval divided by ``SHRINK``.

    Each pattern must occur exactly once, so a README edit that moves them fails here
    rather than silently testing something else."""
    subs = [
        (r"connect\(\)", lambda _: f"connect({url!r}, api_key={key!r})"),
        (r"range\((\d+)\)", lambda m: f"range({int(m[1]) // SHRINK})"),
        (r"step % (\d+)", lambda m: f"step % {max(int(m[1]) // SHRINK, 1)}"),
    ]
    for pattern, replace in subs:
        code, n = re.subn(pattern, replace, code)
        assert n == 1, f"README SDK block: expected one {pattern!r}, found {n}"
    return code


def test_readme_sdk_loop_over_http(server, key, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = readme_sdk_code()
    remote, losses = run_readme_code(remote_variant(code, server.url, key))
    assert isinstance(remote["tc"], HttpTrainingClient)
    assert len(losses) == 5
    assert losses[-1] < 0.5 * losses[0], losses

    # The README's setup (everything before the loss function) run in-process builds
    # the very same datum: tokens, weights and chunks.
    local, _ = run_readme_code(code[: code.index("\ndef ")])
    assert isinstance(local["tc"], TrainingClient)
    assert remote["datum"] == local["datum"]
