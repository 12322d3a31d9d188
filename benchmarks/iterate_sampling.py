"""Generated tokens/s of sftune iterate's batched KV-cached sampler against a plain per-prompt `model.generate`
loop, on SmolLM2-135M-Instruct (CPU), for the same prompts, k samples each, the same stop tokens.

    python benchmarks/iterate_sampling.py [--prompts 16] [--k 4] [--max_new_tokens 32] [--repeats 2]

The two implementations alternate (A B A B ...) so that a machine shared with other work slows both alike; the
ratio is the figure to read. Writes one JSON line per run to benchmarks/results-iterate-sampling.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sftune import tasks
from sftune.data.render import stop_token_ids
from sftune.iterate.prompts import prompt_ids, rows_to_prompts
from sftune.iterate.sampling import Job, plan_batches, sample_all, sample_seed
from sftune.models import load_model, load_tokenizer, smollm2_path


def plain_loop(model, tokenizer, ids, k, stops, max_new_tokens, temperature) -> int:
    """One `model.generate` call per prompt (its k samples as num_return_sequences): the loop users write."""
    generated = 0
    for prompt in ids:
        out = model.generate(torch.tensor([prompt]), do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                             max_new_tokens=max_new_tokens, num_return_sequences=k, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        for row in out[:, len(prompt) :].tolist():
            # Count up to and including the stop token: generate pads finished rows to the longest.
            n = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            generated += n
    return generated


def batched(model, tokenizer, ids, k, stops, max_new_tokens, temperature, batch_size) -> int:
    jobs = [Job(i, s, sample_seed(0, i, s)) for i in range(len(ids)) for s in range(k)]
    samples = sample_all(model, ids, plan_batches([len(x) for x in ids], jobs, batch_size), stops,
                         tokenizer.pad_token_id, max_new_tokens, temperature, progress=False)  # fmt: skip
    return sum(len(s.token_ids) for s in samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results-iterate-sampling.jsonl")))
    args = parser.parse_args()
    path = smollm2_path()
    tokenizer, model = load_tokenizer(path), load_model(path).eval()
    train, _ = tasks.make_task_splits(n_train=args.prompts, n_test=1)
    ids = [prompt_ids(tokenizer, p) for p in rows_to_prompts(train, None, "answer", "bench")]
    stops = stop_token_ids(tokenizer, model.generation_config)
    totals = {"plain_generate_loop": [0, 0.0], "sftune_batched": [0, 0.0]}
    for repeat in range(args.repeats):
        for name in totals:
            torch.manual_seed(repeat)
            started = time.perf_counter()
            if name == "plain_generate_loop":
                n = plain_loop(model, tokenizer, ids, args.k, stops, args.max_new_tokens, args.temperature)
            else:
                n = batched(
                    model, tokenizer, ids, args.k, stops, args.max_new_tokens, args.temperature, args.batch_size
                )
            seconds = time.perf_counter() - started
            totals[name][0] += n
            totals[name][1] += seconds
            print(f"{name}: {n} tokens in {seconds:.1f}s = {n / seconds:.1f} tok/s", flush=True)
    rates = {name: n / s for name, (n, s) in totals.items()}
    result = {
        "model": "SmolLM2-135M-Instruct", "device": "cpu", "threads": torch.get_num_threads(),
        "prompts": args.prompts, "k": args.k, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        **{f"{name}_tok_s": round(rate, 1) for name, rate in rates.items()},
        "speedup": round(rates["sftune_batched"] / rates["plain_generate_loop"], 2),
    }  # fmt: skip
    print(json.dumps(result))
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
