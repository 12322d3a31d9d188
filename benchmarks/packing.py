"""Packing benchmark: speed of best-fit-decreasing on 100k examples and utilisation of the packed rows.

    .venv/bin/python benchmarks/packing.py [--n 100000] [--max_length 512]

Lengths are skewed like real SFT data: most examples short, a long tail up to ~1,000 tokens (then cut to
max_length, the explicit over-long policy). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from datasets import Dataset

from sftune.data.packing import best_fit_decreasing, pack_dataset


def skewed_lengths(n: int, max_length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(mean=4.0, sigma=0.9, size=n).astype(np.int64) + 8  # median ~60, tail past 1,000
    return np.minimum(lengths, max_length)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--max_length", type=int, default=512)
    args = parser.parse_args()
    lengths = skewed_lengths(args.n, args.max_length)

    started = time.perf_counter()
    bins = best_fit_decreasing(lengths, args.max_length)
    bin_seconds = time.perf_counter() - started

    rows = Dataset.from_dict(
        {"input_ids": [[1] * int(n) for n in lengths], "loss_mask": [[1] * int(n) for n in lengths]}
    )
    started = time.perf_counter()
    packed = pack_dataset(rows, args.max_length)
    pack_seconds = time.perf_counter() - started

    real = int(lengths.sum())
    # Batches padded to their longest row; with full bins that is max_length.
    packed_lengths = np.array([sum(s) for s in packed["seq_lengths"]])
    print(json.dumps({
        "examples": args.n,
        "max_length": args.max_length,
        "bins": len(bins),
        "lower_bound_bins": int(np.ceil(real / args.max_length)),
        "utilisation": round(real / (len(bins) * args.max_length), 5),
        "tokens_kept": int(packed_lengths.sum()) == real,
        "bfd_seconds": round(bin_seconds, 3),
        "pack_dataset_seconds": round(pack_seconds, 3),
        "unpacked_padding_fraction_batch8": round(padding_fraction(lengths, 8), 4),
    }))  # fmt: skip


def padding_fraction(lengths: np.ndarray, batch_size: int) -> float:
    """Padding share when unpacked examples are batched in dataset order and padded to the batch's longest."""
    padded = sum(
        lengths[i : i + batch_size].max() * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)
    )
    return 1 - lengths.sum() / padded


if __name__ == "__main__":
    main()
