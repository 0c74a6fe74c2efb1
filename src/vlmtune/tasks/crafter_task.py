"""``crafter``: the Crafter survival game (``pip install 'vlmtune[crafter]'``).

The prompt is the frame the game renders (local view plus inventory bar) and the
inventory as text; the answer is one of Crafter's 17 action names. A completion naming
none plays ``noop``. Each step reports the achievements it unlocked; the reward is
Crafter's own (+1 per new achievement, +-0.1 per health point gained or lost). Episodes
end when the player dies, or are truncated after ``info.max_steps``.

The module is named ``crafter_task`` so that ``import crafter`` still finds the game.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import crafter
import numpy as np

from vlmtune.tasks.common import frame_url, observation_prompt, one_action, split_seed
from vlmtune.tasks.crafter_expert import CrafterExpert, Observation
from vlmtune.tasks.protocol import Messages, StepOutcome, TaskInfo

ACTIONS: list[str] = list(crafter.constants.actions)
ACHIEVEMENTS: list[str] = list(crafter.constants.achievements)
VITALS = ("health", "food", "drink", "energy")
SYSTEM = (
    "You are playing Crafter, a 2D survival game seen from above. The image shows the area "
    "around you (you are in the centre) and your inventory at the bottom. Stay alive (keep "
    "health, food, drink and energy up), collect resources, craft tools and unlock "
    "achievements. Moving into an obstacle turns you to face it; 'do' collects or attacks "
    "what you face. Actions: " + ", ".join(ACTIONS) + ". Answer with one action name only."
)


def inventory_text(inventory: dict[str, int]) -> str:
    """``health 9, food 9, drink 9, energy 9; wood 2, sapling 1`` (items you hold only)."""
    vitals = ", ".join(f"{k} {inventory[k]}" for k in VITALS)
    items = ", ".join(f"{k} {v}" for k, v in inventory.items() if k not in VITALS and v > 0)
    return f"{vitals}; {items or 'no items'}"


class CrafterTask:
    """One Crafter episode; the class attributes set the world and frame size."""

    AREA: ClassVar[tuple[int, int]] = (64, 64)  # the world, in cells
    info: ClassVar[TaskInfo] = TaskInfo(
        name="crafter",
        description="the Crafter survival game: 17 actions, 22 achievements",
        actions=ACTIONS,
        max_steps=400,
        splits=["train", "test"],
        image_size=[64, 64],
        has_expert=True,
        achievements=ACHIEVEMENTS,
        invalid_action="noop",
    )

    def __init__(self) -> None:
        self.env: Any = None
        self.frame = ""
        self.unlocked: set[str] = set()
        self.expert_policy = CrafterExpert()

    def reset(self, seed: int, split: str) -> None:
        env_seed = int(np.random.SeedSequence(split_seed(seed, split)).generate_state(1)[0])
        # length=None: the episode layer truncates; Crafter only ends an episode on death.
        self.env = crafter.Env(
            area=self.AREA,
            size=tuple(self.info.image_size),
            length=None,
            seed=env_seed % (2**31 - 1),
        )
        # Rendering draws night noise from the world's RNG: each frame is rendered exactly
        # once (here and in ``step``), or replays would diverge.
        self.frame = frame_url(self.env.reset())
        self.unlocked = set()
        self.expert_policy = CrafterExpert()

    def prompt(self, image_only: bool) -> Messages:
        text = (
            f"Inventory: {inventory_text(self.env._player.inventory)}.\n"
            "What is your next action? Answer with one action name."
        )
        return observation_prompt(SYSTEM, self.frame, text, image_only)

    def parse(self, completion: str) -> str | None:
        # "Move left" is move_left: a model may write an action name's words with spaces.
        spaced = re.sub(r"[^a-z_ ]", "", completion.lower()).strip()
        if re.sub(r"[ _]+", "_", spaced) in ACTIONS:
            return re.sub(r"[ _]+", "_", spaced)
        return one_action(completion, ACTIONS)

    def step(self, action: str) -> StepOutcome:
        frame_H_W_3, reward, dead, info = self.env.step(ACTIONS.index(action))
        self.frame = frame_url(frame_H_W_3)
        new = sorted(k for k, n in info["achievements"].items() if n > 0 and k not in self.unlocked)
        self.unlocked.update(new)
        return StepOutcome(
            reward=float(reward),
            done=bool(dead),
            achievements=new,
            extra={"inventory": dict(info["inventory"])},
        )

    def expert(self) -> str | None:
        return self.expert_policy.act(self.observation())

    def observation(self) -> Observation:
        """What the frame and info show: the visible cells' semantic ids, the inventory,
        the unlocked achievements, and where the player stands and faces."""
        player = self.env._player
        view_W, view_H = self.env._local_view._grid  # the cells the frame shows
        x, y = (int(v) for v in player.pos)
        semantic = self.env._sem_view()
        # Cells outside the world show as 0 (Crafter draws them grey); x is the first axis.
        visible = np.zeros((view_W, view_H), dtype=np.int32)
        x0, y0 = x - view_W // 2, y - view_H // 2
        for i in range(view_W):
            for j in range(view_H):
                if 0 <= x0 + i < semantic.shape[0] and 0 <= y0 + j < semantic.shape[1]:
                    visible[i, j] = semantic[x0 + i, y0 + j]
        return Observation(
            visible=visible,
            inventory=dict(player.inventory),
            unlocked=set(self.unlocked),
            position=(x, y),
            facing=(int(player.facing[0]), int(player.facing[1])),
            sleeping=bool(player.sleeping),
            daylight=float(self.env._world.daylight),
        )
