"""The TRL side of ``sft_throughput.py``: TRL's ``SFTTrainer`` on the same job.

Run by ``sft_throughput.py`` in a subprocess whose ``PYTHONPATH`` holds
``benchmarks/.trl-env`` (TRL and its extra dependencies, installed there on first use),
so vlmtune's own environment never gets TRL. Prints one JSON line.

The job mirrors vlmtune's: the tiny Qwen3-VL from the same directory, the same first N
digits rows, effective batch 8 (``per_device_train_batch_size=8``, no accumulation),
images at min = max = 4,096 pixels (4 tokens), fp32 on CPU, AdamW at lr 1e-3 with 5%
linear warmup then cosine, grad-norm clip 1.0, loss on assistant tokens only
(``assistant_only_loss``; TRL swaps in its Qwen3-VL training chat template). TRL 1.x
refuses ``packing`` and ``padding_free`` for vision datasets, so batches are padded.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import resource
import tempfile
import time
from pathlib import Path

CONFIGS = {
    # name: (freeze_embeddings, gradient_checkpointing, dataloader workers)
    # matched: vlmtune's trainable set (vision + projector + LM layers; the tied
    # embedding / LM head frozen), no checkpointing; images decoded per step either in
    # DataLoader worker processes (like vlmtune's prefetch) or in the main process
    # (TRL's default; faster on a small, busy machine). The faster one is compared.
    "trl-matched": (True, False, None),
    "trl-matched-w0": (True, False, 0),
    # TRL's own defaults for this job: everything trains, gradient checkpointing on.
    "trl-defaults": (False, True, 0),
}


def _parts(content, images: list) -> list[dict]:
    """OpenAI-style content -> TRL's multimodal parts; decoded images go to ``images``."""
    from PIL import Image

    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    out = []
    for part in content:
        if part["type"] == "text":
            out.append({"type": "text", "text": part["text"]})
        else:
            url = part["image_url"]["url"]
            data = base64.b64decode(url.split(",", 1)[1])
            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
            out.append({"type": "image"})
    return out


def load_rows(path: Path, n: int) -> list[dict]:
    rows = []
    with path.open() as f:
        for line in f:
            if len(rows) == n:
                break
            raw = json.loads(line)
            images: list = []
            messages = [
                {"role": m["role"], "content": _parts(m["content"], images)}
                for m in raw["messages"]
            ]
            rows.append({"messages": messages, "images": images})
    return rows


def rss_mib() -> float:
    text = Path("/proc/self/status").read_text()
    return int(text.split("VmRSS:")[1].split()[0]) / 1024


def run(config: str, data: Path, examples: int, batch: int, threads: int, workers: int) -> dict:
    import torch

    torch_mib = rss_mib()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from vlmtune.models.tiny import tiny_model_dir  # only to find the same directory

    imports_mib = rss_mib()
    freeze_emb, grad_ckpt, config_workers = CONFIGS[config]
    n_workers = workers if config_workers is None else config_workers
    model_dir = tiny_model_dir()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    ip = processor.image_processor
    ip.size = type(ip.size)(shortest_edge=4096, longest_edge=4096)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    if freeze_emb:  # the LM head is tied to it: one matrix
        model.get_input_embeddings().weight.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    rows = load_rows(data, examples)
    dataset = datasets.Dataset.from_list(rows)
    steps = len(rows) // batch

    class Timer(TrainerCallback):
        t0 = t1 = 0.0
        tok0 = tok1 = 0

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if state.global_step == 1:  # step 1 is the warm-up, as on the vlmtune side
                self.t0, self.tok0 = now, state.num_input_tokens_seen
            self.t1, self.tok1 = now, state.num_input_tokens_seen

    timer = Timer()
    with tempfile.TemporaryDirectory() as out_dir:
        args = SFTConfig(
            output_dir=out_dir,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=1,
            max_steps=steps,
            learning_rate=1e-3,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,
            weight_decay=0.0,
            adam_epsilon=1e-8,
            max_grad_norm=1.0,
            bf16=False,
            fp16=False,
            use_cpu=True,
            gradient_checkpointing=grad_ckpt,
            assistant_only_loss=True,
            max_length=None,  # examples are ~22 tokens: nothing to truncate
            dataloader_num_workers=n_workers,
            dataloader_pin_memory=False,
            include_num_input_tokens_seen="non_padding",
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=processor,
            callbacks=[timer],
        )
        # Same image tokens as vlmtune (4 per digit): check on the first real batch.
        sample = trainer.data_collator([dataset[0]])
        assert sample["image_grid_thw"].tolist() == [[1, 4, 4]], sample["image_grid_thw"]
        seq_len = int(sample["attention_mask"].sum())
        trained = int((sample["labels"] != -100).sum())
        trainer.train()
    elapsed = timer.t1 - timer.t0
    n = (steps - 1) * batch
    return {
        "config": config,
        "examples": n,
        "examples_per_s": n / elapsed,
        "tokens_per_s": (timer.tok1 - timer.tok0) / elapsed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_torch_mib": torch_mib,
        "rss_after_imports_mib": imports_mib,
        "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "trainable_params": trainable,
        "tokens_per_example": seq_len,
        "loss_tokens_per_example": trained,
        "image_workers": n_workers,
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", choices=sorted(CONFIGS))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    a = parser.parse_args()
    print(json.dumps(run(a.config, a.data, a.examples, a.batch, a.threads, a.workers)))


if __name__ == "__main__":
    main()
