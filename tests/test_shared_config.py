"""SFTConfig and IterativeSFTConfig declare and check the fields they share once (SharedTrainingConfig)."""

from __future__ import annotations

import dataclasses

import pytest

from sftune.config import IterativeSFTConfig, SFTConfig, SharedTrainingConfig, TrainingArgumentsWithLegacyNames


def own_fields(cls: type) -> set[str]:
    """Fields a class declares itself (its own annotations), not inherited ones."""
    return set(cls.__dict__.get("__annotations__", {}))


def test_fields_both_configs_add_to_training_arguments_are_declared_once():
    base = {f.name for f in dataclasses.fields(TrainingArgumentsWithLegacyNames)}  # + transformers 4.x names
    shared = {f.name for f in dataclasses.fields(SFTConfig)} & {f.name for f in dataclasses.fields(IterativeSFTConfig)}
    added = shared - base
    assert added and added <= own_fields(SharedTrainingConfig)
    # Redeclared in a config only to keep TRL's own default (or help text) for it.
    assert own_fields(IterativeSFTConfig) & own_fields(SharedTrainingConfig) == {"truncation_mode"}
    assert own_fields(SFTConfig) & own_fields(SharedTrainingConfig) == {"max_length"}


def test_each_config_keeps_trls_defaults(tmp_path):
    sft, iterative = SFTConfig(output_dir=str(tmp_path)), IterativeSFTConfig(output_dir=str(tmp_path))
    assert (sft.truncation_mode, iterative.truncation_mode) == ("keep_start", "keep_end")
    for name in ("on_nonfinite", "loss_chunk_size", "logging_steps", "average_tokens_across_devices"):
        assert getattr(sft, name) == getattr(iterative, name)


@pytest.mark.parametrize("config_class", [SFTConfig, IterativeSFTConfig])
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("on_nonfinite", "ignore", "on_nonfinite must be 'stop' or 'skip'"),
        ("truncation_mode", "middle", "truncation_mode must be 'keep_start' or 'keep_end'"),
        ("max_length", 0, "max_length must be >= 1"),
        ("loss_chunk_size", -1, "loss_chunk_size must be >= 0"),
        ("model_init_kwargs", "{not json", "model_init_kwargs must be a dict or a JSON object string"),
    ],
)
def test_shared_fields_are_checked_the_same_way(config_class, field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        config_class(output_dir=str(tmp_path), **{field: value})
