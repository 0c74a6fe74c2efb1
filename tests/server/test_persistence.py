"""A restart on the same data dir loses no run, checkpoint or finished job."""

from __future__ import annotations

import httpx
import numpy as np

from tests.conftest import assistant, user
from vlmtune.sdk import AdamParams, SamplingParams, ServiceClient
from vlmtune.server import ServerThread
from vlmtune.server.auth import create_key

MODEL = "tiny-qwen3-vl"


def test_restart_keeps_runs_checkpoints_and_jobs(tmp_path):
    data_dir = tmp_path / "data"
    with ServerThread(data_dir) as first:
        key = create_key(first.context.store)
        service = ServiceClient(base_url=first.url, api_key=key)
        tc = service.create_lora_training_client(MODEL, rank=4)
        datum = tc.datum_from_messages([user("say hi"), assistant("hi")])
        for _ in range(2):
            tc.forward_backward([datum])
            tc.optim_step(AdamParams(learning_rate=1e-2))
        state = tc.save_state("after-2", extra={"step": 2}).result()
        sampler_path = tc.save_weights_for_sampler("weights-2").result().path
        expected = tc.forward([datum]).result().loss_fn_outputs[0]["logprobs"].data
        # A job that is running when the server dies (its row, as the crash leaves it).
        first.context.store.add_job(
            "job-00000000beef", "toml", "crashed", "running", {"type": "sft", "overrides": []}
        )
        model_id = tc.model_id

    with ServerThread(data_dir) as second:
        headers = {"Authorization": f"Bearer {key}"}  # keys live in the database too
        runs = httpx.get(f"{second.url}/api/v1/training_runs", headers=headers).json()
        assert [r["training_run_id"] for r in runs["training_runs"]] == [model_id]
        assert runs["training_runs"][0]["last_checkpoint"]["tinker_path"] == state
        listed = httpx.get(
            f"{second.url}/api/v1/training_runs/{model_id}/checkpoints", headers=headers
        )
        assert {c["tinker_path"] for c in listed.json()["checkpoints"]} == {state, sampler_path}
        job = httpx.get(f"{second.url}/v1/jobs/job-00000000beef", headers=headers).json()
        assert job["state"] == "interrupted"

        # The run comes back lazily from its latest state, at the same weights and step.
        again = ServiceClient(base_url=second.url, api_key=key).training_client_for(model_id)
        assert again.get_info()["step"] == 2
        restored = again.forward([datum]).result().loss_fn_outputs[0]["logprobs"].data
        np.testing.assert_allclose(restored, expected, atol=1e-5)
        assert again.load_state(state).result() == {"step": 2}
        again.forward_backward([datum])
        metrics = again.optim_step(AdamParams(learning_rate=1e-2)).result().metrics
        assert metrics["vlmtune/step"] == 3 and "step" not in metrics

        sampler = ServiceClient(base_url=second.url, api_key=key).create_sampling_client(
            sampler_path
        )
        prompt = again.renderer.render_prompt([user("say hi")]).model_input
        assert sampler.sample(prompt, 1, SamplingParams(max_tokens=3)).result().sequences[0].tokens
