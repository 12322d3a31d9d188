"""Every sftune guarantee under the engines users pick past one device: FSDP2, DeepSpeed ZeRO-2/3, 2 nodes.

Each run is `tests/dist_worker.py` under `torchrun` (gloo, CPU, 2 processes, a tiny Llama, 4 steps), compared with
the same script in 1 process: the logged losses, token accuracies and learning rates, and the final model saved
with `save_model()` and loaded with plain `from_pretrained`.

Tolerance, derived (not tuned): the runs differ only by the order in which the 2 processes' gradients are summed
(the all-reduce or reduce-scatter adds two partial sums that 1 process adds row by row), a relative error of about
float32's epsilon (1.2e-7) per addition, carried through a few Adam steps at lr 1e-3. Adam normalises each update
(m / sqrt(v)), so a relative gradient error e moves a weight by at most ~lr * e per step, and the loss by the same
order. 4 steps of lr 1e-3 with gradients differing by ~1e-6 relative leave the weights within ~1e-6; we allow
2e-5 absolute on weights (O(0.02-1)) and 2e-5 relative on losses, 20x that bound, where a real bug (a rank's
gradient dropped, a head read as a shard, an accumulation off by a factor) changes them by 1e-3 or more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "dist_worker.py")
WEIGHT_ATOL = 2e-5
LOSS_RTOL = 2e-5
HAS_DEEPSPEED = __import__("importlib").util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install sftune[deepspeed])"
)
_port = [29700 + os.getpid() % 200]


def next_port() -> str:
    _port[0] += 1
    return str(_port[0])


def launch(model: Path, out: Path, *flags: str, procs: int = 2, nodes: int = 1, timeout: int = 420) -> dict:
    """Run the worker (under torchrun when procs * nodes > 1); returns rank 0's result.json."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    worker = [WORKER, str(model), str(out), *flags]
    if procs * nodes == 1:
        commands = [[sys.executable, *worker]]
    elif nodes == 1:
        commands = [[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                     "--master_port", next_port(), *worker]]  # fmt: skip
    else:  # one torchrun per node, meeting over loopback through the c10d rendezvous
        endpoint = f"127.0.0.1:{next_port()}"
        commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node",
                     str(procs), "--node_rank", str(n), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                     "--rdzv_id", "sftune-test", *worker] for n in range(nodes)]  # fmt: skip
    running = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for c in commands]  # fmt: skip
    logs = [p.communicate(timeout=timeout)[0] for p in running]
    for process, log in zip(running, logs):
        assert process.returncode == 0, log[-4000:]
    result = json.loads(Path(out, "result.json").read_text())
    result["log"] = "\n".join(logs)
    return result


def saved_weights(out: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def assert_same_run(got: dict, want: dict, got_dir: Path, want_dir: Path) -> None:
    assert got["global_step"] == want["global_step"]
    assert got["learning_rates"] == pytest.approx(want["learning_rates"], rel=1e-9)
    assert got["losses"] == pytest.approx(want["losses"], rel=LOSS_RTOL)
    assert got["accuracies"] == pytest.approx(want["accuracies"], abs=1e-9)  # counts: exact
    assert got["num_tokens"] == want["num_tokens"]
    a, b = saved_weights(got_dir), saved_weights(want_dir)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= WEIGHT_ATOL, worst


@pytest.fixture(scope="module")
def single(tiny_llama_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return launch(tiny_llama_path, out, procs=1), out


@pytest.mark.parametrize(
    "engine", ["fsdp2", pytest.param("zero2", marks=needs_deepspeed), pytest.param("zero3", marks=needs_deepspeed)]
)
def test_engine_matches_one_process_and_saves_a_plain_model(engine, tiny_llama_path, single, tmp_path):
    result = launch(tiny_llama_path, tmp_path, "--engine", engine)
    assert result["engine"] == engine and result["chunked"]
    assert_same_run(result, single[0], tmp_path, single[1])
