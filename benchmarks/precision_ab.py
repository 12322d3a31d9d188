"""Quick A/B of one training step's time: fp32 vs bf16 autocast (and torch.compile), chunked loss on.

    python benchmarks/precision_ab.py [--tokens 2048] [--rounds 6] [--compile]
    python benchmarks/precision_ab.py --packed [--rounds 7]    # the packing benchmark's batches

SmolLM2-135M-Instruct with sftune's training setup (memory-efficient MLP/RMSNorm, the chunked loss in the forward,
AdamW on fp32 master weights), one packed row of `--tokens` tokens from the benchmark's synthetic data, 80% of
them labelled; or, with `--packed`, three batches (8 rows of 512, documents isolated by block masks) exactly as
`compare.py --config packing` feeds them, used in turn. The variants take turns, step by step, for `--rounds` rounds, so a busy machine slows all of them
alike; the minimum and median step times are printed (the minimum is the least disturbed by other load). Also the
loss of each variant after each round on the same batch (a short training curve), and the peak RSS of a separate
process per variant is left to benchmarks/compare.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from benchmarks.compare import synthetic_rows  # noqa: E402
from sftune.loss import enable_chunked_loss  # noqa: E402
from sftune.memory import use_memory_efficient_mlp  # noqa: E402
from sftune.models import smollm2_path  # noqa: E402


def batch(tokenizer, tokens: int) -> dict[str, torch.Tensor]:
    ids: list[int] = []
    for row in synthetic_rows(2000, seed=1):
        ids += tokenizer(row["prompt"] + row["completion"])["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= tokens:
            break
    input_ids = torch.tensor([ids[:tokens]])
    labels = input_ids.clone()
    labels[:, : tokens // 5] = -100
    return {"input_ids": input_ids, "labels": labels}


def packed_batches(path, tokenizer, count: int = 3) -> list[dict[str, torch.Tensor]]:
    """The first batches `SFTTrainer` trains on in `compare.py --config packing` (same data, settings, order)."""
    import datasets

    from sftune import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir="/tmp/precision-ab", per_device_train_batch_size=8, max_length=512, packing=True,
                     report_to="none", seed=0)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(synthetic_rows(3000)),
                         processing_class=tokenizer)  # fmt: skip
    loader = iter(trainer.get_train_dataloader())
    batches = [next(loader) for _ in range(count)]
    for b in batches:
        b.pop("num_tokens", None)
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--compile", action="store_true", help="also bf16 + torch.compile of each decoder layer")
    parser.add_argument("--packed", action="store_true", help="the packing benchmark's batches (8 x 512)")
    options = parser.parse_args()
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = packed_batches(path, tokenizer) if options.packed else [batch(tokenizer, options.tokens)]
    tokens_per_step = [b["input_ids"].numel() for b in batches]
    variants = {"fp32": None, "bf16": torch.bfloat16}
    if options.compile:
        variants["bf16+compile"] = torch.bfloat16
    runs = {}
    for name in variants:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        use_memory_efficient_mlp(model)
        enable_chunked_loss(model, 1024)
        model.train()
        if name.endswith("compile"):
            # Regional compilation (accelerate's compile_regions): the decoder layer is compiled once and reused by
            # every layer; whole-model compilation did not finish in 13 minutes on 2 cores.
            for layer in model.model.layers:
                layer.compile()
        forward = model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runs[name] = {"model": forward, "optimizer": optimizer, "times": [], "losses": []}
    for step in range(options.rounds):
        inputs = batches[step % len(batches)]
        for name, dtype in variants.items():
            run = runs[name]
            autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
            started = time.perf_counter()
            with autocast:
                loss = run["model"](**inputs).loss
            loss.backward()
            run["optimizer"].step()
            run["optimizer"].zero_grad(set_to_none=True)
            run["times"].append(time.perf_counter() - started)
            if len(run["times"]) == 1:
                run["first_step_s"] = round(run["times"][0], 1)
            run["losses"].append(round(loss.item(), 5))
            print(json.dumps({"variant": name, "seconds": round(run["times"][-1], 2), "loss": run["losses"][-1]}),
                  file=sys.stderr, flush=True)  # fmt: skip
    summary = {}
    for name, run in runs.items():
        times = run["times"][1:]  # the first step warms up (and compiles)
        summary[name] = {
            "min_s": round(min(times), 2),
            "median_s": round(statistics.median(times), 2),
            "sum_s": round(sum(times), 1),
            "first_step_s": run["first_step_s"],
            "losses": run["losses"],
        }
    for name in summary:
        summary[name]["speedup_vs_fp32_best"] = round(summary["fp32"]["min_s"] / summary[name]["min_s"], 2)
        summary[name]["speedup_vs_fp32_total"] = round(summary["fp32"]["sum_s"] / summary[name]["sum_s"], 2)
    print(json.dumps({"tokens_per_step": tokens_per_step, "threads": torch.get_num_threads(), **summary}, indent=1))


if __name__ == "__main__":
    main()
