"""Dataset preparation: every format becomes input_ids + a loss mask that is exact to the token."""

from __future__ import annotations

import pytest
from datasets import Dataset, IterableDataset
from transformers import AutoTokenizer

from sftune.data.formats import DatasetFormatError
from sftune.data.tokenize import TokenizeOptions, prepare_dataset

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, I think."},
]


def trained_runs(tokenizer, row) -> list[str]:
    """The decoded text of each maximal run of trained tokens."""
    runs, current = [], []
    for token, trained in zip(row["input_ids"], row["loss_mask"], strict=True):
        if trained:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def prepare(rows, tokenizer, **options):
    options.setdefault("max_length", 512)
    return prepare_dataset(Dataset.from_list(rows), tokenizer, TokenizeOptions(**options))


@pytest.fixture(scope="module")
def chatml(tiny_chatml_tokenizer_path):
    return AutoTokenizer.from_pretrained(tiny_chatml_tokenizer_path)


@pytest.fixture(scope="module")
def llama2(tiny_llama2_tokenizer_path):
    return AutoTokenizer.from_pretrained(tiny_llama2_tokenizer_path)


@pytest.fixture(scope="module")
def plain(tiny_tokenizer_path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_path)


@pytest.mark.parametrize("template", ["chatml", "llama2"])
def test_assistant_only_mask_is_exactly_the_assistant_turns(template, request):
    tokenizer = request.getfixturevalue(template)
    row = prepare([{"messages": CONVERSATION}], tokenizer, assistant_only_loss=True)[0]
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    # Expected spans from the template itself: the text each assistant turn adds after the generation prompt, up to
    # and including its end-of-turn token (the newline the template puts after that token is not the reply).
    eos = tokenizer.eos_token
    expected = []
    for i, message in enumerate(CONVERSATION):
        if message["role"] == "assistant":
            before = tokenizer.apply_chat_template(CONVERSATION[:i], tokenize=False, add_generation_prompt=True)
            through = tokenizer.apply_chat_template(CONVERSATION[: i + 1], tokenize=False)
            assert full.startswith(through)
            added = through[len(before) :]
            expected.append(added[: added.rindex(eos) + len(eos)])
    assert trained_runs(tokenizer, row) == expected
    assert all(message["content"] in span for message, span in zip(CONVERSATION[2::2], expected, strict=True))
    assert tokenizer.decode(row["input_ids"]) == full
    # The end-of-turn marker is trained, so the model learns to stop.
    assert all(eos in span for span in expected)


def test_conversation_trains_on_everything_by_default(chatml):
    row = prepare([{"messages": CONVERSATION}], chatml)[0]
    assert all(row["loss_mask"])


def test_prompt_completion_trains_only_on_completion_plus_eos(plain):
    row = prepare([{"prompt": "Question: two plus two?", "completion": " Four."}], plain)[0]
    assert trained_runs(plain, row) == [" Four." + plain.eos_token]
    assert plain.decode(row["input_ids"]) == "Question: two plus two? Four." + plain.eos_token
    everything = prepare([{"prompt": "Q?", "completion": " A."}], plain, completion_only_loss=False)[0]
    assert all(everything["loss_mask"])


def test_conversational_prompt_completion(chatml):
    rows = [{"prompt": CONVERSATION[:2], "completion": [{"role": "assistant", "content": "Four."}]}]
    row = prepare(rows, chatml)[0]
    assert trained_runs(chatml, row) == ["Four.<|im_end|>"]


def test_plain_text_gets_eos_and_is_all_trained(plain):
    row = prepare([{"text": "hello world"}], plain)[0]
    assert plain.decode(row["input_ids"]) == "hello world" + plain.eos_token
    assert all(row["loss_mask"])
    already = prepare([{"text": "hello world" + plain.eos_token}], plain)[0]
    assert already["input_ids"] == row["input_ids"]


def test_custom_text_field(plain):
    row = prepare([{"body": "some words"}], plain, text_field="body")[0]
    assert plain.decode(row["input_ids"]).startswith("some words")


def test_formatting_func_per_example_and_batched_give_the_same_tokens(plain):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]

    def per_example(example):
        return f"### Question: {example['question']}\n ### Answer: {example['answer']}"

    def batched(batch):
        return [
            f"### Question: {batch['question'][i]}\n ### Answer: {batch['answer'][i]}"
            for i in range(len(batch["question"]))
        ]

    data = Dataset.from_list(rows)
    options = TokenizeOptions(max_length=512)
    one = prepare_dataset(data, plain, options, formatting_func=per_example)
    many = prepare_dataset(data, plain, options, formatting_func=batched)
    assert one["input_ids"] == many["input_ids"]
    assert plain.decode(one[3]["input_ids"]) == "### Question: q3\n ### Answer: a3" + plain.eos_token


def test_pretokenized_rows_pass_through(plain):
    rows = [{"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]}]
    row = prepare(rows, plain)[0]
    assert row == {"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]}


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_keeps_the_configured_side(plain, mode):
    text = " ".join(f"w{i}" for i in range(200))
    full = prepare([{"text": text}], plain, max_length=None)[0]["input_ids"]
    cut = prepare([{"text": text}], plain, max_length=16, truncation_mode=mode)[0]["input_ids"]
    assert cut == (full[:16] if mode == "keep_start" else full[-16:])


def test_streaming_dataset_is_prepared_lazily(plain):
    stream = IterableDataset.from_generator(lambda: ({"text": f"row {i}"} for i in range(3)))
    prepared = prepare_dataset(stream, plain, TokenizeOptions(max_length=64))
    rows = list(prepared)
    assert len(rows) == 3 and plain.decode(rows[2]["input_ids"]) == "row 2" + plain.eos_token


# --------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the row, the column and the fix, before any training.
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "needles"),
    [
        ([{"body": "x"}], ["columns ['body']", "dataset_text_field", "formatting_func"]),
        ([{"text": ["a", "b"]}], ["Row 0", "'text'", "expected a string, got list"]),
        ([{"text": "ok"}, {"text": ""}], ["Row 1", "empty"]),
        (
            [{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
            ["Row 0", "message 0", "'human'", "'user'"],
        ),
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}],
            ["Row 0", "message 1", "'content' is missing"],
        ),
        ([{"messages": []}], ["Row 0", "'messages'", "empty list"]),
        ([{"prompt": "a", "completion": 3}], ["Row 0", "'prompt' and 'completion'"]),
    ],
)
def test_bad_rows_are_named(chatml, rows, needles):
    with pytest.raises(DatasetFormatError) as error:
        prepare(rows, chatml)
    for needle in needles:
        assert needle in str(error.value)


def test_empty_dataset_is_refused(plain):
    with pytest.raises(DatasetFormatError, match="empty"):
        prepare_dataset(Dataset.from_dict({"text": []}), plain, TokenizeOptions(max_length=8))


def test_conversation_without_chat_template_names_the_fix(plain):
    with pytest.raises(DatasetFormatError, match="setup_chat_format"):
        prepare([{"messages": CONVERSATION}], plain)


def test_prompt_longer_than_max_length_is_refused(plain):
    rows = [{"prompt": "short", "completion": " ok"}, {"prompt": "word " * 100, "completion": " ok"}]
    with pytest.raises(DatasetFormatError, match=r"Row 1.*max_length=16"):
        prepare(rows, plain, max_length=16)


def test_turns_as_examples_with_max_length_keep_every_turn_and_count_truncation_per_example(chatml, caplog):
    """One conversation row gives one example per assistant turn; fitting them to max_length must follow the
    examples, not the dataset rows (the two counts differ here)."""
    rows = prepare([{"messages": CONVERSATION}], chatml, assistant_only_loss=True, assistant_turns_as_examples=True)
    assert len(rows) == 2
    assert [trained_runs(chatml, row)[-1] for row in rows] == ["Four.<|im_end|>", "Six, I think.<|im_end|>"]
    longest = max(len(row["input_ids"]) for row in rows)
    with caplog.at_level("WARNING"):
        cut = prepare(
            [{"messages": CONVERSATION}],
            chatml,
            assistant_only_loss=True,
            assistant_turns_as_examples=True,
            max_length=longest - 1,
            truncation_mode="keep_end",
        )
    assert len(cut) == 2 and max(len(row["input_ids"]) for row in cut) == longest - 1
    assert "dropped 1 tokens from 1 examples" in caplog.text
