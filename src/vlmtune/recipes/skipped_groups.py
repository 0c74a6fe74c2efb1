"""RL's skipped-group warning: most groups with equal rewards means no learning signal.

A group whose rewards are all equal has zero advantage and is skipped (``rl.py``). A
few are normal; most, step after step, mean the run is learning little, and what to
try depends on whether those groups all fail or all succeed.
"""

from __future__ import annotations

from collections import Counter, deque

from vlmtune.config import RLConfig

# A run warns when over SKIP_WARNING_FRACTION of the groups of its last
# SKIP_WARNING_WINDOW steps were skipped. Not at half: a healthy digits run (top_k 10)
# skips 31-88% of its groups per step, more as its accuracy grows (10-step means up to
# 0.68), while the failures this catches (temperature 0, a reward nothing earns, a
# model that always gives the same answer) skip nearly all.
SKIP_WARNING_FRACTION = 0.75
SKIP_WARNING_WINDOW = 10


class SkippedGroups:
    """The skipped groups of the last ``window`` steps: ``add`` returns a warning when
    over ``SKIP_WARNING_FRACTION`` of their groups were, at most once per window."""

    def __init__(self, window: int) -> None:
        self.window = window
        # per step: (each skipped group's common reward, number of groups)
        self.recent: deque[tuple[list[float], int]] = deque(maxlen=window)
        self.steps_since_warning = 0

    def add(self, skipped_rewards: list[float], n_groups: int, rl: RLConfig) -> str | None:
        self.recent.append((skipped_rewards, n_groups))
        self.steps_since_warning += 1
        if len(self.recent) < self.window or self.steps_since_warning < self.window:
            return None
        skipped = [r for rewards, _ in self.recent for r in rewards]
        groups = sum(n for _, n in self.recent)
        if len(skipped) <= SKIP_WARNING_FRACTION * groups:
            return None
        self.steps_since_warning = 0
        return skip_warning(skipped, groups, len(self.recent), rl)


def skip_warning(skipped_rewards: list[float], groups: int, steps: int, rl: RLConfig) -> str:
    """What to try when most groups carry no signal. Their rewards are shown: all-fail
    and all-succeed groups call for easier and harder prompts respectively."""
    counts = Counter(round(r, 4) for r in skipped_rewards).most_common(3)
    shown = ", ".join(f"{n} at {r:g}" for r, n in counts)
    top_k = "all" if rl.top_k == -1 else rl.top_k
    return (
        f"{len(skipped_rewards)}/{groups} groups of the last {steps} steps were skipped "
        f"(all rewards of a group equal, nothing to learn; {shown}). Try more diverse "
        f"samples (a higher rl.temperature, now {rl.temperature:g}, or rl.top_k, now "
        f"{top_k}), a larger rl.group_size (now {rl.group_size}), or prompts the model "
        "sometimes gets right: easier ones (or an SFT warm-up) if the groups all fail, "
        "harder ones if they all succeed"
    )
