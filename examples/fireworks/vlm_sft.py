"""The Fireworks training guide's VLM snippet, whole, with a real image in the datum.

Written for the official client (``pip install "fireworks-ai[training]"``) and run
unchanged against the hosted service or a local ``vlmtune serve``: only
``FIREWORKS_BASE_URL`` and ``FIREWORKS_API_KEY`` differ. See README.md here.

    FIREWORKS_BASE_URL=http://127.0.0.1:8000 FIREWORKS_API_KEY=fw_... \\
        python examples/fireworks/vlm_sft.py --processor ~/.cache/vlmtune/tiny-qwen3-vl-v2

It trains the base model to answer "red" about a red picture: the datum is one user
turn holding an image chunk (PNG bytes, sent as an image, never as placeholder tokens)
and a question, then the assistant's answer, whose tokens alone carry loss weight.
The last line it prints is ``RESULT {json}`` (losses, checkpoint, model) for scripts.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import time
import warnings

import httpx
import torch
from fireworks.training.sdk import (
    AdamParams,
    FiretitanServiceClient,
    TrainerJobConfig,
    TrainerJobManager,
    types,
)
from PIL import Image
from transformers import AutoProcessor

BASE_MODEL = "accounts/fireworks/models/qwen3-vl-8b-instruct"
SHAPE = "accounts/fireworks/trainingShapes/qwen3-vl-8b-65k"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--learning-rate", type=float, default=1e-5, help="Adam's (the guide's 1e-5)")
    p.add_argument("--base-model", default=BASE_MODEL)
    p.add_argument("--shape", default=SHAPE, help="the training shape the job runs on")
    p.add_argument("--output-model", default="my-vlm-model", help="the promoted model's id")
    p.add_argument(
        "--processor",
        default="Qwen/Qwen3-VL-8B-Instruct",
        help="the base model's tokenizer and image processor: a hub id or a directory "
        "(the tiny model's, for a server that serves tiny-qwen3-vl)",
    )
    p.add_argument("--image", help="a PNG or JPEG file (default: a red 64x64 square)")
    p.add_argument("--answer", default="red", help="what the model learns to say about it")
    p.add_argument("--chat", action="store_true", help="ask the promoted model about the image")
    return p.parse_args()


def image_bytes(path: str | None) -> tuple[bytes, str]:
    """(bytes, "png" | "jpeg") of the picture the datum carries."""
    if path is None:
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (220, 20, 20)).save(buf, format="PNG")
        return buf.getvalue(), "png"
    with open(path, "rb") as f:
        data = f.read()
    return data, "png" if data.startswith(b"\x89PNG") else "jpeg"


def image_tokens(processor, data: bytes) -> int:
    """How many tokens the model makes of the image, by its own processor (patches,
    then merged 2x2): the chunk's ``expected_tokens``, and one target per token."""
    width, height = Image.open(io.BytesIO(data)).size
    ip = processor.image_processor
    return ip.get_number_of_image_patches(height, width, {}) // ip.merge_size**2


def build_datum(tokenizer, image: bytes, fmt: str, n_image: int, answer: str) -> types.Datum:
    """One user turn (image, question) and the answer, in Qwen3-VL's chat format.

    Targets follow the 1.2.x client's convention: one per input position, images
    included (0 where the next position is an image token, with weight 0); only the
    answer's tokens have weight."""
    prefix = tokenizer.encode("<|im_start|>user\n<|vision_start|>")
    question = tokenizer.encode(
        "<|vision_end|>What color is this picture?<|im_end|>\n<|im_start|>assistant\n"
    )
    reply = tokenizer.encode(f"{answer}<|im_end|>")
    # The whole sequence, image positions as None: the input is all but its last
    # token, the targets all but its first.
    sequence = prefix + [None] * n_image + question + reply
    targets = [0 if t is None else t for t in sequence[1:]]
    weights = [0.0] * (len(sequence) - 1 - len(reply)) + [1.0] * len(reply)
    chunks = [
        types.EncodedTextChunk(tokens=prefix),
        types.ImageChunk(data=image, format=fmt, expected_tokens=n_image),
        types.EncodedTextChunk(tokens=question + reply[:-1]),
    ]
    return types.Datum(
        model_input=types.ModelInput(chunks=chunks),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )


def sft_loss(data, logprobs_list):
    """Mean negative log-likelihood of the weighted (answer) tokens."""
    weights = torch.tensor(data[0].loss_fn_inputs["weights"].data)
    loss = -(logprobs_list[0] * weights).sum() / weights.sum()
    return loss, {"sft_loss": loss.item()}


def chat(base_url: str, api_key: str, model: str, image: bytes, fmt: str) -> str:
    """Ask the promoted model about the picture (vlmtune serves it at once; the hosted
    service needs a deployment of it first)."""
    url = f"data:image/{fmt};base64,{base64.b64encode(image).decode()}"
    r = httpx.post(
        f"{base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={
            "model": model,
            "max_tokens": 8,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "What color is this picture?"},
                    ],
                }
            ],  # fmt: skip
        },
        timeout=300,
    )
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def main() -> None:
    args = parse_args()
    api_key = os.environ["FIREWORKS_API_KEY"]
    base_url = os.environ.get("FIREWORKS_BASE_URL", "https://api.fireworks.ai")
    base_model = args.base_model
    started = time.monotonic()

    # ---- the guide's snippet -------------------------------------------------------
    rlor_mgr = TrainerJobManager(api_key=api_key, base_url=base_url)
    profile = rlor_mgr.resolve_training_profile(args.shape)
    endpoint = rlor_mgr.create_and_wait(
        TrainerJobConfig(
            base_model=base_model,
            training_shape_ref=profile.training_shape_version,
            lora_rank=0,
            learning_rate=args.learning_rate,
            display_name="vlm-sft",
        ),
        poll_interval_s=1.0,
    )
    print(f"trainer {endpoint.job_id} ready at {endpoint.base_url}", flush=True)
    service = FiretitanServiceClient(base_url=endpoint.base_url, api_key=api_key)
    training_client = service.create_training_client(base_model=base_model, lora_rank=0)

    processor = AutoProcessor.from_pretrained(os.path.expanduser(args.processor))
    image, fmt = image_bytes(args.image)
    n_image = image_tokens(processor, image)
    datum = build_datum(processor.tokenizer, image, fmt, n_image, args.answer)
    print(f"datum: {n_image} image tokens, {len(datum.loss_fn_inputs['weights'].data)} "
          "positions", flush=True)  # fmt: skip

    losses = []
    for step in range(args.steps):
        out = training_client.forward_backward_custom([datum], sft_loss).result()
        training_client.optim_step(AdamParams(learning_rate=args.learning_rate)).result()
        losses.append(out.metrics["sft_loss"])
        if step % 10 == 0 or step == args.steps - 1:
            elapsed = time.monotonic() - started
            print(f"step {step:4d}  loss {losses[-1]:.4f}  ({elapsed:.1f} s)", flush=True)

    result = training_client.save_weights_for_sampler_ext("vlm-final", checkpoint_type="base")
    print(f"saved {result.snapshot_name} ({result.path})", flush=True)
    with warnings.catch_warnings():  # the guide's (job_id, checkpoint_id) form is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        model = rlor_mgr.promote_checkpoint(
            job_id=endpoint.job_id,
            checkpoint_id=result.snapshot_name,
            output_model_id=args.output_model,
            base_model=base_model,
        )
    print(f"promoted {model['name']} ({model['state']}, {model['kind']})", flush=True)
    # ---- end of the snippet --------------------------------------------------------

    checkpoints = rlor_mgr.list_checkpoints(endpoint.job_id)
    service.close()
    rlor_mgr.delete(endpoint.job_id)  # the trainer's memory is freed; the model stays
    answer = chat(base_url, api_key, model["name"], image, fmt) if args.chat else None
    if answer is not None:
        print(f"{model['name']} says: {answer!r}", flush=True)
    summary = {"job_id": endpoint.job_id, "losses": losses, "snapshot": result.snapshot_name,
               "model": model, "checkpoints": checkpoints, "chat": answer,
               "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    print("RESULT " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
