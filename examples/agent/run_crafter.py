"""Crafter, end to end with the same commands as the lamp demo (`make agent-demo-crafter`).

1. `vlmtune collect` plays Crafter with the task's scripted expert and with random play;
2. `vlmtune filter` turns the expert's traces into SFT rows;
3. `vlmtune train` fine-tunes the built-in tiny Qwen3-VL on them;
4. `vlmtune collect` plays a few episodes with the fine-tuned model, sampled in-process.

Prints the expert's and random play's achievements side by side, and the fine-tuned
model's share of valid actions. On a CPU the tiny model learns the answer format (100%
valid actions), not Crafter's skills: that takes a real Qwen3-VL checkpoint and a GPU.
Needs `pip install 'vlmtune[crafter]'`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_demo import HERE, ROOT, VLMTUNE, sh  # noqa: E402 (the lamp demo's helpers)

RUN = ROOT / "runs" / "agent-crafter"
STORE = RUN / "traces.db"
EPISODES = 8
MODEL_EPISODES = 2


def collect(*args: str) -> dict:
    out = sh([*VLMTUNE, "collect", "--task", "crafter", "--store", str(STORE), "--json", *args])
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    t0 = time.time()
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    n = ["--episodes", str(EPISODES), "--concurrency", "4"]
    expert = collect("--policy", "expert", *n)
    random = collect("--policy", "random", *n)
    sh([*VLMTUNE, "filter", "--store", str(STORE), "--to", "sft", "--policy", "expert",
        "--output", str(RUN / "sft.jsonl")])  # fmt: skip
    sh([*VLMTUNE, "train", "--type", "sft", "--config", str(HERE / "crafter_sft.toml"),
        "--output", str(RUN / "sft-run")])  # fmt: skip
    tuned = collect("--policy", str(RUN / "sft-run" / "final"), "--episodes",
                    str(MODEL_EPISODES), "--concurrency", str(MODEL_EPISODES),
                    "--seed-start", "1000", "--temperature", "0", "--max-tokens", "6")  # fmt: skip

    rates = sorted(set(expert["achievement_rates"]) | set(random["achievement_rates"]))
    print()
    print("=" * 64)
    print(f"  Crafter, {EPISODES} episodes each: achievements per episode")
    print(f"    scripted expert  {expert['mean_achievements']:5.1f}   "
          f"({expert['frames_per_s']:.0f} frames/s)")  # fmt: skip
    print(f"    random play      {random['mean_achievements']:5.1f}   "
          f"({random['frames_per_s']:.0f} frames/s)")  # fmt: skip
    print("    share of episodes unlocking each achievement (expert / random):")
    for name in rates:
        e = expert["achievement_rates"].get(name, 0.0)
        r = random["achievement_rates"].get(name, 0.0)
        print(f"      {name:22s} {e:5.0%} / {r:5.0%}")
    print(f"  fine-tuned tiny model ({MODEL_EPISODES} episodes): "
          f"{tuned['valid_action_share']:.0%} valid actions, "
          f"{tuned['mean_achievements']:.1f} achievements per episode, "
          f"{tuned['frames_per_s']:.1f} frames/s")  # fmt: skip
    print(f"  total time: {(time.time() - t0) / 60:.1f} min   traces: {STORE}")
    print("=" * 64)


if __name__ == "__main__":
    main()
