"""TRL's import paths, with `trl` replaced by `sftune`."""

from __future__ import annotations

from datasets import Dataset
from transformers import AutoTokenizer


def test_trl_import_paths_resolve_to_sftunes_objects():
    import sftune
    from sftune.data.constant_length import ConstantLengthDataset as Home
    from sftune.models.utils import ChatMlSpecialTokens, setup_chat_format
    from sftune.trainer import ConstantLengthDataset, DataCollatorForCompletionOnlyLM, SFTConfig, SFTTrainer
    from sftune.trainer.utils import get_kbit_device_map, get_peft_config, get_quantization_config

    assert ConstantLengthDataset is Home and SFTTrainer is sftune.SFTTrainer and SFTConfig is sftune.SFTConfig
    assert DataCollatorForCompletionOnlyLM is sftune.DataCollatorForCompletionOnlyLM
    assert setup_chat_format is sftune.setup_chat_format and get_peft_config is sftune.get_peft_config
    assert get_quantization_config is sftune.get_quantization_config
    assert get_kbit_device_map is sftune.get_kbit_device_map
    tokens = ChatMlSpecialTokens()
    assert (tokens.bos_token, tokens.eos_token, tokens.assistant) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_start|>assistant",
    )


def test_extras_dataset_formatting(tiny_llama2_tokenizer_path):
    from sftune.extras.dataset_formatting import get_formatting_func_from_dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama2_tokenizer_path)
    pairs = Dataset.from_list([{"prompt": "What is 2+2?", "completion": "4"}])
    turns = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    expected = tokenizer.apply_chat_template(turns, tokenize=False)
    func = get_formatting_func_from_dataset(pairs, tokenizer)
    assert func(pairs[0]) == expected and func(pairs[0:1]) == [expected]
    for field in ("messages", "conversations"):
        chats = Dataset.from_list([{field: turns}])
        func = get_formatting_func_from_dataset(chats, tokenizer)
        assert func(chats[0]) == expected and func(chats[0:1]) == [expected]
    assert get_formatting_func_from_dataset(Dataset.from_list([{"text": "x"}]), tokenizer) is None
