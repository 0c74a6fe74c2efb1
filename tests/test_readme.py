"""The README's SDK loop runs as written and the loss falls."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_sdk_loop_runs_and_loss_falls(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## The Python SDK") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    losses = [float(line.split()[1]) for line in out.getvalue().splitlines()]
    assert len(losses) == 5
    assert losses[-1] < 0.5 * losses[0], losses
