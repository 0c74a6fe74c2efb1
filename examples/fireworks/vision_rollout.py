"""A vision rollout for the Fireworks cookbook's ``rl_loop``, trained by ``vlmtune serve``.

The cookbook's built-in rollout refuses image prompts (its token-in path raises
``MultimodalRenderingNotSupported``), so ``rl_loop`` trains on images only through its
hook, ``rl_loop.main(cfg, sample_prompt_fn=...)``. This file is that hook, made of the
cookbook's and the SDK's public functions:

1. each row's messages are normalised (OpenAI ``image_url`` parts become the renderer's
   ``image`` parts: the RL renderer silently drops ``image_url``);
2. ``single_turn_renderer_rollout`` renders them with the cookbook's Qwen3-VL renderer
   and samples one completion token-in: the prompt holds one ``<|image_pad|>`` per image
   and the images go along as data URLs (``DeploymentSampler.sample_with_prompt_tokens``;
   the server expands each pad into the image's tokens, exactly as in training);
3. each completion is scored against the row's ``ground_truth`` and the runs become one
   ``PromptGroup`` for the loop.

The sampler names the deployment itself, so the deployment id is pinned
(``--deployment-id``, passed to ``DeployConfig``). Everything else (the trainer jobs,
the deployment, hot-loading each step's weights, promotion) is ``rl_loop``'s own.

Run it against a local server on the tiny model (a cookbook checkout on ``PYTHONPATH``,
in a venv with the cookbook's pins: ``fireworks-ai==1.2.9``, ``tinker==0.23.0``,
``tinker-cookbook==0.4.3``)::

    vlmtune serve --model-alias accounts/fireworks/models/qwen3-vl-8b-instruct=tiny-qwen3-vl
    export FIREWORKS_BASE_URL=http://127.0.0.1:8000 FIREWORKS_API_KEY=fw_...
    python examples/fireworks/vision_rollout.py --dataset rows.jsonl \\
        --tokenizer /path/to/Qwen3-VL-tiny --smoke

Rows are chat rows with images, e.g.
``{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url":
{"url": "data:image/png;base64,..."}}, {"type": "text", "text": "What color is this?"}]}],
"ground_truth": "red"}``. ``--tokenizer`` is a directory (or hub id) whose name contains
``qwen3-vl``: the cookbook picks its renderer by that name. The tiny model's random
weights never name the colour, and ``rl_loop`` drops a group whose rewards are all
equal: ``--smoke`` scores completions at random, to see the whole loop run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
from typing import Any

# The cookbook (its ``training`` package) and the SDK it pins: see the docstring.
import training.recipes.rl_loop as rl_loop
from fireworks.training.sdk.deployment import DeploymentSampler
from fireworks.training.sdk.fireworks_client import FireworksClient
from tinker_cookbook.renderers import get_text_content
from training.utils import DeployConfig, TrainerConfig, WandBConfig, build_renderer
from training.utils.rl.rollout import Rollout, rollout_to_prompt_group
from training.utils.rl.rollout.renderer import single_turn_renderer_rollout
from transformers import AutoTokenizer


def vision_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The row's messages with ``image_url`` parts as the renderer's ``image`` parts."""
    out = []
    for message in row["messages"]:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image", "image": part["image_url"]["url"]}
                if part.get("type") == "image_url"
                else part
                for part in content
            ]
        out.append({**message, "content": content})
    return out


def matches_ground_truth(row: dict[str, Any], message: Any, parsed_ok: bool) -> float:
    """1.0 when the response names the row's ``ground_truth`` (case-insensitive)."""
    truth = str(row.get("ground_truth", "")).strip().lower()
    return float(bool(truth) and truth in get_text_content(message).lower())


def random_reward(row: dict[str, Any], message: Any, parsed_ok: bool) -> float:
    return random.random()


class VisionRollout:
    """``sample_prompt_fn`` for ``rl_loop.main``: ``completions`` samples of one row."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        self.renderer = build_renderer(self.tokenizer, args.tokenizer, "")
        account = FireworksClient(api_key=args.api_key, base_url=args.base_url).account_id
        self.sampler = DeploymentSampler(
            inference_url=args.base_url,
            model=f"accounts/{account}/deployments/{args.deployment_id}",
            api_key=args.api_key,
            tokenizer=self.tokenizer,
        )
        self.reward = random_reward if args.smoke else matches_ground_truth
        self.completions = args.completions_per_prompt
        self.max_tokens = args.max_tokens

    async def __call__(self, row: dict[str, Any], *, cursor_index: int) -> Any:
        runs = await asyncio.gather(
            *[
                single_turn_renderer_rollout(
                    row,
                    renderer=self.renderer,
                    sample_with_prompt_tokens=self.sampler.sample_with_prompt_tokens,
                    message_builder=vision_messages,
                    reward_fn=self.reward,
                    tokenizer=self.tokenizer,
                    max_tokens=self.max_tokens,
                    # Full-distribution sampling: the sampler's logprobs are the policy's.
                    sample_kwargs={"temperature": 1.0, "top_p": 1.0, "top_k": 0, "logprobs": True},
                )
                for _ in range(self.completions)
            ]
        )
        runs = [r for r in runs if r is not None]
        if len(runs) < 2:  # a group needs two samples to have an advantage
            return None
        return rollout_to_prompt_group(Rollout(runs=runs), with_reference=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="chat rows with images (JSONL)")
    p.add_argument("--tokenizer", required=True, help="a qwen3-vl tokenizer directory or id")
    p.add_argument("--base-model", default="accounts/fireworks/models/qwen3-vl-8b-instruct")
    p.add_argument("--deployment-id", default="vl-rollout", help="the sampling deployment")
    # The 1.2.9 client makes a managed deployment only from a named shape (it refuses
    # none, and the short form "qwen3-vl-8b-65k"): the full resource name.
    p.add_argument(
        "--training-shape",
        default="accounts/fireworks/trainingShapes/qwen3-vl-8b-65k",
        help="a training shape's full resource name (`vlmtune shapes` lists them)",
    )
    p.add_argument("--lora-rank", type=int, default=0, help="0: full-parameter")
    p.add_argument("--completions-per-prompt", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rows", type=int, default=2, help="rows to train on")
    p.add_argument("--output-model-id", default="rl-vision", help="a model id not yet taken")
    p.add_argument("--log-path", default="rl_vision_logs")
    p.add_argument("--smoke", action="store_true", help="random rewards (plumbing check)")
    args = p.parse_args()
    args.api_key = os.environ["FIREWORKS_API_KEY"]
    args.base_url = os.environ["FIREWORKS_BASE_URL"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    cfg = rl_loop.Config(
        log_path=args.log_path,
        base_model=args.base_model,
        dataset=args.dataset,
        completions_per_prompt=args.completions_per_prompt,
        max_completion_tokens=args.max_tokens,
        max_rows=args.rows,
        lora_rank=args.lora_rank,
        output_model_id=args.output_model_id,
        trainer=TrainerConfig(training_shape_id=args.training_shape),
        # Pinned: the rollout's sampler names this deployment.
        deployment=DeployConfig(deployment_id=args.deployment_id, tokenizer_model=args.tokenizer),
        wandb=WandBConfig(project="vlmtune-rl-vision"),
    )
    print("METRICS", rl_loop.main(cfg, sample_prompt_fn=VisionRollout(args)))


if __name__ == "__main__":
    main()
