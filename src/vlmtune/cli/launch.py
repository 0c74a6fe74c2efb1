"""`vlmtune train` on several processes: it starts torchrun itself, so a user keeps one command.

One node: ``python -m torch.distributed.run --standalone --nproc-per-node N -m vlmtune
train ...`` with ``VLMTUNE_LAUNCHED=1``, so the children train instead of launching
again. Several nodes: the command every node must run is printed (same rendezvous
endpoint and id, its own ``--node-rank``), and this machine runs node 0's.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vlmtune.engine.distributed import ENV_LAUNCHED

RDZV_PORT = 29500


@dataclass(frozen=True)
class LaunchPlan:
    nproc_per_node: int
    nodes: int
    child_args: tuple[str, ...]  # `vlmtune` arguments of each process
    run_id: str = "vlmtune"
    endpoint: str | None = None  # host:port of the rendezvous (several nodes)

    def command(self, node_rank: int = 0, python: str = sys.executable) -> list[str]:
        """The launcher command line of node ``node_rank``."""
        cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(self.nproc_per_node)]
        if self.nodes == 1:
            # --standalone: a private rendezvous on a free local port (no clashes with
            # other runs on the machine).
            cmd.append("--standalone")
        else:
            cmd += [
                f"--nnodes={self.nodes}",
                f"--node-rank={node_rank}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.endpoint}",
                f"--rdzv-id={self.run_id}",
            ]
        return [*cmd, "-m", "vlmtune", *self.child_args]

    def shell_line(self, node_rank: int) -> str:
        cmd = self.command(node_rank, python="python")
        return f"{ENV_LAUNCHED}=1 " + shlex.join(cmd)


def train_child_args(
    config: Path,
    type_: str,
    output: Path | None,
    resume: bool,
    overrides: Sequence[str],
) -> tuple[str, ...]:
    """The `vlmtune train` arguments a child repeats (paths made absolute: nodes differ)."""
    args = ["train", "--type", type_, "--config", str(config.resolve())]
    if output is not None:
        args += ["--output", str(output.resolve())]
    if resume:
        args.append("--resume")
    return (*args, *overrides)


def make_plan(
    nproc_per_node: int, nodes: int, child_args: tuple[str, ...], name: str
) -> LaunchPlan:
    endpoint = None
    if nodes > 1:
        host = os.environ.get("MASTER_ADDR") or socket.getfqdn()
        endpoint = f"{host}:{os.environ.get('MASTER_PORT', RDZV_PORT)}"
    return LaunchPlan(nproc_per_node, nodes, child_args, run_id=name, endpoint=endpoint)


def run(plan: LaunchPlan) -> int:
    """Run this node's launcher (node 0) and wait; returns its exit status."""
    env = dict(os.environ)
    env[ENV_LAUNCHED] = "1"
    # N processes on one host's cores: without this each would start a thread per core.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.nproc_per_node)))
    return subprocess.run(plan.command(0), env=env, check=False).returncode
