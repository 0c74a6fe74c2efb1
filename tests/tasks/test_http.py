"""The task routes over real HTTP: standalone (``task_app``) and under ``vlmtune serve``."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.tasks.fakes import WalkTask
from vlmtune.server import ServerThread
from vlmtune.server.auth import create_key
from vlmtune.tasks.episodes import LocalTaskClient
from vlmtune.tasks.http import HttpTaskClient, TaskAppThread
from vlmtune.tasks.protocol import EpisodeRequest, StepRequest, TaskClient, TaskError

KEY = "secret-key"


@pytest.fixture(scope="module")
def lamp_app() -> Iterator[TaskAppThread]:
    with TaskAppThread("lamp", api_key=KEY) as app:
        yield app


def _play(client: TaskClient, seeds: range, answers: list[str]) -> list[dict[str, Any]]:
    """Every start and step of a few episodes, as plain data (ids left out)."""
    pick = random.Random(0)
    seen: list[dict[str, Any]] = []
    for seed in seeds:
        ep = client.start(EpisodeRequest(seed=seed, image_only=seed % 2 == 1))
        seen.append(ep.model_dump(exclude={"episode_id"}))
        done = False
        while not done:
            result = client.step(ep.episode_id, StepRequest(completion=pick.choice(answers)))
            seen.append(result.model_dump())
            done = result.done
        client.close(ep.episode_id)
    return seen


def test_local_and_http_clients_agree(lamp_app: TaskAppThread) -> None:
    answers = ["red", "Blue.", "green or red", "yellow", "?"]
    with HttpTaskClient(lamp_app.url, api_key=KEY) as remote:
        assert remote.info() == LocalTaskClient("lamp").info()
        assert _play(remote, range(20), answers) == _play(
            LocalTaskClient("lamp"), range(20), answers
        )
    walk = ["left", "right", "noop", "both left and right"]
    with TaskAppThread(WalkTask) as app, HttpTaskClient(app.url) as remote:
        assert _play(remote, range(6), walk) == _play(LocalTaskClient(WalkTask), range(6), walk)


def test_refusals_carry_the_status_and_a_message(lamp_app: TaskAppThread) -> None:
    with HttpTaskClient(lamp_app.url, api_key=KEY) as client:
        with pytest.raises(TaskError, match="unknown episode 'nope'") as e:
            client.step("nope", StepRequest(action="red"))
        assert e.value.status == 404
        with pytest.raises(TaskError) as e:
            client.close("nope")
        assert e.value.status == 404
        ep = client.start(EpisodeRequest(seed=0))
        with pytest.raises(TaskError, match="allowed: red, green, blue, yellow") as e:
            client.step(ep.episode_id, StepRequest(action="purple"))
        assert e.value.status == 400
    with HttpTaskClient(lamp_app.url) as keyless, pytest.raises(TaskError) as e:
        keyless.info()
    assert e.value.status == 401
    with (
        HttpTaskClient("http://127.0.0.1:9", timeout_s=2) as nowhere,
        pytest.raises(TaskError) as e,
    ):
        nowhere.info()
    assert e.value.status == 0


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/episodes", {"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ("/episodes", {"seed": 2**64}, "seed: Input should be less than or equal to"),
        ("/episodes", {"seed": 0, "colour": "red"}, "colour"),
        ("/episodes", [1, 2], "must be a JSON object"),
        ("/episodes", b'{"seed": 0, "split": "\\ud800"}', "not valid Unicode"),
        ("/episodes/x/step", {}, "exactly one of completion or action"),
        ("/episodes/x/step", {"action": "red", "completion": "red"}, "exactly one"),
    ],
)
def test_bad_bodies_are_400_with_a_message(
    lamp_app: TaskAppThread, path: str, body: Any, message: str
) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    if isinstance(body, bytes):  # JSON httpx would refuse to encode
        r = httpx.post(lamp_app.url + path, content=body, headers=auth)
    else:
        r = httpx.post(lamp_app.url + path, json=body, headers=auth)
    assert r.status_code == 400 and message in r.json()["detail"]


def test_the_tasks_are_mounted_under_vlmtune_serve_behind_its_keys(tmp_path: Any) -> None:
    with ServerThread(tmp_path) as server:
        key = create_key(server.context.store, "tasks")
        base = server.url + "/tasks/lamp"
        assert httpx.get(base + "/info").status_code == 401
        assert (
            httpx.get(base + "/info", headers={"Authorization": "Bearer tml-bad_key"}).status_code
            == 401
        )
        with HttpTaskClient(base) as keyless, pytest.raises(TaskError) as e:
            keyless.start(EpisodeRequest(seed=0))
        assert e.value.status == 401
        with HttpTaskClient(base, api_key=key) as client:
            assert client.info().name == "lamp"
            answers = ["red", "blue", "no idea"]
            assert _play(client, range(4), answers) == _play(
                LocalTaskClient("lamp"), range(4), answers
            )
            with pytest.raises(TaskError) as e:
                client.step("nope", StepRequest(action="red"))
            assert e.value.status == 404
        r = httpx.post(base + "/episodes", json={"seed": "x"}, headers={"X-API-Key": key})
        assert r.status_code == 400 and "seed" in r.json()["detail"]
        paths = httpx.get(server.url + "/openapi.json", headers={"X-API-Key": key}).json()["paths"]
        assert "/tasks/lamp/episodes/{episode_id}/step" in paths


def test_concurrent_episodes_over_one_client(lamp_app: TaskAppThread) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def expert_episode(client: HttpTaskClient, seed: int) -> float:
        ep = client.start(EpisodeRequest(seed=seed))
        result = client.step(ep.episode_id, StepRequest(action=ep.expert_action))
        client.close(ep.episode_id)
        return result.reward

    with HttpTaskClient(lamp_app.url, api_key=KEY) as client, ThreadPoolExecutor(8) as pool:
        rewards = list(pool.map(lambda s: expert_episode(client, s), range(64)))
    assert rewards == [1.0] * 64
