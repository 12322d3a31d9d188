"""Generate -> filter -> train on the bundled list task with the real SmolLM2-135M-Instruct (CPU, minutes).

A short warm start (a few supervised steps) teaches the answer format; then each round samples replies to
training prompts, keeps the exactly-correct ones and trains on them. Held-out exact match is printed per round.

    .venv/bin/python examples/generate_filter_train.py [--rounds 3] [--prompts 64]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from sftune import IterativeSFTConfig, IterativeSFTTrainer, tasks
from sftune.evaluate import exact_match
from sftune.generate_filter_train import generate_filter_train, training_example
from sftune.models import load_tokenizer, smollm2_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=96, help="training prompts, sampled every round")
    parser.add_argument("--samples", type=int, default=4, help="replies sampled per prompt")
    parser.add_argument("--warm_start", type=int, default=32, help="supervised examples before the first round")
    parser.add_argument("--n_test", type=int, default=100)
    parser.add_argument("--output_dir", default="runs/generate_filter_train")
    args = parser.parse_args()
    torch.manual_seed(0)

    path = smollm2_path()
    tokenizer = load_tokenizer(path)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    config = IterativeSFTConfig(output_dir=args.output_dir, learning_rate=1e-3, per_device_train_batch_size=8,
                                logging_steps=5, report_to="none", save_strategy="no", seed=0)  # fmt: skip
    trainer = IterativeSFTTrainer(model, args=config, processing_class=tokenizer)
    train, test = tasks.make_task_splits(n_train=args.warm_start + args.rounds * args.prompts, n_test=args.n_test)

    def held_out_accuracy(current_model) -> float:
        accuracy, _ = exact_match(current_model, tokenizer, test, tasks.prompt_messages, tasks.is_correct, 24)
        return accuracy

    started = time.perf_counter()
    base = held_out_accuracy(model)
    print(f"base model: held-out exact match {base:.1%}")
    warm = train[: args.warm_start]
    ids, labels = zip(*(training_example(tokenizer, tasks.prompt_messages(e), e["answer"]) for e in warm), strict=True)
    trainer.step(input_ids=list(ids), labels=list(labels))
    print(f"warm start on {len(warm)} supervised examples done")

    # One pool of prompts for every round; their answers are never shown to the model, only used to check it.
    pool = train[args.warm_start : args.warm_start + args.prompts]

    def report(result) -> None:
        label = "after warm start" if result.round == 0 else f"round {result.round}"
        accepted = f"accepted {result.accepted}/{result.generated} sampled replies, " if result.round else ""
        print(f"{label}: {accepted}held-out exact match {result.metric:.1%} ({time.perf_counter() - started:.0f}s)")

    results = generate_filter_train(
        trainer,
        [tasks.prompt_messages(e) for e in pool],
        accept=lambda i, reply: tasks.is_correct(reply, pool[i]["answer"]),
        rounds=args.rounds,
        samples_per_prompt=args.samples,
        max_new_tokens=24,
        temperature=0.8,
        evaluate=held_out_accuracy,
        on_round=report,
    )
    print(json.dumps({"base": base, "rounds": [r.as_dict() for r in results]}))


if __name__ == "__main__":
    main()
