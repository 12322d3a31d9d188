"""sftune vs TRL 1.16 on a GPU, side by side: tokens/s, MFU and peak GPU memory.

    python benchmarks/gpu_compare.py --out-dir runs/gpu             # every row below, both libraries, then a table
    python benchmarks/gpu_compare.py --models qwen2.5-0.5b --tunings lora --packings packed --profile
    python benchmarks/gpu_compare.py --device cpu --tiny            # CPU smoke run of every code path (minutes)

Rows: {Qwen2.5-0.5B, Llama-3.2-1B shapes} x {full fine-tuning, LoRA} x {unpacked, packed}. Models are built from
their published configs with random weights (no hub; speed does not depend on the weights), in bf16, with
`use_cache=False` (training needs no cache, and with one transformers would not isolate TRL's padding-free
documents on SDPA). Data: pre-tokenized documents of lognormal length (median ~300 tokens, capped at the max
length 2048), the same for both libraries. Same SFTConfig values for both (batch 8, lr 2e-5, bf16, no gradient
checkpointing); each library keeps its own defaults otherwise (sftune: padding-free batches and a chunked loss;
TRL: padded batches). Each run is its own process, so its peak memory is its own.

Throughput counts real (non-padding) tokens over the timed steps (after `--warmup` steps). MFU is
6N (full) or 4N + 2N_trainable (LoRA) FLOPs per token (sftune.throughput.training_flops_per_token, attention
scores not counted) over the GPU's dense bf16 peak from sftune.throughput.GPU_PEAK_FLOPS; `mfu_measured` uses
the measured bf16 matmul rate instead. `--profile` adds one profiled step after the timed ones and writes its
top kernels to `profile-<run>.txt`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Published configs (hub: Qwen/Qwen2.5-0.5B, meta-llama/Llama-3.2-1B), written out: no hub access here.
MODELS = {
    "qwen2.5-0.5b": ("qwen2", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, hidden_act="silu",
    )),
    "llama-3.2-1b": ("llama", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, hidden_act="silu",
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )),
}  # fmt: skip
TINY = {
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-3.2-1b": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
}  # fmt: skip
TUNINGS = ("full", "lora")
PACKINGS = ("unpacked", "packed")


def documents(n: int, vocab: int, max_length: int, seed: int = 0) -> list[list[int]]:
    """Token ids of `n` documents, lengths lognormal with median max_length/7 (~300 at 2048), capped."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(max_length / 7), 0.9, size=n).astype(int), 16, max_length)
    return [rng.integers(3, vocab, size=int(length)).tolist() for length in lengths]


def tokenizer(max_length: int):
    """A stand-in tokenizer: the data is pre-tokenized, so only its pad and eos ids matter."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def build_model(name: str, tiny: bool, device: str, dtype, attn: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    arch, shape = (TINY if tiny else MODELS)[name]
    config = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch](**shape, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model


def measure_matmul_peak(device: str) -> float:
    """Median bf16 (GPU) / float32 (CPU) matmul FLOP/s on random data."""
    import torch

    size, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return 2 * size**3 / sorted(times)[len(times) // 2]


def run_one(args: argparse.Namespace) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback

    from sftune.throughput import peak_flops, training_flops_per_token

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, args.tiny, args.device, dtype, args.attn)
    vocab = model.config.vocab_size
    data = Dataset.from_dict({"input_ids": documents(args.examples, vocab, args.max_length)})
    packed = args.packing == "packed"
    common = dict(
        output_dir=f"/tmp/gpu-bench-{args.impl}-{args.model}-{args.tuning}-{args.packing}",
        max_steps=args.steps + (1 if args.profile else 0), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=2e-5, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=max(args.steps, 1), save_strategy="no", report_to="none", seed=0, bf16=cuda,
        gradient_checkpointing=args.gradient_checkpointing, max_length=args.max_length, packing=packed,
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=not cuda,
    )  # fmt: skip
    if args.impl == "trl":
        import trl

        config_class, trainer_class, version = trl.SFTConfig, trl.SFTTrainer, trl.__version__
    else:
        import sftune

        config_class, trainer_class, version = sftune.SFTConfig, sftune.SFTTrainer, sftune.__version__
    peft_config = None
    if args.tuning == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")  # fmt: skip

    started = time.perf_counter()
    trainer = trainer_class(model=model, args=config_class(**common), train_dataset=data,
                            processing_class=tokenizer(args.max_length), peft_config=peft_config)  # fmt: skip
    prep_seconds = time.perf_counter() - started

    # Batches are collated in training order (the loader may run one ahead): batch i is step i's.
    batch_tokens: list[tuple[int, int]] = []
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        batch_tokens.append((sum(len(f["input_ids"]) for f in features), batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collator
    step_ends: list[float] = []
    profile_path = Path(args.out_dir or ".") / f"profile-{args.impl}-{args.model}-{args.tuning}-{args.packing}.txt"

    class Clock(TrainerCallback):
        profiler = None

        def on_step_begin(self, a, state, control, **kwargs):
            if args.profile and state.global_step == args.steps:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if cuda:
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()

        def on_step_end(self, a, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                write_profile(self.profiler, profile_path, cuda)
                self.profiler = None

    trainer.add_callback(Clock())
    trainer.train()
    warm, steps = args.warmup, args.steps
    if len(step_ends) < steps or steps <= warm:
        raise SystemExit(f"only {len(step_ends)} steps ran; need more than --warmup {warm} (data too small?)")
    timed = batch_tokens[warm:steps]
    seconds = step_ends[steps - 1] - step_ends[warm - 1] if warm else step_ends[steps - 1] - started
    real = sum(r for r, _ in timed)
    fed = sum(f for _, f in timed)
    flops_per_token = training_flops_per_token(trainer.model)
    tokens_per_second = real / seconds
    peak = peak_flops(args.device)
    result = {
        "impl": args.impl,
        "version": version,
        "model": args.model + ("-tiny" if args.tiny else ""),
        "tuning": args.tuning,
        "packing": args.packing,
        "attn": args.attn,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "steps_timed": steps - warm,
        "tokens": real,
        "padding_fraction": round(1 - real / max(fed, 1), 4),
        "tokens_per_second": round(tokens_per_second, 1),
        "step_seconds": round(seconds / (steps - warm), 4),
        "mfu": round(flops_per_token * tokens_per_second / peak, 4),
        "peak_tflops_table": round(peak / 1e12, 3),
        "prep_seconds": round(prep_seconds, 2),
        "final_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
    }
    if args.matmul_peak:
        result["mfu_measured"] = round(flops_per_token * tokens_per_second / args.matmul_peak, 4)
    if cuda:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    else:
        result["peak_memory_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if args.profile:
        result["profile"] = str(profile_path)
    return result


def write_profile(profiler, path: Path, cuda: bool) -> None:
    """The profiled step's top operators by device (else CPU) self time."""
    averages = profiler.key_averages()
    table = None
    for key in (["self_device_time_total", "self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]:
        try:
            table = averages.table(sort_by=key, row_limit=40, max_name_column_width=70)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table or "profiler gave no table\n")


def compare(args: argparse.Namespace) -> None:
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.jsonl").write_text("")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    base = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
            "--examples", str(args.examples), "--attn", args.attn, "--dtype", args.dtype]  # fmt: skip
    base += (
        ["--tiny"] * args.tiny
        + ["--profile"] * args.profile
        + ["--gradient-checkpointing"] * args.gradient_checkpointing
    )
    if out_dir:
        base += ["--out-dir", str(out_dir)]
    peak = subprocess.run(base + ["--measure-peak"], capture_output=True, text=True, env=env)
    matmul_peak = float(peak.stdout.strip().splitlines()[-1]) if peak.returncode == 0 else None
    print(f"measured matmul peak: {(matmul_peak or 0) / 1e12:.3g} TFLOP/s", flush=True)
    results = []
    for model in args.models:
        for tuning in args.tunings:
            for packing in args.packings:
                for impl in args.impls:
                    command = base + ["--impl", impl, "--model", model, "--tuning", tuning, "--packing", packing]
                    if matmul_peak:
                        command += ["--matmul-peak", str(matmul_peak)]
                    label = f"{impl} / {model} / {tuning} / {packing}"
                    print(f"running {label} ...", file=sys.stderr, flush=True)
                    done = subprocess.run(command, capture_output=True, text=True, env=env)
                    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                    if done.returncode or not lines:
                        tail = done.stderr[-4000:]
                        print(f"{label} FAILED:\n{tail}", file=sys.stderr, flush=True)
                        result = {"impl": impl, "model": model, "tuning": tuning, "packing": packing,
                                  "error": tail.strip().splitlines()[-1] if tail.strip() else f"rc {done.returncode}"}  # fmt: skip
                        if out_dir:
                            (out_dir / f"error-{impl}-{model}-{tuning}-{packing}.txt").write_text(done.stderr)
                    else:
                        result = json.loads(lines[-1])
                    print(json.dumps(result), flush=True)
                    results.append(result)
                    if out_dir:
                        with open(out_dir / "results.jsonl", "a") as out:
                            out.write(json.dumps(result) + "\n")
    print_table(results, matmul_peak)


def print_table(results: list[dict], matmul_peak: float | None) -> None:
    by = {(r["impl"], r["model"].removesuffix("-tiny"), r["tuning"], r["packing"]): r for r in results}
    rows = dict.fromkeys((m, t, p) for _, m, t, p in by)
    print(f"\nsftune vs TRL (tok/s and MFU: higher is better; memory: lower is better); "
          f"measured matmul peak {(matmul_peak or 0) / 1e12:.3g} TFLOP/s")  # fmt: skip
    header = (f"{'model':13} {'tuning':5} {'packing':8} | {'tok/s sftune':>12} {'tok/s trl':>10} {'ratio':>6} | "
              f"{'MFU sftune':>10} {'MFU trl':>8} | {'GiB sftune':>10} {'GiB trl':>8} {'ratio':>6}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for model, tuning, packing in rows:
        s, t = by.get(("sftune", model, tuning, packing), {}), by.get(("trl", model, tuning, packing), {})

        def get(r, key, fmt):
            return format(r[key], fmt) if key in r else ("ERR" if "error" in r else "-")

        ratio = f"{s['tokens_per_second'] / t['tokens_per_second']:.2f}" if "tokens_per_second" in s and "tokens_per_second" in t else "-"  # fmt: skip
        memory = f"{s['peak_memory_gib'] / t['peak_memory_gib']:.2f}" if "peak_memory_gib" in s and "peak_memory_gib" in t else "-"  # fmt: skip
        print(f"{model:13} {tuning:5} {packing:8} | {get(s, 'tokens_per_second', '12.0f')} "
              f"{get(t, 'tokens_per_second', '10.0f')} {ratio:>6} | {get(s, 'mfu', '10.3f')} {get(t, 'mfu', '8.3f')} | "
              f"{get(s, 'peak_memory_gib', '10.2f')} {get(t, 'peak_memory_gib', '8.2f')} {memory:>6}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["sftune", "trl"], help="run one configuration (a child process)")
    parser.add_argument("--model", choices=list(MODELS), default="qwen2.5-0.5b")
    parser.add_argument("--tuning", choices=TUNINGS, default="full")
    parser.add_argument("--packing", choices=PACKINGS, default="packed")
    parser.add_argument("--impls", nargs="+", choices=["sftune", "trl"], default=["sftune", "trl"])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--tunings", nargs="+", choices=TUNINGS, default=list(TUNINGS))
    parser.add_argument("--packings", nargs="+", choices=PACKINGS, default=list(PACKINGS))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="2-layer models of the same families (smoke runs)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; tiny: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; tiny: 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None, help="default 2048 (tiny: 128)")
    parser.add_argument("--examples", type=int, default=None, help="documents generated (default 4000; tiny: 400)")
    parser.add_argument("--attn", default="sdpa", help="sdpa, eager or flex_attention")
    parser.add_argument("--dtype", default="bfloat16", help="weights dtype (default bfloat16)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--profile", action="store_true", help="profile one extra step; top kernels to a file")
    parser.add_argument("--out-dir", default=None, help="results.jsonl, profiles and error logs go here")
    parser.add_argument("--matmul-peak", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measure-peak", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.max_length = args.max_length or (128 if args.tiny else 2048)
    args.examples = args.examples or (400 if args.tiny else 4000)
    if args.device == "cpu":
        args.dtype = "float32" if args.dtype == "bfloat16" else args.dtype
    if args.measure_peak:
        print(measure_matmul_peak(args.device))
    elif args.impl:
        print(json.dumps(run_one(args)))
    else:
        compare(args)


if __name__ == "__main__":
    main()
