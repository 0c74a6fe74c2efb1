"""The README's SDK loop runs as written and the loss falls."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_sdk_code() -> str:
    """The python block of the README's section "The Python SDK: training primitives"."""
    text = README.read_text()
    section = text[text.index("## The Python SDK") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_readme_code(code: str) -> tuple[dict, list[float]]:
    """Exec ``code``; its namespace and the losses it printed (``step loss`` lines)."""
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)
    return namespace, [float(line.split()[1]) for line in out.getvalue().splitlines()]


def test_readme_sdk_loop_runs_and_loss_falls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, losses = run_readme_code(readme_sdk_code())
    assert len(losses) == 5
    assert losses[-1] < 0.5 * losses[0], losses


# -- the "DPO and RL" section's commands run on a fresh clone --------------------------

ROOT = README.parent
DIGITS = ROOT / "examples" / "digits"


def section_commands(title: str) -> list[str]:
    """The command lines of the first code block under ``## {title}``, comments cut."""
    text = README.read_text()
    section = text[text.index(f"## {title}\n") :]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    lines = (line.split("  #")[0].strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def load_example(name: str):
    """An examples/digits script as a module (its output-file constants)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, DIGITS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def in_repo(path: str | Path) -> Path:
    """A path as written in a command (relative to the repo root, where it runs)."""
    return (ROOT / path).resolve()


def option(argv: list[str], flag: str, default: str | None = None) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else default


def command_io(argv: list[str]) -> tuple[set[Path], set[Path]]:
    """(paths the command reads, paths it writes) for the commands the section uses."""
    from vlmtune.config import load_job

    if argv[0] == "python":
        script = in_repo(argv[1])
        if script.name == "make_data.py":
            mod = load_example("make_data")
            out = in_repo(option(argv, "--out", mod.DEFAULT_OUT))
            return {script}, {out / f"{s}.jsonl" for s in mod.SPLITS}
        if script.name == "make_pref_data.py":
            mod = load_example("make_pref_data")
            data = in_repo(option(argv, "--data", mod.DEFAULT_DATA))
            reads = {script} | {data / f"{s}.jsonl" for s in mod.SPLITS}
            return reads, {data / f"{s}_{k}.jsonl" for s in mod.SPLITS for k in mod.KINDS}
        return {script}, set()  # e.g. run_dpo_rl.py: makes its own inputs
    assert argv[:2] == ["vlmtune", "train"], f"no rule for {' '.join(argv)}: add one"
    config = in_repo(option(argv, "--config"))
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    job = load_job(config, overrides, method=option(argv, "--type"))
    reads = {config, Path(job.job.data)}
    if job.job.validation_data:
        reads.add(Path(job.job.validation_data))
    if "/" in job.job.model:  # a directory (relative to where the command runs)
        reads.add(in_repo(job.job.model))
    name = job.job.name or config.stem
    run_dir = option(argv, "--output") or Path(job.job.output_dir) / name
    return reads, {in_repo(run_dir) / "final"}


def repo_files() -> set[Path]:
    """What a fresh clone has: tracked files and files git would add (not ignored ones,
    such as data or runs an earlier session left behind)."""
    import subprocess

    import pytest

    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return {in_repo(line) for line in out.splitlines()}


def test_readme_dpo_rl_commands_read_only_files_a_fresh_clone_has_or_makes():
    """Each command of "DPO and RL" reads files in the repo or written by an earlier one."""
    import shlex

    available = repo_files()
    commands = section_commands("DPO and RL")
    assert any("--type dpo" in c for c in commands) and any("--type rl" in c for c in commands)
    missing = []
    for command in commands:
        reads, writes = command_io(shlex.split(command))
        missing += [f"{command}: {p.relative_to(ROOT)}" for p in sorted(reads - available)]
        available |= writes
    assert not missing, "read before anything makes them:\n" + "\n".join(missing)
