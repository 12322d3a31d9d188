"""Faults during training: NaN, kill -9 mid-save, Ctrl-C, a full disk, non-finite weights, RNG leaks."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from sftune.errors import CheckpointSaveError, NonFiniteTrainingError, TrainingInterrupted
from sftune.models import NonFiniteWeightsError, load_model
from sftune.trainers.checkpoints import STAGING_DIR, is_complete_checkpoint, newest_complete_checkpoint
from tests.fault_worker import MAX_STEPS, make_trainer

ROOT = Path(__file__).resolve().parents[1]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("checkpoint-*"))


@pytest.fixture(scope="module")
def reference(tiny_llama_path, tmp_path_factory):
    """The uninterrupted run every resumed run must match exactly."""
    trainer = make_trainer(str(tiny_llama_path), str(tmp_path_factory.mktemp("reference")))
    trainer.train()
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}, trainer.num_tokens_trained()


# --------------------------------------------------------------------------------------------------------------
# NaN / inf
# --------------------------------------------------------------------------------------------------------------


def poison_forward(model, on_calls: set[int]):
    """Make the final norm's output NaN on the given (1-based) training forward passes."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if not module.training:
            return output
        calls["n"] += 1
        return output * float("nan") if calls["n"] in on_calls else output

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.norm.register_forward_hook(hook)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_llama_path, tmp_path):
    trainer = make_trainer(str(tiny_llama_path), str(tmp_path), gradient_accumulation_steps=1, save_steps=1)
    poison_forward(trainer.model, on_calls={3})
    with pytest.raises(NonFiniteTrainingError, match=r"step 3.*loss is nan.*learning rate") as caught:
        trainer.train()
    assert "checkpoint-2" in str(caught.value)
    assert checkpoints(tmp_path) == ["checkpoint-1", "checkpoint-2"]  # nothing saved from the bad step
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the bad step was not applied


def test_nan_steps_can_be_skipped_and_are_counted(tiny_llama_path, tmp_path):
    trainer = make_trainer(
        str(tiny_llama_path), str(tmp_path), gradient_accumulation_steps=1, save_strategy="no", on_nonfinite="skip"
    )
    poison_forward(trainer.model, on_calls={2, 4})
    trainer.train()
    assert trainer.state.global_step == MAX_STEPS
    assert trainer.skipped_nonfinite_steps == 2
    assert trainer.state.log_history[-2]["skipped_nonfinite_steps"] == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_infinite_gradient_norm_stops(tiny_llama_path, tmp_path):
    class InfGrad(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                next(model.parameters()).grad[0, 0] = float("inf")

    trainer = make_trainer(str(tiny_llama_path), str(tmp_path), save_strategy="no")
    trainer.callback_handler.callbacks.insert(0, InfGrad())  # before the guard
    with pytest.raises(NonFiniteTrainingError, match="step 2.*gradient norm is inf"):
        trainer.train()


def test_non_finite_weights_are_refused_at_load(tiny_llama_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "bad")
    with pytest.raises(NonFiniteWeightsError, match=r"bad: weight model\.layers\.0\.mlp\.up_proj\.weight holds 1 NaN"):
        load_model(tmp_path / "bad")


def test_resuming_from_a_checkpoint_with_nan_weights_is_refused(tiny_llama_path, tmp_path):
    trainer = make_trainer(str(tiny_llama_path), str(tmp_path), max_steps=2, save_steps=2)
    trainer.train()
    weights = tmp_path / "checkpoint-2" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    state["lm_head.weight"][1, 1] = float("inf")
    save_file(state, weights, metadata={"format": "pt"})
    resumed = make_trainer(str(tiny_llama_path), str(tmp_path), max_steps=4, save_steps=2)
    with pytest.raises(NonFiniteWeightsError, match="checkpoint-2: weight lm_head.weight"):
        resumed.train(resume_from_checkpoint=True)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: kill -9 mid-save, resume, full disk
# --------------------------------------------------------------------------------------------------------------


def run_worker_and_kill_mid_save(model_path, output_dir: Path, kill_at_save: int, delay: float = 0.0) -> int:
    """Start a slow-saving run; SIGKILL it `delay` seconds into its `kill_at_save`-th checkpoint save."""
    command = [sys.executable, "-m", "tests.fault_worker", str(model_path), str(output_dir), "--slow_save", "3"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    saves = 0
    for line in process.stdout:
        if line.startswith("SAVING"):
            saves += 1
            if saves == kill_at_save:
                time.sleep(delay)
                process.send_signal(signal.SIGKILL)
                break
    process.wait(timeout=60)
    return process.returncode


def test_kill_during_save_resumes_from_the_newest_complete_checkpoint_exactly(
    tiny_llama_path, tmp_path, reference, caplog
):
    returncode = run_worker_and_kill_mid_save(tiny_llama_path, tmp_path, kill_at_save=2)
    assert returncode == -signal.SIGKILL
    assert checkpoints(tmp_path) == ["checkpoint-2"]  # checkpoint-4 was being staged, never published
    assert (tmp_path / STAGING_DIR / "checkpoint-4").is_dir()

    resumed = make_trainer(str(tiny_llama_path), str(tmp_path))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == MAX_STEPS
    assert_same_weights(resumed.model.state_dict(), reference[0])
    assert not (tmp_path / STAGING_DIR).exists()  # the re-save cleared the leftover
    assert checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_incomplete_checkpoints_are_skipped_with_a_warning(tiny_llama_path, tmp_path, caplog):
    trainer = make_trainer(str(tiny_llama_path), str(tmp_path), max_steps=2)
    trainer.train()
    half = tmp_path / "checkpoint-4"  # e.g. written by an older version that was killed mid-save
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"")
    assert newest_complete_checkpoint(tmp_path) == (str(tmp_path / "checkpoint-2"), [str(half)])
    resumed = make_trainer(str(tiny_llama_path), str(tmp_path), max_steps=4)
    with pytest.raises(ValueError, match="checkpoint-4 is incomplete.*Resume from .*checkpoint-2 instead"):
        resumed.train(resume_from_checkpoint=str(half))
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    assert "Skipping incomplete checkpoints" in caplog.text and "checkpoint-4" in caplog.text
    assert resumed.state.global_step == 4 and is_complete_checkpoint(tmp_path / "checkpoint-4")


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 123 vs 45"),
    ],
    ids=["enospc", "torch-zip-writer"],
)
def test_disk_full_during_save_says_so_and_leaves_no_half_checkpoint(tiny_llama_path, tmp_path, monkeypatch, failure):
    from transformers import Trainer

    def full_disk(self, output_dir):
        Path(output_dir, "optimizer.pt").write_bytes(b"partial")
        raise failure

    trainer = make_trainer(str(tiny_llama_path), str(tmp_path), max_steps=2)
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full_disk)
    with pytest.raises(CheckpointSaveError, match=f"disk is full: could not save checkpoint-2 to {tmp_path}"):
        trainer.train()
    assert checkpoints(tmp_path) == []
    assert not (tmp_path / STAGING_DIR).exists()


def test_num_tokens_is_restored_on_resume(tiny_llama_path, tmp_path, reference):
    trainer = make_trainer(str(tiny_llama_path), str(tmp_path), max_steps=2)
    trainer.train()
    assert json.loads((tmp_path / "checkpoint-2" / "sftune_state.json").read_text())["num_tokens"] > 0
    resumed = make_trainer(str(tiny_llama_path), str(tmp_path))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.num_tokens_trained() == reference[1]
    assert resumed.state.log_history[-2]["num_tokens"] == reference[1]


# --------------------------------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------------------------------


class CtrlC(TrainerCallback):
    """Press Ctrl-C `times` times during optimizer step `at_step` (1-based)."""

    def __init__(self, at_step: int, times: int = 1) -> None:
        self.at_step, self.times = at_step, times

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.at_step:
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(tiny_llama_path, tmp_path, reference, capsys):
    # Whatever handler the suite started with (Python's default, or SIG_IGN in a background job) comes back.
    before = signal.getsignal(signal.SIGINT)
    trainer = make_trainer(str(tiny_llama_path), str(tmp_path), callbacks=[CtrlC(at_step=3)])
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3.*resume_from_checkpoint") as caught:
        trainer.train()
    assert caught.value.checkpoint == str(tmp_path / "checkpoint-3")
    assert checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-3"]
    assert "Press Ctrl-C again" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) == before  # handler removed after training

    resumed = make_trainer(str(tiny_llama_path), str(tmp_path))
    resumed.train(resume_from_checkpoint=True)
    assert_same_weights(resumed.model.state_dict(), reference[0])


def test_second_ctrl_c_stops_at_once_without_saving(tiny_llama_path, tmp_path):
    before = signal.getsignal(signal.SIGINT)
    trainer = make_trainer(str(tiny_llama_path), str(tmp_path), callbacks=[CtrlC(at_step=3, times=2)])
    with pytest.raises(KeyboardInterrupt) as caught:
        trainer.train()
    assert not isinstance(caught.value, TrainingInterrupted)
    assert checkpoints(tmp_path) == ["checkpoint-2"]
    assert signal.getsignal(signal.SIGINT) == before


# --------------------------------------------------------------------------------------------------------------
# Reproducibility: measurement never touches the training RNG; adapters come from args.seed
# --------------------------------------------------------------------------------------------------------------


def test_measuring_mfu_does_not_touch_the_global_rng():
    from sftune.throughput import ThroughputMeter, peak_flops

    peak_flops.cache_clear()
    before = torch.random.get_rng_state()
    meter = ThroughputMeter(flops_per_token=1000)
    meter.last_time -= 1.0
    assert "mfu" in meter.measure(100)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_logging_steps_do_not_change_a_run_with_dropout(tiny_llama_path, tmp_path):
    from sftune.throughput import peak_flops

    weights = []
    for logging_steps in (1, 100):
        peak_flops.cache_clear()  # the first log of a process measures the peak
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, attention_dropout=0.3)
        trainer = make_trainer(model, str(tmp_path / str(logging_steps)), max_steps=3, logging_steps=logging_steps,
                               save_strategy="no", gradient_accumulation_steps=1)  # fmt: skip
        trainer.train()
        weights.append(trainer.model.state_dict())
    assert_same_weights(*weights)


def test_lora_adapters_are_initialised_from_args_seed(tiny_llama_path, tmp_path):
    from peft import LoraConfig

    adapters = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # whatever the user's code drew before
        config = LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights="gaussian"
        )
        trainer = make_trainer(str(tiny_llama_path), str(tmp_path), save_strategy="no")
        trainer = type(trainer)(
            str(tiny_llama_path), args=trainer.args, train_dataset=trainer.train_dataset, peft_config=config
        )
        adapters.append({k: v for k, v in trainer.model.state_dict().items() if "lora_" in k})
    assert adapters[0] and all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


if os.name != "posix":  # SIGKILL and raise_signal(SIGINT) semantics are POSIX
    pytestmark = pytest.mark.skip("POSIX only")


def test_iterative_trainer_checkpoints_are_atomic_too(tiny_llama_path, tmp_path, monkeypatch):
    from transformers import Trainer

    from sftune import IterativeSFTConfig, IterativeSFTTrainer

    args = IterativeSFTConfig(output_dir=str(tmp_path), save_strategy="steps", save_steps=1, report_to="none",
                              per_device_train_batch_size=2, disable_tqdm=True)  # fmt: skip
    trainer = IterativeSFTTrainer(str(tiny_llama_path), args=args)
    trainer.step(texts=["a b c d", "e f g"])
    assert checkpoints(tmp_path) == ["checkpoint-1"]

    def killed_mid_save(self, output_dir):
        raise KeyboardInterrupt  # stands in for any interruption between the weights and the trainer state

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", killed_mid_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.step(texts=["a b c d", "e f g"])
    assert checkpoints(tmp_path) == ["checkpoint-1"]
    assert newest_complete_checkpoint(tmp_path) == (str(tmp_path / "checkpoint-1"), [])


def test_ctrl_c_from_the_command_line_saves_prints_how_to_resume_and_exits_130(tiny_llama_path, tmp_path, monkeypatch,
                                                                                capsys):  # fmt: skip
    from sftune.cli import main
    from sftune.trainers.sft import SFTTrainer
    from tests.test_bad_inputs import GOOD_ROW, cli_argv, write

    data = write(tmp_path / "d.jsonl", GOOD_ROW * 8)
    original = SFTTrainer.training_step

    def press_ctrl_c_on_step_2(self, *args, **kwargs):
        if self.state.global_step == 1:
            signal.raise_signal(signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", press_ctrl_c_on_step_2)
    argv = cli_argv(["--max_steps", "4", "--per_device_train_batch_size", "2", "--save_strategy", "no"], tmp_path,
                    tiny_llama_path, data)  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 130 and "Traceback" not in err
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert f"interrupted at step 2; saved a resumable checkpoint to {checkpoint}" in err
    assert f"--resume_from_checkpoint {checkpoint}" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()  # the interrupted run is not the final model

    monkeypatch.setattr(SFTTrainer, "training_step", original)
    main(argv + ["--resume_from_checkpoint", str(checkpoint)])
    assert "steps              4" in capsys.readouterr().out


def test_lora_with_dropout_resumes_exactly(tiny_llama_path, tmp_path):
    from peft import LoraConfig

    from sftune.throughput import peak_flops

    def run(folder: str, resume: bool = False, callbacks=None):
        peak_flops.cache_clear()  # as in a fresh process: the first log measures the machine
        lora = LoraConfig(r=4, lora_dropout=0.3, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        trainer = make_trainer(str(tiny_llama_path), str(tmp_path / folder), callbacks=callbacks, peft_config=lora,
                               max_steps=4, learning_rate=1e-2)  # fmt: skip
        trainer.train(resume_from_checkpoint=resume or None)
        return {k: v for k, v in trainer.model.state_dict().items() if "lora_" in k}

    full = run("full")
    with pytest.raises(TrainingInterrupted):
        run("cut", callbacks=[CtrlC(at_step=2)])
    assert_same_weights(run("cut", resume=True), full)


def test_iterative_step_stops_on_nan_and_can_skip(tiny_llama_path, tmp_path):
    """IterativeSFTTrainer.step() runs its own optimizer loop; the same guard checks it."""
    from sftune import IterativeSFTConfig, IterativeSFTTrainer

    texts = ["one two three", "four five six seven"]
    args = IterativeSFTConfig(output_dir=str(tmp_path / "a"), report_to="none", save_strategy="no")
    trainer = IterativeSFTTrainer(str(tiny_llama_path), args=args)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    poison_forward(trainer.model, on_calls={1})
    with pytest.raises(NonFiniteTrainingError, match=r"step 1.*loss is nan"):
        trainer.step(texts=texts)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))

    args = IterativeSFTConfig(output_dir=str(tmp_path / "b"), report_to="none", save_strategy="no", on_nonfinite="skip")
    trainer = IterativeSFTTrainer(str(tiny_llama_path), args=args)
    poison_forward(trainer.model, on_calls={1})
    trainer.step(texts=texts)  # skipped, counted
    stats = trainer.step(texts=texts)  # trains
    assert trainer.nonfinite_guard.skipped_steps == 1 and stats["optimizer_steps"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
