"""Small templates written here, one per class of template that trains something other than inference, each
checked with the rules of test_chat_templates (expected spans from the template's own inference prompts); and the
dataset-level guarantees: the log line, the opt-out error, a dataset with nothing to train."""

from __future__ import annotations

import logging

import pytest
from datasets import Dataset

from sftune.data import render
from sftune.data.formats import DatasetFormatError
from sftune.data.tokenize import TokenizeOptions, prepare_dataset
from tests import real_tokenizers
from tests.data import test_chat_templates as shared
from tests.data.test_chat_templates import CASES, assistant, check_rows, prepare, user

CHATML_TURN = "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
TEMPLATES = {
    # Class 1/2: the generation prompt forces `<think>\n`, which the rendered replies lack.
    "prefill": (
        "{% for m in messages %}" + CHATML_TURN + "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}",
        "<|im_start|>assistant\n",
        ["<|im_end|>"],
    ),
    # Class 4: the system prompt is rendered only inside the last user turn (Mistral v0.3, Mistral-Nemo).
    "system_in_last_user": (
        "{% set system = messages[0].content if messages[0].role == 'system' else '' %}"
        "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}"
        "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in messages %}{% if m.role == 'user' %}{{ '<|im_start|>user\\n' }}"
        "{% if loop.index0 == ns.last and system %}{{ system + '\\n\\n' }}{% endif %}{{ m.content + '<|im_end|>\\n' }}"
        "{% elif m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "<|im_start|>assistant\n",
        ["<|im_end|>"],
    ),
    # Class 3: no end-of-turn token: the next role's header ends a reply (GLM), `<|observation|>` after a call.
    "header_stops": (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ '<|observation|>\\n' + m.content }}"
        "{% elif m.role == 'assistant' and m.tool_calls %}{{ '<|assistant|>\\n' + m.tool_calls[0].function.name }}"
        "{% else %}{{ '<|' + m.role + '|>\\n' + m.content }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
        "<|assistant|>\n",
        ["<|user|>", "<|observation|>", "<|endoftext|>"],
    ),
    # Class 3: an end-of-text token appended after the last turn (Phi-4-mini), never generated after a reply.
    "trailing_eot": (
        "{% for m in messages %}{{ '<|' + m.role + '|>' + m.content + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ '<|endoftext|>' }}{% endif %}",
        "<|assistant|>",
        ["<|end|>", "<|endoftext|>"],
    ),
    # Class 4: past reasoning dropped, the last turn's kept (Qwen3, DeepSeek-R1).
    "drops_reasoning": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
        "{% if loop.last and m.reasoning_content %}{{ '<think>' + m.reasoning_content + '</think>' }}{% endif %}"
        "{{ m.content + '<|im_end|>\\n' }}{% else %}" + CHATML_TURN + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "<|im_start|>assistant\n",
        ["<|im_end|>"],
    ),
}
EXTRA_SPECIALS = ["<|user|>", "<|assistant|>", "<|system|>", "<|observation|>", "<|end|>", "<|tool|>"]
SYSTEM = {"role": "system", "content": "Be brief."}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATIONS = {
    "single_turn": CASES["single_turn"],
    "three_turns_system": CASES["three_turns_system"],
    "three_turns": CASES["three_turns"],
    "leading_newlines_and_spaces": CASES["leading_newlines_and_spaces"],
    "header_like_reply": CASES["header_like_reply"],
    "reasoning": [SYSTEM, *CASES["reasoning"]],
    "tool_call": [
        user("Weather in Paris?"),
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "21 degrees", "name": "get_weather"},
        assistant("It is 21 degrees."),
    ],
}


@pytest.fixture(scope="module")
def tokenizer_for():
    made = {}

    def get(name):
        if name not in made:
            tokenizer = real_tokenizers.load("qwen2_5")  # a private copy: its template and specials are ours
            tokenizer.add_special_tokens({"additional_special_tokens": EXTRA_SPECIALS})
            tokenizer.chat_template, header, stops = TEMPLATES[name]
            shared.HEADER[name], shared.STOP[name] = header, stops
            made[name] = tokenizer
        return made[name]

    return get


@pytest.mark.parametrize("case", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_each_class_trains_every_turn_as_at_inference(tokenizer_for, name, case):
    tokenizer = tokenizer_for(name)
    messages = CONVERSATIONS[case]
    for stops in (None, tuple(shared.STOP[name])):  # from the template's own probes, and as generation_config
        rows = prepare(tokenizer, [{"messages": messages}], assistant_only_loss=True, stop_tokens=stops)
        check_rows(name, tokenizer, messages, rows)
    prompts = [
        tokenizer.apply_chat_template(messages[:t], add_generation_prompt=True, tokenize=False)
        for t in range(len(messages))
        if messages[t]["role"] == "assistant"
    ]
    texts = [tokenizer.decode(row["input_ids"]) for row in rows]
    for prompt in prompts:  # the context of each turn is its inference prompt, prefill included
        assert any(text.startswith(prompt) for text in texts)


def test_prefill_is_context_and_the_header_is_never_trained(tokenizer_for):
    tokenizer = tokenizer_for("prefill")
    rows = prepare(tokenizer, [{"messages": CASES["three_turns"]}], assistant_only_loss=True)
    assert len(rows) == 3  # the whole rendering never shows `<think>\n` before a reply: each turn apart
    for row in rows:
        trained = [t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True) if m]
        text = tokenizer.decode(trained)
        assert "assistant" not in text and "<think>" not in text and text.endswith("<|im_end|>")
        context = tokenizer.decode(row["input_ids"][: row["loss_mask"].index(1)])
        assert context.endswith("<|im_start|>assistant\n<think>\n")


def test_system_prompt_in_the_last_user_turn_is_in_every_turns_context(tokenizer_for):
    tokenizer = tokenizer_for("system_in_last_user")
    rows = prepare(tokenizer, [{"messages": CASES["three_turns_system"]}], assistant_only_loss=True)
    for row in rows:
        context = tokenizer.decode(row["input_ids"][: row["loss_mask"].index(1)])
        assert "Be brief." in context


def test_the_next_roles_header_is_the_stop_token_and_a_tool_call_stops_at_observation(tokenizer_for):
    tokenizer = tokenizer_for("header_stops")
    messages = [*CONVERSATIONS["tool_call"], user("Thanks")]
    rows = prepare(tokenizer, [{"messages": messages}], assistant_only_loss=True)
    runs = [tokenizer.decode(run) for _, run in shared.observed_runs(rows)]
    assert runs == ["get_weather<|observation|>", "It is 21 degrees.<|user|>"]


def test_a_trailing_end_of_text_token_is_not_trained(tokenizer_for):
    tokenizer = tokenizer_for("trailing_eot")
    rows = prepare(tokenizer, [{"messages": CASES["three_turns"]}], assistant_only_loss=True)
    assert len(rows) == 1 and rows[0]["input_ids"][-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert rows[0]["loss_mask"][-1] == 0 and rows[0]["loss_mask"][-2] == 1


def test_stop_tokens_follow_the_generation_config_where_known(tokenizer_for):
    tokenizer = tokenizer_for("header_stops")
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|observation|>")]
    assert render.stop_tokens(tokenizer, {"eos_token_id": ids}) == ("<|user|>", "<|observation|>")
    assert set(render.stop_tokens(tokenizer)) >= {"<|user|>", "<|observation|>"}  # the template's own


def test_one_log_line_counts_the_turns_rendered_apart_and_why(tokenizer_for, caplog):
    tokenizer = tokenizer_for("drops_reasoning")
    rows = [{"messages": CONVERSATIONS["reasoning"]}] * 3 + [{"messages": CASES["three_turns"]}]
    with caplog.at_level(logging.INFO, logger="sftune.data.tokenize"):
        prepared = prepare_dataset(Dataset.from_list(rows), tokenizer, TokenizeOptions(None, assistant_only_loss=True))
    lines = [r.getMessage() for r in caplog.records if "as their own examples" in r.getMessage()]
    assert len(lines) == 1
    assert "6 assistant turns of 3 conversations" in lines[0] and render.REPLY_DIFFERS in lines[0]
    assert len(prepared) == 3 * 3 + 1


def test_opting_out_errors_before_training_naming_row_turn_reason_and_fix(tokenizer_for):
    tokenizer = tokenizer_for("drops_reasoning")
    rows = [{"messages": CASES["three_turns"]}, {"messages": CONVERSATIONS["reasoning"]}]
    options = TokenizeOptions(None, assistant_only_loss=True, inexact_turns="error")
    with pytest.raises(DatasetFormatError) as error:
        prepare_dataset(Dataset.from_list(rows), tokenizer, options)
    message = str(error.value)
    assert "Row 1" in message and "message 2 (assistant)" in message and render.REPLY_DIFFERS in message
    assert "inexact_turns='split'" in message


def test_a_dataset_with_nothing_to_train_is_refused_before_training(tokenizer_for):
    tokenizer = tokenizer_for("drops_reasoning")
    rows = [{"messages": CASES["no_assistant"]}] * 2
    with pytest.raises(DatasetFormatError, match="No row of the train dataset has a single token to train on"):
        prepare_dataset(Dataset.from_list(rows), tokenizer, TokenizeOptions(None, assistant_only_loss=True))
    kept = prepare_dataset(
        Dataset.from_list([*rows, {"messages": CASES["single_turn"]}]),
        tokenizer,
        TokenizeOptions(None, assistant_only_loss=True),
    )
    assert len(kept) == 3


def test_a_renderer_in_use_survives_pickling(tokenizer_for):
    """datasets pickles map functions (fingerprints, worker processes, streamed generators), and those reach the
    cached renderers; transformers' compiled template cannot be pickled, so a renderer is rebuilt instead."""
    import pickle

    from datasets.fingerprint import Hasher

    tokenizer = tokenizer_for("prefill")
    messages = [user("2+2?"), assistant("4")]
    prepare(tokenizer, [{"messages": messages}], assistant_only_loss=True)  # leaves a cached renderer behind
    renderer = render.renderer_for(tokenizer)
    copy = pickle.loads(pickle.dumps(renderer))
    prepared = copy.prepare(messages)
    assert copy.text(prepared, original=messages) == tokenizer.apply_chat_template(messages, tokenize=False)
    # What datasets does to a map function that calls it: the process's cache of renderers (every tokenizer
    # rendered with so far) must not be part of it, or each map pickles all of them (minutes over a test suite).
    assert Hasher.hash(render.renderer_for) == Hasher.hash(render.renderer_for)
    cached = pickle.loads(pickle.dumps(render._RENDERERS))
    assert len(render._RENDERERS) >= 1 and len(cached) == 0
