"""The trace store: prompts back byte for byte, images once, several writer processes."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from typing import Any

import pytest

from tests.conftest import png_data_url
from tests.traces.fakes import fake_prompt
from tests.traces.store_worker import write_rollouts
from vlmtune.traces.store import SCHEMA_VERSION, Step, TraceStore, TraceStoreError


def _rollout(store: TraceStore, seed: int = 0, **kw) -> str:
    base = dict(task="counter", split="train", seed=seed, policy="p", model=None, image_only=False)
    return store.start_rollout(**{**base, **kw})


def test_prompt_round_trips_byte_for_byte_and_images_are_stored_once(tmp_path):
    image = png_data_url(16, 16, seed=1)
    odd = "data:image/png;base64," + image.split(",", 1)[1][:-4] + "===="  # not canonical
    prompts: list[list[dict[str, Any]]] = [
        fake_prompt(0, 0, image_only=False),  # system + image + text
        fake_prompt(0, 0, image_only=True),  # the same frame, image only
        [
            {"role": "system", "content": "Système: réponds « a ». "},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
                {"type": "image_url", "image_url": image},
                {"type": "image", "image": image},
                {"type": "image_url", "image_url": {"url": odd}},
                # the same bytes declared as another type: kept inline, still exact
                {"type": "image_url", "image_url": image.replace("image/png", "image/x-png", 1)},
                {"type": "image_url", "image_url": {"url": "sha256:not-one-of-ours"}},
                {"type": "text", "text": "two\nlines"},
            ]},
        ],
        # in a later step alone: the store already holds these bytes as image/png
        [{"role": "user", "content": [
            {"type": "image_url", "image_url": image.replace("image/png", "image/x-png", 1)},
        ]}],
    ]  # fmt: skip
    with TraceStore(tmp_path / "t.db") as store:
        rid = _rollout(store)
        for i, prompt in enumerate(prompts):
            store.add_step(Step(rid, i, prompt, "a", "a", True, 1.0, i == 3, "a", {"k": [1]}))
        store.finish_rollout(rid, episode_return=3.0, steps=4, success=True,
                             achievements=["x"], error=None)  # fmt: skip
        store.flush()
        steps = store.steps(rid)
        assert [json.dumps(s.prompt) for s in steps] == [json.dumps(p) for p in prompts]
        assert steps[0].prompt_hash != steps[1].prompt_hash  # image-only is another prompt
        # Two distinct frames: the fake frame and `image`; the non-canonical URL stays inline.
        assert store.counts() == {"rollouts": 1, "steps": 4, "images": 2}
        (rollout,) = store.rollouts()
        assert (rollout.episode_return, rollout.success, rollout.achievements) == (3.0, True, ["x"])
        assert steps[0].info == {"k": [1]} and steps[0].expert_action == "a"
    raw = sqlite3.connect(tmp_path / "t.db").execute("SELECT prompt FROM steps").fetchall()
    assert all("iVBOR" not in p for (p,) in raw[:2])  # base64 PNGs are not in the prompts


def test_equal_prompts_hash_equal_across_rollouts(tmp_path):
    with TraceStore(tmp_path / "t.db") as store:
        for seed in (0, 1):
            rid = _rollout(store, seed)
            store.add_step(Step(rid, 0, fake_prompt(7, 0, False), "a", "a", True, 1.0, True))
        store.flush()
        hashes = {s.prompt_hash for r in store.rollouts() for s in store.steps(r.id)}
    assert len(hashes) == 1


def test_a_failed_write_is_raised_by_flush_and_the_others_are_kept(tmp_path):
    with TraceStore(tmp_path / "t.db") as store:
        rid = _rollout(store)
        store.add_step(Step(rid, 0, fake_prompt(0, 0, False), "a", "a", True, 1.0, False))
        store.add_step(Step(rid, 0, fake_prompt(0, 1, False), "b", "b", True, 0.0, True))  # dup
        store.add_step(Step(rid, 1, fake_prompt(0, 1, False), "b", "b", True, 0.0, True))
        with pytest.raises(TraceStoreError, match="UNIQUE"):
            store.flush()
        assert [s.index for s in store.steps(rid)] == [0, 1]
        store._writer.error = None  # reported once; let close() finish quietly


def test_not_a_store_and_a_newer_schema_are_one_clear_error(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(TraceStoreError, match="junk.db"):
        TraceStore(junk)
    path = tmp_path / "t.db"
    TraceStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(TraceStoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        TraceStore(path)


def test_several_processes_write_one_store_at_once(tmp_path):
    """The hosted tool's store failed with "database is locked" at concurrency 2."""
    path = str(tmp_path / "shared.db")
    workers, rollouts, steps = 4, 100, 3
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [
        ctx.Process(target=write_rollouts, args=(path, w, rollouts, steps, go))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers  # a "locked" error would exit 1
    with TraceStore(path) as store:
        counts = store.counts()
        finished = [r for r in store.rollouts() if r.ended is not None and r.steps == steps]
        seed = finished[-1].seed
        one = store.steps(finished[-1].id)
    assert counts == {
        "rollouts": workers * rollouts,
        "steps": workers * rollouts * steps,
        "images": 5 * steps,  # every process wrote the same 15 frames: stored once each
    }
    assert len(finished) == workers * rollouts
    expected = [fake_prompt(seed % 1000 % 5, i, False) for i in range(steps)]
    assert [json.dumps(s.prompt) for s in one] == [json.dumps(p) for p in expected]
