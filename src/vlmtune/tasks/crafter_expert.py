"""A scripted Crafter expert that sees only what the player sees.

Its input (``Observation``) is the frame's content: the semantic ids of the cells the
frame shows around the player, the inventory (drawn in the frame's bottom bar), the
achievements unlocked so far (reported in each step's info), the player's position and
facing (its sprite's direction). It never reads the world beyond the view.

Each step it takes the first of: keep sleeping; fight an adjacent zombie; sleep when
tired (once early, while the day is safe, for the wake-up achievement); drink or eat when
low; craft what a nearby table allows; place a stone, table, furnace or sapling when it
can; otherwise walk to the nearest visible target its needs name (trees for wood, stone
and coal once it has a pickaxe, water, a cow, a table), or explore. It remembers the
cells it has seen, so when thirsty with no water in view it walks back to water it saw.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass

import crafter
import numpy as np

# Semantic ids, as Crafter numbers them: 0 is outside the world, then the materials,
# then the object types in the order ``crafter.Env`` registers them.
NAMES: list[str] = [
    "none",
    *crafter.constants.materials,
    "player",
    "cow",
    "zombie",
    "skeleton",
    "arrow",
    "plant",
]
WALKABLE = frozenset(crafter.constants.walkable)
MOVES = {(-1, 0): "move_left", (1, 0): "move_right", (0, -1): "move_up", (0, 1): "move_down"}
TOOLS = ("wood_pickaxe", "wood_sword", "stone_pickaxe", "stone_sword")
MAKE = crafter.constants.make
PLACE = crafter.constants.place
LOW = 4  # a vital at or below this sends the expert to water or a cow
DARK = 0.35  # daylight below this is night: zombies spawn on grass, so dig into stone
TIRED = 2  # energy at or below this: sleep
HEADING_STEPS = 12  # explore in one direction at most this long before reconsidering
RECALL_CELLS = 3000  # how far (cells searched) a walk back to remembered water may look
CREATURES = frozenset({"player", "cow", "zombie", "skeleton", "arrow", "plant"})


@dataclass
class Observation:
    visible: np.ndarray  # (W, H) semantic ids of the shown cells; the player at the centre
    inventory: dict[str, int]
    unlocked: set[str]
    position: tuple[int, int]
    facing: tuple[int, int]
    sleeping: bool
    daylight: float  # 1 day .. 0 night: how bright the frame is drawn


class CrafterExpert:
    """One episode's expert (it remembers where it walked, to explore somewhere new)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.visits: Counter[tuple[int, int]] = Counter()
        self.heading = (0, 1)
        self.heading_steps = 0
        self.seen: dict[tuple[int, int], str] = {}  # world cell -> material last seen there

    def act(self, obs: Observation) -> str:
        self.visits[obs.position] += 1
        view = _View(obs)
        self._remember(view, obs.position)
        inv = obs.inventory
        if obs.sleeping:
            return "noop"
        zombie = view.adjacent("zombie")
        if zombie is not None:
            return view.face_and("do", zombie)
        if inv["energy"] <= TIRED or ("wake_up" not in obs.unlocked and inv["energy"] < 9):
            return "sleep"
        action = self._craft_or_place(view, inv, obs.unlocked)
        if action is not None:
            return action
        for targets in self._wanted(view, inv, obs.unlocked, obs.daylight < DARK):
            action = view.go_and_do(targets)
            if action is not None:
                return action
        if inv["drink"] <= LOW:
            step = self._recall("water", obs.position)
            if step is not None:
                return MOVES[step]
        if "collect_sapling" not in obs.unlocked and view.ahead() == "grass":
            return "do"  # grass gives a sapling one time in ten
        return self._explore(view, obs.position)

    def _remember(self, view: _View, position: tuple[int, int]) -> None:
        x0, y0 = position[0] - view.centre[0], position[1] - view.centre[1]
        for i in range(view.W):
            for j in range(view.H):
                name = str(view.names[i, j])
                if name != "none":  # creatures stand on walkable ground, and move on
                    self.seen[(x0 + i, y0 + j)] = "grass" if name in CREATURES else name

    def _recall(self, target: str, position: tuple[int, int]) -> tuple[int, int] | None:
        """First move of a shortest walk over remembered cells to one next to ``target``."""
        first: dict[tuple[int, int], tuple[int, int] | None] = {position: None}
        queue = deque([position])
        while queue and len(first) < RECALL_CELLS:
            cell = queue.popleft()
            for d in MOVES:
                nxt = (cell[0] + d[0], cell[1] + d[1])
                if nxt in first:
                    continue
                name = self.seen.get(nxt)
                if name == target and cell != position:
                    return first[cell]
                if name in WALKABLE:
                    first[nxt] = d if cell == position else first[cell]
                    queue.append(nxt)
        return None

    def _craft_or_place(self, view: _View, inv: dict[str, int], unlocked: set[str]) -> str | None:
        near = view.near()
        for tool in TOOLS:
            spec = MAKE[tool]
            if inv[tool] == 0 and _has(inv, spec["uses"]) and set(spec["nearby"]) <= near:
                return f"make_{tool}"
        ahead, free = view.ahead(), view.ahead_free()
        missing_tools = [t for t in TOOLS if inv[t] == 0]
        if (
            "place_furnace" not in unlocked
            and _has(inv, PLACE["furnace"]["uses"])
            and "table" in near
            and free
            and ahead in PLACE["furnace"]["where"]
        ):
            return "place_furnace"
        # The first stone goes to a pickaxe, unless the tools are all made.
        spare_stone = inv["stone"] >= 2 or (inv["stone"] >= 1 and not missing_tools)
        if (
            "place_stone" not in unlocked
            and spare_stone
            and free
            and ahead in PLACE["stone"]["where"]
        ):
            return "place_stone"
        if (
            missing_tools
            and "table" not in view.seen()
            and inv["wood"] >= PLACE["table"]["uses"]["wood"] + 1
            and free
            and ahead in PLACE["table"]["where"]
        ):
            return "place_table"
        if "place_plant" not in unlocked and inv["sapling"] >= 1 and free and ahead == "grass":
            return "place_plant"
        return None

    def _wanted(
        self, view: _View, inv: dict[str, int], unlocked: set[str], dark: bool
    ) -> list[frozenset[str]]:
        """Target kinds to walk to and 'do', most urgent first."""
        wanted: list[frozenset[str]] = []
        if inv["drink"] <= LOW:
            wanted.append(frozenset({"water"}))
        if inv["food"] <= LOW:
            wanted.append(frozenset({"cow"}))
        if dark and inv["wood_pickaxe"]:
            wanted.append(frozenset({"stone"}))  # mining digs a shelter zombies cannot reach
        missing = [t for t in TOOLS if inv[t] == 0]
        wood_needed = sum(MAKE[t]["uses"].get("wood", 0) for t in missing)
        if missing and "table" not in view.seen():
            wood_needed += PLACE["table"]["uses"]["wood"]
        stone_needed = sum(MAKE[t]["uses"].get("stone", 0) for t in missing)
        if "place_furnace" not in unlocked:
            stone_needed += PLACE["furnace"]["uses"]["stone"]
        if "place_stone" not in unlocked:
            stone_needed += 1
        table_helps = any(_has(inv, MAKE[t]["uses"]) for t in missing) or (
            "place_furnace" not in unlocked and _has(inv, PLACE["furnace"]["uses"])
        )
        if table_helps:
            wanted.append(frozenset({"table"}))
        if inv["wood_pickaxe"] and inv["coal"] == 0:
            wanted.append(frozenset({"coal"}))
        if inv["wood"] < min(wood_needed, 9):
            wanted.append(frozenset({"tree"}))
        if inv["wood_pickaxe"] and inv["stone"] < min(stone_needed, 9):
            wanted.append(frozenset({"stone"}))
        if "collect_drink" not in unlocked or inv["drink"] < 7:
            wanted.append(frozenset({"water"}))
        if "eat_cow" not in unlocked or inv["food"] < 7:
            wanted.append(frozenset({"cow"}))
        if "defeat_zombie" not in unlocked and inv["health"] >= 7 and not dark:
            wanted.append(frozenset({"zombie"}))
        if inv["wood"] < 9:
            wanted.append(frozenset({"tree"}))
        return wanted

    def _explore(self, view: _View, position: tuple[int, int]) -> str:
        """Keep a heading while the way is open; then turn toward the least-visited cell."""
        self.heading_steps += 1
        if view.walkable(self.heading) and self.heading_steps < HEADING_STEPS:
            return MOVES[self.heading]
        options = [d for d in MOVES if view.walkable(d)] or list(MOVES)
        self.rng.shuffle(options)
        self.heading = min(
            options, key=lambda d: self.visits[(position[0] + d[0], position[1] + d[1])]
        )
        self.heading_steps = 0
        return MOVES[self.heading]


def _has(inventory: dict[str, int], uses: dict[str, int]) -> bool:
    return all(inventory[k] >= v for k, v in uses.items())


class _View:
    """The visible cells by name, with the player at the centre."""

    def __init__(self, obs: Observation) -> None:
        self.names = np.asarray(NAMES, dtype=object)[obs.visible]
        self.W, self.H = self.names.shape
        self.centre = (self.W // 2, self.H // 2)
        self.facing = obs.facing

    def at(self, offset: tuple[int, int]) -> str:
        x, y = self.centre[0] + offset[0], self.centre[1] + offset[1]
        return str(self.names[x, y]) if 0 <= x < self.W and 0 <= y < self.H else "none"

    def seen(self) -> set[str]:
        return {str(n) for n in self.names.flat}

    def near(self) -> set[str]:
        """What Crafter counts as nearby for crafting: the 3x3 cells around the player."""
        return {self.at((dx, dy)) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}

    def ahead(self) -> str:
        return self.at(self.facing)

    def ahead_free(self) -> bool:
        """The faced cell holds no creature or plant (placing needs an empty cell)."""
        return self.ahead() not in ("player", "cow", "zombie", "skeleton", "arrow", "plant")

    def walkable(self, direction: tuple[int, int]) -> bool:
        return self.at(direction) in WALKABLE

    def adjacent(self, name: str) -> tuple[int, int] | None:
        for d in MOVES:
            if self.at(d) == name:
                return d
        return None

    def face_and(self, action: str, direction: tuple[int, int]) -> str:
        """``action`` if the player faces ``direction``, else the move that turns it there
        (the neighbour is not walkable, so the move only turns)."""
        return action if self.facing == direction else MOVES[direction]

    def go_and_do(self, targets: frozenset[str]) -> str | None:
        """The next action toward the nearest reachable visible target, 'do' once facing
        it; None when no target is visible and reachable."""
        for d in MOVES:
            if self.at(d) in targets:
                return self.face_and("do", d)
        first_step = self._path_start(targets)
        return None if first_step is None else MOVES[first_step]

    def _path_start(self, targets: frozenset[str]) -> tuple[int, int] | None:
        """First move of a shortest walk (over walkable cells, never lava) to a cell next
        to a target."""
        start = (0, 0)
        first: dict[tuple[int, int], tuple[int, int] | None] = {start: None}
        queue = deque([start])
        while queue:
            cell = queue.popleft()
            for d in MOVES:
                nxt = (cell[0] + d[0], cell[1] + d[1])
                if nxt in first:
                    continue
                name = self.at(nxt)
                if name in targets and cell != start:
                    return first[cell]
                if name in WALKABLE:
                    first[nxt] = d if cell == start else first[cell]
                    queue.append(nxt)
        return None
