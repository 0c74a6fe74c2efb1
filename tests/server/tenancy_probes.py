"""The two-tenant probes of every route, the data ``test_tenancy.py`` walks.

``PROBES`` names, for each route that takes an id, B's requests for A's objects and the
status an unknown id gets; ``LISTS`` are the routes that list (each tenant sees its own);
``OWNS_NOTHING`` are the routes that reach no tenant's object, each with the reason.
Together they must name every route of the app (``test_every_route_is_classified``).
"""

from __future__ import annotations

from typing import Any

from tests.server.test_jobs import JOB

MODEL = "tiny-qwen3-vl"
PROMPT = {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}
DATUM = {
    "model_input": PROMPT,
    "loss_fn_inputs": {
        "target_tokens": {"data": [2, 3, 4], "dtype": "int64"},
        "weights": {"data": [1.0, 1.0, 1.0], "dtype": "float32"},
    },
}
FB = {"data": [DATUM], "loss_fn": "cross_entropy"}
FILE_JOB = JOB.replace('data = "train.jsonl"', 'data = "{file}"')  # reads an upload

# The tasks `vlmtune serve` mounts (crafter is in the dev extra), each with an action.
TASKS = {"lamp": "red", "crafter": "noop"}

# Made-up ids shaped like A's: B asking for A's object must be answered as for these.
_FAKE_SESSION = "sess-0000000000000000"
_FAKE_RUN = f"{_FAKE_SESSION}:train:0"
UNKNOWN = {
    "session": _FAKE_SESSION,
    "run": _FAKE_RUN,
    "job": "job-000000000000",
    "toml_job": "job-000000000001",
    "state_path": f"tinker://{_FAKE_RUN}/weights/st",
    "sampler_path": f"tinker://{_FAKE_RUN}/sampler_weights/samp",
    "snapshot": "samp-0000000000000000",
    "path_session": "samp-0000000000000001",
    "model": "tenancy-nobody-model",
    "request": "req-" + "0" * 32,
    "sample_request": "req-" + "1" * 32,
    "file": "file-" + "0" * 24,
    "account": "tenancy-nobody",
    "deployment": "tenancy-nodep",
    "lamp_episode": "0" * 24,
    "crafter_episode": "1" * 24,
}
# A deployment named as the hot-load routes name it (a header, not the path).
_A_DEPLOYMENT = {"fireworks-deployment": "accounts/{account}/deployments/{deployment}"}
_B_DEPLOYMENT = {"fireworks-deployment": "accounts/{b_account}/deployments/{deployment}"}
_COMPLETION = {"prompt": [1, 2], "max_tokens": 1}

# (route method, route path) -> B's requests on it: (method, url, JSON body, status that
# an unknown id gets[, headers]). {name} is one of A's ids (UNKNOWN's keys); {b_*} are B's.
Probe = tuple[str, str, Any, int] | tuple[str, str, Any, int, dict[str, str]]
PROBES: dict[tuple[str, str], list[Probe]] = {
    ("POST", "/api/v1/create_model"): [
        ("POST", "/api/v1/create_model",
         {"session_id": "{session}", "model_seq_id": 7, "base_model": MODEL,
          "lora_config": {"rank": 4}}, 404),
    ],
    ("POST", "/api/v1/get_info"): [
        ("POST", "/api/v1/get_info", {"model_id": "{run}"}, 404),
        # A's trainer endpoint is A's, whatever B asks of it.
        ("POST", "/trainer/{job}/api/v1/get_info", {"model_id": "{b_run}"}, 404),
    ],
    ("POST", "/api/v1/forward_backward"): [
        ("POST", "/api/v1/forward_backward",
         {"model_id": "{run}", "forward_backward_input": FB}, 404),
    ],
    ("POST", "/api/v1/forward"): [
        ("POST", "/api/v1/forward", {"model_id": "{run}", "forward_backward_input": FB}, 404),
    ],
    ("POST", "/api/v1/forward_reference"): [
        ("POST", "/api/v1/forward_reference",
         {"model_id": "{run}", "forward_backward_input": FB}, 404),
    ],
    ("POST", "/api/v1/optim_step"): [
        ("POST", "/api/v1/optim_step", {"model_id": "{run}"}, 404),
    ],
    ("POST", "/api/v1/save_weights"): [
        ("POST", "/api/v1/save_weights", {"model_id": "{run}", "path": "b-was-here"}, 404),
    ],
    ("POST", "/api/v1/load_weights"): [
        ("POST", "/api/v1/load_weights", {"model_id": "{run}", "path": "st"}, 404),
        # B's own run may not load A's state, nor a new run in B's session be made from it,
        ("POST", "/api/v1/load_weights", {"model_id": "{b_run}", "path": "{state_path}"}, 404),
        ("POST", "/api/v1/load_weights",
         {"session_id": "{b_session}", "model_seq_id": 9, "path": "{state_path}"}, 404),
        # nor a run be made in A's session.
        ("POST", "/api/v1/load_weights",
         {"session_id": "{session}", "model_seq_id": 9, "path": "{state_path}"}, 404),
    ],
    # A trainer job's resumable states, by the job's endpoint or by one of its runs.
    ("GET", "/api/v1/list_checkpoints"): [
        ("GET", "/trainer/{job}/api/v1/list_checkpoints", None, 404),
        ("GET", "/api/v1/list_checkpoints?model_id={run}", None, 404),
    ],
    ("POST", "/api/v1/save_weights_for_sampler"): [
        ("POST", "/api/v1/save_weights_for_sampler", {"model_id": "{run}", "path": "b"}, 404),
        ("POST", "/api/v1/save_weights_for_sampler", {"model_id": "{run}"}, 404),
    ],
    ("POST", "/api/v1/asample"): [
        ("POST", "/api/v1/asample", {"sampling_session_id": "{snapshot}", "prompt": PROMPT}, 404),
        ("POST", "/api/v1/asample",
         {"sampling_session_id": "{path_session}", "prompt": PROMPT}, 404),
        ("POST", "/api/v1/asample", {"model_path": "{sampler_path}", "prompt": PROMPT}, 404),
    ],
    ("POST", "/api/v1/retrieve_future"): [
        ("POST", "/api/v1/retrieve_future", {"request_id": "{request}"}, 404),
        ("POST", "/api/v1/retrieve_future", {"request_id": "{sample_request}"}, 404),
    ],
    # Fire and forget (the tinker client sends it and moves on): an unknown request is a
    # no-op 200, and so is another tenant's (A's request is not cancelled: checked below).
    ("POST", "/api/v1/cancel_future"): [
        ("POST", "/api/v1/cancel_future", {"request_id": "{request}"}, 200),
    ],
    ("POST", "/api/v1/session_heartbeat"): [
        ("POST", "/api/v1/session_heartbeat", {"session_id": "{session}"}, 404),
    ],
    # As cancel_future: the client finishes its session on close, a no-op for unknown ones.
    ("POST", "/api/v1/sessions/{session_id}/finish"): [
        ("POST", "/api/v1/sessions/{session}/finish", {}, 200),
    ],
    ("POST", "/api/v1/create_sampling_session"): [
        ("POST", "/api/v1/create_sampling_session", {"model_path": "{sampler_path}"}, 404),
        ("POST", "/trainer/{job}/api/v1/create_sampling_session", {"base_model": MODEL}, 404),
    ],
    ("GET", "/api/v1/samplers/{sampler_id}"): [
        ("GET", "/api/v1/samplers/{snapshot}", None, 404),
        ("GET", "/api/v1/samplers/{path_session}", None, 404),
    ],
    ("GET", "/api/v1/training_runs/{run_id}"): [
        ("GET", "/api/v1/training_runs/{run}", None, 404),
    ],
    ("GET", "/api/v1/training_runs/{run_id}/checkpoints"): [
        ("GET", "/api/v1/training_runs/{run}/checkpoints", None, 404),
    ],
    ("POST", "/api/v1/unload_model"): [
        ("POST", "/api/v1/unload_model", {"model_id": "{run}"}, 404),
    ],
    ("POST", "/api/v1/image_token_count"): [
        ("POST", "/api/v1/image_token_count",
         {"model_id": "{run}", "images": [{"width": 32, "height": 32}]}, 404),
    ],
    ("POST", "/v1/image_token_count"): [
        ("POST", "/v1/image_token_count",
         {"model_id": "{run}", "images": [{"width": 32, "height": 32}]}, 404),
    ],
    ("GET", "/v1/jobs/{job_id}"): [
        ("GET", "/v1/jobs/{job}", None, 404),
        ("GET", "/v1/jobs/{toml_job}", None, 404),
    ],
    ("GET", "/v1/jobs/{job_id}/events"): [
        ("GET", "/v1/jobs/{job}/events", None, 404),
    ],
    ("POST", "/v1/jobs/{job_id}/cancel"): [
        ("POST", "/v1/jobs/{toml_job}/cancel", {}, 404),
    ],
    ("POST", "/v1/jobs/{job_id}/resume"): [
        ("POST", "/v1/jobs/{toml_job}/resume", {}, 404),
    ],
    ("DELETE", "/v1/jobs/{job_id}"): [
        ("DELETE", "/v1/jobs/{job}", None, 404),
    ],
    ("POST", "/v1/jobs/{job_id}/promote"): [
        ("POST", "/v1/jobs/{job}/promote",
         {"checkpoint_id": "{sampler_path}", "output_model_id": "tenancy-b-steal"}, 404),
    ],
    # A TOML job's report page and the link a browser opens it by (tests/report/).
    ("GET", "/v1/jobs/{job_id}/report"): [
        ("GET", "/v1/jobs/{toml_job}/report", None, 404),
        ("GET", "/v1/jobs/{job}/report", None, 404),
    ],
    ("GET", "/v1/jobs/{job_id}/report_link"): [
        ("GET", "/v1/jobs/{toml_job}/report_link", None, 404),
    ],
    # A run's report page (its recorded optim_steps) and its link.
    ("GET", "/api/v1/training_runs/{run_id}/report"): [
        ("GET", "/api/v1/training_runs/{run}/report", None, 404),
    ],
    ("GET", "/api/v1/training_runs/{run_id}/report_link"): [
        ("GET", "/api/v1/training_runs/{run}/report_link", None, 404),
    ],
    ("GET", "/v1/files/{file_id}"): [
        ("GET", "/v1/files/{file}", None, 404),
    ],
    ("DELETE", "/v1/files/{file_id}"): [
        ("DELETE", "/v1/files/{file}", None, 404),
    ],
    # A TOML job of B's may not read A's upload: refused as naming an unknown one.
    ("POST", "/v1/jobs"): [
        ("POST", "/v1/jobs", {"config_toml": FILE_JOB, "type": "sft"}, 400),
    ],
    ("POST", "/v1/chat/completions"): [
        ("POST", "/v1/chat/completions",
         {"model": "{model}", "messages": [{"role": "user", "content": "hi"}]}, 404),
        ("POST", "/v1/chat/completions",
         {"model": "{sampler_path}", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ],
    # Deployments: A's account is unknown to B, and so is A's deployment in B's account.
    ("POST", "/v1/accounts/{account}/deployments"): [
        ("POST", "/v1/accounts/{account}/deployments?deploymentId=b-dep2",
         {"baseModel": MODEL}, 404),
    ],
    ("GET", "/v1/accounts/{account}/deployments/{deployment_id}"): [
        ("GET", "/v1/accounts/{account}/deployments/{deployment}", None, 404),
        ("GET", "/v1/accounts/{b_account}/deployments/{deployment}", None, 404),
    ],
    ("PATCH", "/v1/accounts/{account}/deployments/{deployment_id}"): [
        ("PATCH", "/v1/accounts/{account}/deployments/{deployment}",
         {"maxReplicaCount": 0, "minReplicaCount": 0}, 404),
        ("PATCH", "/v1/accounts/{b_account}/deployments/{deployment}"
         "?updateMask=hot_load_trainer_job", {"hotLoadTrainerJob": "{b_account}-job"}, 404),
    ],
    ("DELETE", "/v1/accounts/{account}/deployments/{deployment_id}"): [
        ("DELETE", "/v1/accounts/{account}/deployments/{deployment}", None, 404),
        ("DELETE", "/v1/accounts/{b_account}/deployments/{deployment}", None, 404),
    ],
    ("POST", "/hot_load/v1/models/hot_load"): [
        ("POST", "/hot_load/v1/models/hot_load", {"identity": "samp"}, 404, _A_DEPLOYMENT),
        ("POST", "/hot_load/v1/models/hot_load", {"identity": "samp"}, 404, _B_DEPLOYMENT),
        # B's own deployment may not load A's checkpoint.
        ("POST", "/hot_load/v1/models/hot_load", {"identity": "{sampler_path}"}, 404,
         {"fireworks-deployment": "accounts/{b_account}/deployments/{b_deployment}"}),
    ],
    ("GET", "/hot_load/v1/models/hot_load"): [
        ("GET", "/hot_load/v1/models/hot_load", None, 404, _A_DEPLOYMENT),
        ("GET", "/hot_load/v1/models/hot_load", None, 404, _B_DEPLOYMENT),
    ],
    ("POST", "/inference/v1/completions"): [
        ("POST", "/inference/v1/completions",
         {"model": "accounts/{account}/deployments/{deployment}", **_COMPLETION}, 404),
        ("POST", "/inference/v1/completions",
         {"model": "accounts/{b_account}/deployments/{deployment}", **_COMPLETION}, 404),
    ],
    # The Fireworks control plane: A's account is unknown to B, and so are A's trainer
    # job (the trainer job above), its gateway and its promoted model in B's own account.
    ("POST", "/v1/accounts/{account}/rlorTrainerJobs"): [
        ("POST", "/v1/accounts/{account}/rlorTrainerJobs?rlorTrainerJobId=b-job",
         {"trainingConfig": {"baseModel": MODEL, "loraRank": 4}}, 404),
    ],
    ("GET", "/v1/accounts/{account}/rlorTrainerJobs/{job_id}"): [
        ("GET", "/v1/accounts/{account}/rlorTrainerJobs/{job}", None, 404),
        ("GET", "/v1/accounts/{b_account}/rlorTrainerJobs/{job}", None, 404),
        ("POST", "/training/v1/rlorTrainerJobs/{account}/{job}/api/v1/get_info",
         {"model_id": "{b_run}"}, 404),
        ("GET", "/training/v1/rlorTrainerJobs/{b_account}/{job}/api/v1/healthz", None, 404),
    ],
    ("DELETE", "/v1/accounts/{account}/rlorTrainerJobs/{job_id}"): [
        ("DELETE", "/v1/accounts/{account}/rlorTrainerJobs/{job}", None, 404),
        ("DELETE", "/v1/accounts/{b_account}/rlorTrainerJobs/{job}", None, 404),
    ],
    ("POST", "/v1/accounts/{account}/rlorTrainerJobs/{job_id}:cancel"): [
        ("POST", "/v1/accounts/{b_account}/rlorTrainerJobs/{job}:cancel", None, 404),
    ],
    ("POST", "/v1/accounts/{account}/rlorTrainerJobs/{job_id}:resume"): [
        ("POST", "/v1/accounts/{b_account}/rlorTrainerJobs/{job}%3Aresume", None, 404),
    ],
    ("GET", "/v1/accounts/{account}/rlorTrainerJobs/{job_id}/checkpoints"): [
        ("GET", "/v1/accounts/{account}/rlorTrainerJobs/{job}/checkpoints", None, 404),
        ("GET", "/v1/accounts/{b_account}/rlorTrainerJobs/{job}/checkpoints", None, 404),
    ],
    ("POST", "/v1/accounts/{account}/checkpoints/{checkpoint}:promote"): [
        ("POST", "/v1/accounts/{b_account}/checkpoints/samp:promote",
         {"output_model": "accounts/{b_account}/models/tenancy-b-steal",
          "trainer_job_id": "accounts/{b_account}/rlorTrainerJobs/{job}"}, 404),
        ("POST", "/v1/accounts/{account}/checkpoints/samp:promote",
         {"output_model": "accounts/{account}/models/tenancy-b-steal",
          "trainer_job_id": "accounts/{account}/rlorTrainerJobs/{job}"}, 404),
    ],
    ("GET", "/v1/accounts/{account}/models/{model}"): [
        ("GET", "/v1/accounts/{account}/models/{model}", None, 404),
        ("GET", "/v1/accounts/{b_account}/models/{model}", None, 404),
    ],
    # The hosted trainer's CLI (server/synth.py): A's upload and TOML job, by its routes.
    ("GET", "/api/files/{file_id}"): [("GET", "/api/files/{file}", None, 404)],
    ("GET", "/api/learning/files/{file_id}"): [("GET", "/api/learning/files/{file}", None, 404)],
    ("POST", "/api/learning/jobs"): [
        ("POST", "/api/learning/jobs",
         {"model": MODEL, "training_file_id": "{file}", "hyperparameters": {"n_epochs": 1}}, 400),
    ],
    ("POST", "/api/learning/jobs/{job_id}/start"): [
        ("POST", "/api/learning/jobs/{toml_job}/start", {}, 404),
    ],
    ("GET", "/api/learning/jobs/{job_id}"): [("GET", "/api/learning/jobs/{toml_job}", None, 404)],
    ("GET", "/api/learning/jobs/{job_id}/events"): [
        ("GET", "/api/learning/jobs/{toml_job}/events", None, 404),
    ],
    ("GET", "/api/learning/jobs/{job_id}/metrics"): [
        ("GET", "/api/learning/jobs/{toml_job}/metrics", None, 404),
    ],
    ("GET", "/api/learning/jobs/{job_id}/timeline"): [
        ("GET", "/api/learning/jobs/{toml_job}/timeline", None, 404),
    ],
}  # fmt: skip

# Task apps mounted at /tasks/{name}/... (tasks/http.py): A's open episode of each task.
for _task in TASKS:
    PROBES[("POST", f"/tasks/{_task}/episodes/{{episode_id}}/step")] = [
        (
            "POST",
            f"/tasks/{_task}/episodes/{{{_task}_episode}}/step",
            {"action": TASKS[_task]},
            404,
        ),
    ]
    PROBES[("DELETE", f"/tasks/{_task}/episodes/{{episode_id}}")] = [
        ("DELETE", f"/tasks/{_task}/episodes/{{{_task}_episode}}", None, 404),
    ]

# List routes: each tenant sees its own objects only (test_lists_show_only_own_objects).
LISTS = {
    ("GET", "/api/v1/training_runs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/models"),
    ("GET", "/v1/files"),
    ("GET", "/v1/accounts/{account}/rlorTrainerJobs"),  # test_fireworks_control
}

# Routes that reach no tenant's object, and why.
OWNS_NOTHING = {
    ("GET", "/healthz"): "public health probe",
    ("GET", "/v1/health"): "public health probe",
    ("GET", "/api/v1/healthz"): "public health probe",
    ("GET", "/openapi.json"): "the API's schema",
    ("POST", "/api/v1/client/config"): "fixed client feature flags",
    ("POST", "/api/v1/client/dynamic_config"): "fixed client settings",
    ("POST", "/api/v1/telemetry"): "accepted and dropped",
    ("GET", "/api/v1/get_server_capabilities"): "the base models on this machine",
    ("GET", "/v1/training_profiles/{shape_id}"): "the server's training shapes",
    ("POST", "/api/v1/create_session"): "makes a session of the caller's own tenant",
    ("POST", "/v1/jobs/trainer"): "makes a job of the caller's own tenant",
    ("POST", "/v1/files"): "makes a file of the caller's own tenant",
    ("POST", "/api/files"): "makes a file of the caller's own tenant",
    ("POST", "/api/learning/files"): "makes a file of the caller's own tenant",
    ("GET", "/v1/accounts/{account}/deploymentShapes/{shape}/versions"): "the server's shapes",
    ("GET", "/v1/accounts/{account}/deploymentShapes/{shape}/versions/{version}"): "ditto",
    ("GET", "/v1/accounts"): "the caller's own account",
    ("GET", "/v1/accounts/{account}/trainingShapes/{shape}/versions"): "the server's shapes",
    ("GET", "/v1/accounts/{account}/trainingShapes/{shape}/versions/{version}"): "ditto",
    **{("GET", f"/tasks/{t}/info"): "the task's description" for t in TASKS},
    **{
        ("POST", f"/tasks/{t}/episodes"): "starts an episode of the caller's own tenant"
        for t in TASKS
    },
}
