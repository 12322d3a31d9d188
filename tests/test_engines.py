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
Measured (2026-12-05): weights within 9.2e-7 (FSDP2, ZeRO-2) and 1.4e-6 (ZeRO-3), losses within 1.5e-7 relative, of
1 process; the 4 steps themselves move the weights by up to 2.5e-3. Token accuracies are counts: equal exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sftune.compat import dtype_kwargs, fsdp2_unavailable

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "dist_worker.py")
WEIGHT_ATOL = 2e-5
LOSS_RTOL = 2e-5
HAS_DEEPSPEED = __import__("importlib").util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install sftune[deepspeed])"
)
needs_fsdp2 = pytest.mark.skipif(fsdp2_unavailable() is not None, reason=f"FSDP2: {fsdp2_unavailable()}")
_port = [29700 + os.getpid() % 200]


def next_port() -> str:
    _port[0] += 1
    return str(_port[0])


def launch(model: Path, out: Path, *flags: str, procs: int = 2, nodes: int = 1, timeout: int = 300) -> dict:
    """Run the worker (under torchrun when procs * nodes > 1); returns rank 0's result.json."""
    Path(out, "result.json").unlink(missing_ok=True)  # a resumed run must not be judged by its first run's result
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
    running = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True) for c in commands]  # fmt: skip
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in running]
    except subprocess.TimeoutExpired:  # a hung collective: take the whole job down, then fail
        for process in running:
            os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the job did not finish in {timeout} s (a collective that not every rank reached?)")
    for process, log in zip(running, logs):
        assert process.returncode == 0, log[-4000:]
    result = json.loads(Path(out, "result.json").read_text())
    result["log"] = "\n".join(logs)
    return result


def saved_weights(out: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final", **dtype_kwargs(torch.float32))
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
    "engine",
    [
        pytest.param("fsdp2", marks=needs_fsdp2),
        pytest.param("zero2", marks=needs_deepspeed),
        pytest.param("zero3", marks=needs_deepspeed),
    ],
)
def test_engine_matches_one_process_and_saves_a_plain_model(engine, tiny_llama_path, single, tmp_path):
    result = launch(tiny_llama_path, tmp_path, "--engine", engine)
    assert result["engine"] == engine and result["chunked"]
    assert_same_run(result, single[0], tmp_path, single[1])


def test_two_nodes_of_one_process_over_loopback_match_one_process(tiny_llama_path, single, tmp_path):
    result = launch(tiny_llama_path, tmp_path, "--engine", "ddp", procs=1, nodes=2)
    assert result["engine"] == "ddp" and result["chunked"]
    assert_same_run(result, single[0], tmp_path, single[1])


@needs_fsdp2
def test_fsdp2_first_step_check_is_decided_by_all_ranks(tiny_llama_path, single, tmp_path):
    """Rank 1's first-step check window narrowed to 1 token: its batch has no trained token there while rank 0's
    has, so the ranks disagree on running the check; each forward gathers parameters under FSDP2, so a check run by
    one rank alone would hang the job. The output layer is its own shard unit: the chunked loss must gather it by
    calling it (reading its weight would see a shard)."""
    result = launch(tiny_llama_path, tmp_path, "--engine", "fsdp2", "--check_tokens", "1", "--head_unit")
    assert result["engine"] == "fsdp2" and result["chunked"]
    first = [windows[0] for windows in result["check_windows"]]
    assert len(set(first)) == 2, result["check_windows"]  # the ranks disagreed on the first batch
    assert_same_run(result, single[0], tmp_path, single[1])


@pytest.fixture(scope="module")
def single_packed(tiny_llama_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("single_packed")
    return launch(tiny_llama_path, out, "--packing", procs=1), out


# CI keeps one run per code path: FSDP2, and ZeRO-3 for DeepSpeed (ZeRO-2 resumes through the same DeepSpeed path).
@pytest.mark.parametrize(
    "engine",
    [
        pytest.param("ddp", marks=pytest.mark.slow),
        pytest.param("fsdp2", marks=needs_fsdp2),
        pytest.param("zero2", marks=[needs_deepspeed, pytest.mark.slow]),
        pytest.param("zero3", marks=needs_deepspeed),
    ],
)
def test_ctrl_c_on_one_rank_stops_all_and_resuming_matches_one_process(
    engine, tiny_llama_path, single_packed, tmp_path
):
    """Packed rows; SIGINT reaches rank 0 alone during step 3: both ranks finish step 3, save checkpoint-3 and stop;
    resuming from it ends where one uninterrupted process ends."""
    flags = ["--engine", engine, "--packing"] + (["--head_unit"] if engine == "fsdp2" else [])
    stopped = launch(tiny_llama_path, tmp_path, *flags, "--interrupt_at", "3")
    assert stopped["ended"] == "interrupted" and stopped["global_step"] == 3
    assert (tmp_path / "run" / "checkpoint-3" / "trainer_state.json").is_file()
    resumed = launch(tiny_llama_path, tmp_path, *flags, "--resume")
    assert resumed["ended"] == "done" and resumed["global_step"] == single_packed[0]["global_step"]
    assert resumed["chunked"]
    # The resumed run's history holds the checkpoint's (steps 1-3) and its own.
    want = single_packed[0]
    assert stopped["losses"] == pytest.approx(want["losses"][:3], rel=LOSS_RTOL)
    assert resumed["losses"] == pytest.approx(want["losses"], rel=LOSS_RTOL)
    assert resumed["learning_rates"] == pytest.approx(want["learning_rates"], rel=1e-9)
    assert resumed["num_tokens"] == want["num_tokens"]
    a, b = saved_weights(tmp_path), saved_weights(single_packed[1])
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= WEIGHT_ATOL


@needs_fsdp2
def test_fsdp2_nan_on_one_rank_stops_every_rank(tiny_llama_path, tmp_path):
    """Rank 1's loss turns NaN at step 2 (rank 0's stays finite): the sharded gradient norm and the verdict are
    global, so both ranks stop before applying it."""
    result = launch(tiny_llama_path, tmp_path, "--engine", "fsdp2", "--nan_at", "2", "--nan_rank", "1")
    assert result["ended"] == "nonfinite" and result["global_step"] == 1


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param(
            "fsdp2", marks=[needs_fsdp2, pytest.mark.slow]
        ),  # skips as DDP does (zero_grad); its guard is tested above
        pytest.param("zero2", marks=[needs_deepspeed, pytest.mark.slow]),
        pytest.param("zero3", marks=needs_deepspeed),
    ],
)
def test_nan_skip_mode_keeps_the_ddp_schedule(engine, tiny_llama_path, tmp_path):
    """DeepSpeed skips a step with non-finite gradients itself but holds its learning-rate schedule back; sftune's
    skip mode steps it, so the run follows DDP's schedule: same learning rates, losses and weights."""
    flags = ["--nan_at", "2", "--nan_rank", "1", "--on_nonfinite", "skip"]
    ddp = launch(tiny_llama_path, tmp_path / "ddp", "--engine", "ddp", *flags)
    other = launch(tiny_llama_path, tmp_path / engine, "--engine", engine, *flags)
    assert ddp["skipped"] == other["skipped"] == 1
    assert_same_run(other, ddp, tmp_path / engine, tmp_path / "ddp")


def test_fsdp_where_accelerate_cannot_run_it_says_what_runs_instead(tiny_llama_path, tmp_path):
    """Without the tests' shim, accelerate drops FSDP on CPUs: the run says so, and names DDP."""
    result = launch(tiny_llama_path, tmp_path, "--engine", "fsdp2", "--steps", "1", "--no_shim")
    assert result["engine"] == "ddp"
    assert "FSDP was asked for" in result["log"] and "training with DDP instead" in result["log"]


def test_fsdp2_asked_where_the_installed_libraries_train_fsdp1_only_is_an_error(tmp_path):
    from sftune import SFTConfig

    def config():
        return SFTConfig(output_dir=str(tmp_path), fsdp="full_shard", fsdp_config={"fsdp_version": 2},
                         report_to="none", use_cpu=True)  # fmt: skip

    reason = fsdp2_unavailable()
    if reason is None:  # transformers files the key under "version" (it strips the "fsdp_" prefix)
        assert config().fsdp_config["version"] == 2
    else:
        with pytest.raises(ValueError, match=f"asks for FSDP2.*{reason}.*leave the version out"):
            config()


def test_a_save_that_wrote_no_weights_fails_naming_the_fix(tmp_path):
    from sftune.trainers.sft import check_weights_written

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="wrote no model weights.*FULL_STATE_DICT.*stage3_gather_16bit"):
        check_weights_written(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    check_weights_written(tmp_path)
