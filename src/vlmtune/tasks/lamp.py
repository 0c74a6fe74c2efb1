"""``lamp``: the tiny, fast task for tests and the demo.

A 64x64 frame shows a coloured lamp on a grey background; the answer is the button of
the lamp's colour (one of four). One step per episode, reward 1 when the button matches,
else 0, so a random policy succeeds about 1 time in 4 and the expert always does. The
seed picks the colour and also the lamp's position, size, exact shade and the background,
so a model has to look at the colour rather than memorise pixels.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from PIL import Image, ImageDraw

from vlmtune.tasks.common import frame_url, observation_prompt, one_action, split_seed
from vlmtune.tasks.protocol import Messages, StepOutcome, TaskInfo

SIZE = 64
# Each button's lamp colour (RGB); a seed jitters each channel by up to JITTER.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 185, 60),
    "blue": (45, 80, 220),
    "yellow": (230, 210, 45),
}
JITTER = 20
SYSTEM = (
    "You see a lamp and a panel of four buttons: red, green, blue and yellow. "
    "Press the button of the lamp's colour. Answer with the button's name only."
)
QUESTION = "Which button do you press? Answer red, green, blue or yellow."


def draw_lamp(colour_rgb: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """The frame (H, W, 3): a lamp (a disc on a dark stand) on a grey background."""
    shade = int(rng.integers(40, 150))
    img = Image.new("RGB", (SIZE, SIZE), (shade, shade, shade + int(rng.integers(-8, 9))))
    draw = ImageDraw.Draw(img)
    radius = int(rng.integers(15, 22))
    cx = int(rng.integers(radius + 2, SIZE - radius - 2))
    cy = int(rng.integers(radius + 2, SIZE - radius - 14))
    draw.rectangle((cx - 2, cy + radius, cx + 2, cy + radius + 10), fill=(25, 25, 25))
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour_rgb)
    return np.asarray(img)


class LampTask:
    """One lamp episode (see the module docstring)."""

    info: ClassVar[TaskInfo] = TaskInfo(
        name="lamp",
        description="press the button matching a lamp's colour (4 buttons, 1 step)",
        actions=list(COLOURS),
        max_steps=1,
        splits=["train", "test"],
        image_size=[SIZE, SIZE],
        has_expert=True,
        success_threshold=1.0,
    )

    def __init__(self) -> None:
        self.colour = ""
        self.image = ""

    def reset(self, seed: int, split: str) -> None:
        rng = np.random.default_rng(split_seed(seed, split))
        self.colour = self.info.actions[int(rng.integers(len(self.info.actions)))]
        jitter = rng.integers(-JITTER, JITTER + 1, size=3)
        rgb = np.clip(np.array(COLOURS[self.colour]) + jitter, 0, 255)
        self.image = frame_url(draw_lamp((int(rgb[0]), int(rgb[1]), int(rgb[2])), rng))

    def prompt(self, image_only: bool) -> Messages:
        return observation_prompt(SYSTEM, self.image, QUESTION, image_only)

    def parse(self, completion: str) -> str | None:
        return one_action(completion, self.info.actions)

    def step(self, action: str) -> StepOutcome:
        return StepOutcome(reward=1.0 if action == self.colour else 0.0, done=True)

    def expert(self) -> str | None:
        return self.colour
