"""optim_step's metrics leave a client's own ``step`` alone (tinker-cookbook merges them)."""

from __future__ import annotations

import tinker
from tinker import types as tt

from tests.conftest import assistant, image_part, user
from tests.server.test_tinker_client import MODEL, to_tinker
from vlmtune.render import datum_from_rendered
from vlmtune.sdk.http import local_renderer


def test_optim_step_reports_the_run_step_under_a_namespaced_int(server, key, api):
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    tc = service.create_lora_training_client(base_model=MODEL, rank=4, seed=0).result()
    limits = api.post(
        "/api/v1/image_token_count", json={"model_id": tc.model_id, "images": []}
    ).json()
    renderer = local_renderer(MODEL, limits["min_pixels"], limits["max_pixels"], 1)
    rendered = renderer.render([user(image_part(32, 32, seed=1), "Digit?"), assistant("1")])
    datum = to_tinker(datum_from_rendered(rendered, renderer.image_token_id))
    for step in (1, 2):
        tc.forward_backward([datum], "cross_entropy")
        optim = tc.optim_step(tt.AdamParams(learning_rate=1e-3)).result().metrics or {}
        assert "step" not in optim
        assert optim["vlmtune/step"] == step
        # what tinker-cookbook's loop does with them: its own counter survives, an int
        metrics: dict[str, float | int] = {"step": 10 + step}
        metrics.update(optim)
        assert metrics["step"] == 10 + step and isinstance(metrics["step"], int)
    raw = api.post(
        "/api/v1/optim_step",
        json={"model_id": tc.model_id, "adam_params": {"learning_rate": 1e-3}},
    ).json()
    result = {"type": "try_again"}
    while result.get("type") == "try_again":
        result = api.post("/api/v1/retrieve_future", json={"request_id": raw["request_id"]}).json()
    assert result["metrics"]["vlmtune/step"] == 3  # on the wire an int, not 3.0
    assert isinstance(result["metrics"]["vlmtune/step"], int)
    service.close("success").result()
