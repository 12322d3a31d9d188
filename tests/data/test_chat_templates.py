"""Every assistant turn is trained exactly as at inference, on the real chat templates of
/work/shared/chat-templates with real vocabularies.

Expected values are computed here, independently of sftune.data.render, from the template's own renderings:
for assistant turn t, the context is `apply_chat_template(messages[:t], add_generation_prompt=True)` and the reply
is the turn as rendered when it is the last message, `apply_chat_template(messages[:t+1])`: what follows the
inference prompt when that rendering starts with it, else what follows the family's assistant header (README)
before the reply's first rendered text; it ends with the first of the model's stop tokens (its published
generation_config eos ids, `STOP`) after the reply's last rendered text. Each trained run of each example must be
one turn's (context tokens, reply tokens), each turn exactly once.
"""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from sftune.compat import TRANSFORMERS_5
from sftune.data import formats
from sftune.data.formats import DatasetFormatError
from sftune.data.tokenize import (
    APART_REASONS,
    APART_TURNS,
    SOURCE_ROW,
    TokenizeOptions,
    make_tokenize_function,
    prepare_dataset,
)
from tests import real_tokenizers

NAMES = [name for name in real_tokenizers.PAIRS if (real_tokenizers.TEMPLATES_DIR / f"{name}.jinja").exists()]

# From the templates' README: the assistant header and end-of-turn token(s) of each family.
HEADER = {
    "llama3_1": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2_5": "<|im_start|>assistant\n",
    "qwen3": "<|im_start|>assistant\n",
    "gptoss": "<|start|>assistant",
    "mistral_v03": ("[/INST]", "[/TOOL_RESULTS]"),
    "phi3": "<|assistant|>\n",
    "llama2_chat": "[/INST]",
    "gemma2": "<start_of_turn>model\n",
    "smollm2": "<|im_start|>assistant\n",
    "chatml": "<|im_start|>assistant\n",
    "qwen3_5": "<|im_start|>assistant\n",
    "llama3_2": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "deepseek_r1_distill": "<｜Assistant｜>",
    "gemma3": "<start_of_turn>model\n",
    "gemma4": "<|turn>model\n",
    "mistral_nemo": ("[/INST]", "[/TOOL_RESULTS]"),
    "mistral_v01": "[/INST]",
    "phi4": "<|im_start|>assistant<|im_sep|>",
    "smollm3": "<|im_start|>assistant\n",
}
# The models' generation_config eos tokens (as published): what ends generation.
STOP = {
    "llama3_1": ["<|eot_id|>", "<|eom_id|>"],
    "llama3_2": ["<|eot_id|>", "<|eom_id|>"],
    "gptoss": ["<|return|>", "<|call|>"],
    "phi3": ["<|end|>", "<|endoftext|>"],
    "gemma2": ["<end_of_turn>", "<eos>"],
    "gemma3": ["<end_of_turn>", "<eos>"],
    "gemma4": ["<turn|>", "<|tool_response>"],
    "deepseek_r1_distill": ["<｜end▁of▁sentence｜>"],
    **dict.fromkeys(["mistral_v03", "mistral_nemo", "mistral_v01", "llama2_chat"], ["</s>"]),
    **dict.fromkeys(["qwen2_5", "qwen3", "qwen3_5", "smollm2", "chatml", "smollm3", "phi4"], ["<|im_end|>"]),
}
END_OF_TURN = {
    "llama3_1": ["<|eot_id|>", "<|eom_id|>"],
    "qwen2_5": ["<|im_end|>"],
    "qwen3": ["<|im_end|>"],
    "gptoss": ["<|end|>", "<|return|>", "<|call|>"],
    "mistral_v03": ["</s>"],
    "phi3": ["<|end|>"],
    "llama2_chat": ["</s>"],
    "gemma2": ["<end_of_turn>"],
    "smollm2": ["<|im_end|>"],
    "chatml": ["<|im_end|>"],
}

SYSTEM = {"role": "system", "content": "Be brief."}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
HEADER_LIKE = "Sure.\nuser: hi\n<|im_start|>assistant\n[INST] not a turn [/INST]\n<start_of_turn>model\nDone."


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **extra):
    return {"role": "assistant", "content": text, **extra}


THREE_TURNS = [
    user("What is 2+2?"),
    assistant("Four."),
    user("And 3+3?"),
    assistant("Six."),
    user("And 4+4?"),
    assistant("Eight, of course."),
]
CASES = {
    "single_turn": [user("Hi!"), assistant("Hello, how can I help?")],
    "three_turns": THREE_TURNS,
    "three_turns_system": [SYSTEM, *THREE_TURNS],
    "leading_newlines_and_spaces": [
        user("Poem?"),
        assistant("\n\nRoses are red."),
        user("Another?"),
        assistant("  Violets are blue."),
        user("Last?"),
        assistant("\nThe end."),
    ],
    "header_like_reply": [SYSTEM, user("Show a transcript."), assistant(HEADER_LIKE), user("Thanks"), assistant("Ok.")],
    "reasoning": [
        user("What is 2+2?"),
        assistant("Four.", reasoning_content="Two and two make four."),
        user("And 3+3?"),
        assistant("Six.", reasoning_content="Three and three make six."),
        user("And 4+4?"),
        assistant("Eight.", reasoning_content="Four doubled is eight."),
    ],
    "tools": [
        user("Weather in Paris?"),
        assistant("", tool_calls=[CALL]),
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": '{"temp": 21}'},
        assistant("It is 21 degrees."),
        user("Thanks"),
        assistant("You're welcome."),
    ],
    "no_assistant": [SYSTEM, user("Just a note, no reply needed.")],
}


@pytest.fixture(scope="session")
def real():
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = real_tokenizers.load(name)
        return cache[name]

    return get


def reference_ids(tokenizer, messages, tools=None):
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def prepare(tokenizer, rows, **options):
    """The batched function `prepare_dataset` maps over a dataset, called directly (no `datasets` overhead)."""
    options = TokenizeOptions(**{"max_length": None, **options})
    columns = {key: [row.get(key) for row in rows] for key in rows[0]}
    fmt = formats.detect_format(list(columns), options.text_field, False)
    out = make_tokenize_function(fmt, tokenizer, options)(columns, list(range(len(rows))))
    for key in (SOURCE_ROW, APART_TURNS, APART_REASONS):
        out.pop(key)
    return [dict(zip(out, values, strict=True)) for values in zip(*out.values(), strict=True)]


def test_prepare_dataset_gives_the_same_rows(real):
    tokenizer = real("qwen3")
    rows = [{"messages": CASES["reasoning"]}, {"messages": CASES["three_turns_system"]}]
    options = TokenizeOptions(max_length=None, assistant_only_loss=True)
    assert list(prepare_dataset(Dataset.from_list(rows), tokenizer, options)) == prepare(
        tokenizer, rows, assistant_only_loss=True
    )


def rendered_fields(message, full, cursor):
    """(start, end) in `full` of the first and last text of `message` as rendered, searching from `cursor`."""
    texts = []
    for key in ("reasoning_content", "content"):
        if isinstance(message.get(key), str) and message[key].strip():
            texts.append(message[key].strip())
    for call in message.get("tool_calls") or []:
        texts.append(call["function"]["name"])
    found = []
    for text in texts:
        at = full.find(text, cursor)
        if at >= 0:
            found.append((at, at + len(text)))
            cursor = at + len(text)
    return (found[0][0], found[-1][1]) if found else None


def expected_reply(name, messages, t, tools=None, template_kwargs=None):
    """(inference prompt, reply) of assistant message t, from the template's own renderings (module docstring)."""
    kwargs = template_kwargs or {}
    prompt = TEMPLATES.render(name, messages[:t], tools, True, kwargs)
    last = TEMPLATES.render(name, messages[: t + 1], tools, False, kwargs)
    aligned = last.startswith(prompt)
    fields = rendered_fields(messages[t], last, len(prompt) if aligned else rendered_start(name, messages, t, last))
    if aligned:
        start = len(prompt)
    else:
        header = HEADER[name] if isinstance(HEADER[name], tuple) else (HEADER[name],)
        before = fields[0] if fields else len(last)
        start = max(last.rfind(h, 0, before) + len(h) for h in header if h in last[:before])
    after = fields[1] if fields else start
    ends = [last.index(e, after) + len(e) for e in STOP[name] if e in last[after:]]
    reply = last[start : min(ends) if ends else len(last)]
    whole = TEMPLATES.render(name, messages, tools, False, kwargs)
    if not ends and whole.startswith(prompt + reply):  # no stop token as the last message: what follows stops it
        rest = whole[len(prompt + reply) :]
        stop = next((e for e in STOP[name] if rest.lstrip().startswith(e)), None)
        if stop:
            reply += rest[: len(rest) - len(rest.lstrip())] + stop
    return prompt, reply


def rendered_start(name, messages, t, last):
    """Where the last message's rendering begins (past the history's texts)."""
    cursor = 0
    for message in messages[:t]:
        text = message["content"].strip() if isinstance(message.get("content"), str) else ""
        at = last.find(text, cursor) if text else -1
        cursor = at + len(text) if at >= 0 else cursor
    return cursor


class TEMPLATES:
    tokenizers: dict = {}

    @classmethod
    def render(cls, name, messages, tools, generation_prompt, kwargs):
        return cls.tokenizers[name].apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )


def expected_runs(name, tokenizer, messages, tools=None, turns=None, template_kwargs=None):
    """Each trained turn's (context ids, trained ids): the tokens of `prompt + reply`, split where the prompt's own
    tokens stop matching (a reply starting with a newline merges with ChatML's header newline: that token is
    trained, it carries reply text)."""
    TEMPLATES.tokenizers[name] = tokenizer
    runs = []
    for t, message in enumerate(messages):
        if message["role"] != "assistant" or (turns is not None and t not in turns):
            continue
        prompt, reply = expected_reply(name, messages, t, tools, template_kwargs)
        ids = tokenizer(prompt + reply, add_special_tokens=False)["input_ids"]
        alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        n = 0
        while n < min(len(ids), len(alone)) and ids[n] == alone[n]:
            n += 1
        runs.append((tuple(ids[:n]), tuple(ids[n:])))
    return runs


def observed_runs(rows):
    runs = []
    for row in rows:
        ids, mask = row["input_ids"], row["loss_mask"]
        i = 0
        while i < len(ids):
            if mask[i]:
                j = i
                while j < len(ids) and mask[j]:
                    j += 1
                runs.append((tuple(ids[:i]), tuple(ids[i:j])))
                i = j
            else:
                i += 1
    return runs


def whole_is_exact(name, tokenizer, messages, tools=None):
    """Whether the whole rendering starts with `prompt + reply` of every assistant turn (computed here)."""
    full = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    TEMPLATES.tokenizers[name] = tokenizer
    cursor = 0
    for t, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt, reply = expected_reply(name, messages, t, tools)
            if len(prompt) < cursor or not full.startswith(prompt + reply):
                return False
            cursor = len(prompt + reply)
    return True


def expected_mask(tokenizer, full, spans):
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [int(any(a < max(e, s + 1) and s < b for a, b in spans)) for s, e in offsets]


def trained_text(tokenizer, ids, mask):
    runs, run = [], []
    for token, trained in zip([*ids, None], [*mask, 0], strict=True):
        if trained:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


def template_accepts(tokenizer, messages, tools=None):
    try:
        tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    except Exception:
        return False
    return True


def check_rows(name, tokenizer, messages, rows, tools=None, turns=None, template_kwargs=None):
    """Each turn trained once, in exactly its inference prompt; an example is the whole conversation or ends with
    its last trained token."""
    expected = expected_runs(name, tokenizer, messages, tools, turns, template_kwargs)
    assert sorted(observed_runs(rows)) == sorted(expected)
    whole = tokenizer(TEMPLATES.render(name, messages, tools, False, template_kwargs or {}), add_special_tokens=False)
    whole = whole["input_ids"]
    for row in rows:
        last = max((i for i, m in enumerate(row["loss_mask"]) if m), default=-1)
        assert row["input_ids"] == whole or last == len(row["input_ids"]) - 1


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_every_turn_is_trained_exactly_as_at_inference(real, name, case):
    tokenizer = real(name)
    messages = CASES[case]
    tools = TOOLS if case == "tools" else None
    row = {"messages": messages, **({"tools": tools} if tools else {})}
    if not template_accepts(tokenizer, messages, tools) and messages[0]["role"] == "system":
        with pytest.raises(DatasetFormatError, match="Row 0: the chat template refused"):
            prepare(tokenizer, [row], assistant_only_loss=True)
        messages = messages[1:]  # Gemma has no system role: the rest of the case still applies
        row = {**row, "messages": messages}
    if not template_accepts(tokenizer, messages, tools):
        with pytest.raises(DatasetFormatError, match="Row 0: the chat template refused"):
            prepare(tokenizer, [row], assistant_only_loss=True)
        return
    expected_ids = reference_ids(tokenizer, messages, tools)
    everything = prepare(tokenizer, [row])
    assert [r["input_ids"] for r in everything] == [expected_ids] and all(everything[0]["loss_mask"])
    for stops in (None, tuple(STOP[name])):  # the template's own end-of-turn, and the model's generation_config
        rows = prepare(tokenizer, [row], assistant_only_loss=True, stop_tokens=stops)
        check_rows(name, tokenizer, messages, rows, tools)
        if whole_is_exact(name, tokenizer, messages, tools):
            assert len(rows) == 1 and rows[0]["input_ids"] == expected_ids
        if case == "no_assistant":
            assert rows == [{"input_ids": expected_ids, "loss_mask": [0] * len(expected_ids)}]
    for run in observed_runs(rows):  # never the newline after the stop token, never the next header
        text = tokenizer.decode(run[1])
        assert any(text.endswith(end) for end in STOP[name]), text


@pytest.mark.parametrize("name", NAMES)
def test_opting_out_of_per_turn_rendering_names_row_turn_reason_and_fix(real, name):
    tokenizer = real(name)
    messages = [m for m in CASES["reasoning"] if template_accepts(tokenizer, [m, user("x")]) or m["role"] != "system"]
    if whole_is_exact(name, tokenizer, messages):
        rows = prepare(tokenizer, [{"messages": messages}], assistant_only_loss=True, inexact_turns="error")
        assert [r["input_ids"] for r in rows] == [reference_ids(tokenizer, messages)]
        return
    with pytest.raises(DatasetFormatError) as error:
        prepare(tokenizer, [{"messages": messages}] * 2, assistant_only_loss=True, inexact_turns="error")
    message = str(error.value)
    assert "Row 0" in message and "(assistant)" in message and "inexact_turns='split'" in message


@pytest.mark.parametrize("name", NAMES)
def test_conversational_prompt_completion_trains_exactly_the_completion(real, name):
    tokenizer = real(name)
    messages = [m for m in CASES["three_turns"]]
    prompt, completion = messages[:-1], messages[-1:]
    rows = prepare(tokenizer, [{"prompt": prompt, "completion": completion}])
    check_rows(name, tokenizer, messages, rows, turns={len(messages) - 1})


def test_a_reply_starting_with_a_newline_trains_the_token_that_straddles_the_header(real):
    """ChatML's header ends with `\n`; a reply starting with `\n\n` makes one `\n\n\n` token with it. The ids are
    the template's (that one token), and it is trained because it carries reply text."""
    tokenizer = real("qwen2_5")
    messages = [user("Poem?"), assistant("\n\nRoses.")]
    row = prepare(tokenizer, [{"messages": messages}], assistant_only_loss=True)[0]
    tokens = tokenizer.convert_ids_to_tokens(row["input_ids"])
    straddler = tokens.index("ĊĊĊ")
    assert tokens[straddler - 1] == "assistant"
    assert row["loss_mask"][straddler] == 1 and row["loss_mask"][straddler - 1] == 0


@pytest.mark.parametrize("name", ["qwen3", "gptoss", "qwen3_5"])
def test_turns_as_examples_train_every_turns_reasoning(real, name):
    tokenizer = real(name)
    messages = CASES["reasoning"]
    rows = prepare(tokenizer, [{"messages": messages}], assistant_only_loss=True, assistant_turns_as_examples=True)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(rows) == len(turns)
    check_rows(name, tokenizer, messages, rows)
    for row, i in zip(rows, turns, strict=True):
        (run,) = trained_text(tokenizer, row["input_ids"], row["loss_mask"])
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if name == "gptoss" and not TRANSFORMERS_5 and messages[i]["reasoning_content"] not in full:
            continue  # transformers 4.x renders this history without the turn's reasoning: nothing of it to train
        assert messages[i]["reasoning_content"] in run and messages[i]["content"] in run


@pytest.mark.parametrize("name", ["qwen3", "smollm3", "qwen3_5"])
def test_template_kwargs_reach_every_rendering(real, name):
    tokenizer = real(name)
    messages = CASES["three_turns"]
    kwargs = {"enable_thinking": False}
    rows = prepare(tokenizer, [{"messages": messages}], assistant_only_loss=True, chat_template_kwargs=kwargs)
    check_rows(name, tokenizer, messages, rows, template_kwargs=kwargs)


def test_generation_markers_agree_with_the_inference_definition(real):
    tokenizer = real("qwen2_5")
    marked = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    messages = [m for m in CASES["three_turns"]]
    tokenizer.chat_template = marked
    try:
        own = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        rows = prepare(tokenizer, [{"messages": messages}], assistant_only_loss=True)
        check_rows("qwen2_5", tokenizer, messages, rows)
    finally:
        tokenizer.chat_template = real_tokenizers.template_text("qwen2_5")
    assert [r["input_ids"] for r in rows] == [list(own["input_ids"])]
    assert rows[0]["loss_mask"] == list(own["assistant_masks"])


def test_an_unlocatable_turn_is_refused_with_row_turn_and_a_fix_that_works(real):
    tokenizer = real("qwen2_5")
    messages = [user("Hi"), assistant("Hello"), user("Bye"), assistant("See you")]
    # Renders no assistant turn at all, so no reply can be located in it.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content + '\\n' }}{% endif %}{% endfor %}"
    )
    try:
        rows = [{"messages": messages}, {"messages": messages}]
        with pytest.raises(DatasetFormatError) as error:
            prepare(tokenizer, rows, assistant_only_loss=True)
        assert "Row 0" in str(error.value) and "message 1 (assistant)" in str(error.value), str(error.value)
        assert "assistant_only_loss=False" in str(error.value)
        fixed = prepare(tokenizer, rows, assistant_only_loss=False)[0]
        assert fixed["input_ids"] == reference_ids(tokenizer, messages)
    finally:
        tokenizer.chat_template = real_tokenizers.template_text("qwen2_5")


@pytest.mark.parametrize("name", ["llama2_chat", "qwen2_5"])
def test_plain_prompt_completion_keeps_the_prompt_and_tokenizes_the_completion_in_context(real, name):
    tokenizer = real(name)
    prompt, completion = "Question: what is two plus two?\nAnswer:\n", "Four."
    row = prepare(tokenizer, [{"prompt": prompt, "completion": completion}])[0]
    bos = [tokenizer.bos_token_id] if tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id else []
    alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    assert whole[: len(alone)] == alone
    assert row["input_ids"] == bos + whole + [tokenizer.eos_token_id]
    assert row["loss_mask"] == [0] * (len(bos) + len(alone)) + [1] * (len(whole) - len(alone) + 1)
    separately = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if name == "llama2_chat":  # alone, SentencePiece would add its dummy-prefix `▁`: in context it does not
        assert separately != whole[len(alone) :]


def test_plain_prompt_whose_tokens_are_not_a_prefix_keeps_them_and_starts_the_completion_on_a_boundary(real):
    tokenizer = real("qwen2_5")
    prompt, completion = "Answer: ", "Four."
    alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    assert whole[: len(alone)] != alone  # "Answer:" " " vs "Answer:" " Four"
    after_newline = tokenizer("\nFour.", add_special_tokens=False)["input_ids"]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert after_newline[: len(newline)] == newline
    row = prepare(tokenizer, [{"prompt": prompt, "completion": completion}])[0]
    tail = after_newline[len(newline) :] + [tokenizer.eos_token_id]
    assert row["input_ids"] == alone + tail
    assert row["loss_mask"] == [0] * len(alone) + [1] * len(tail)
    assert tokenizer.decode(row["input_ids"][:-1]) == prompt + completion


@pytest.mark.parametrize("name", ["mistral_v03", "qwen3", "gptoss"])
def test_preview_shows_each_turns_context_trained_tokens_and_rendering(real, tmp_path, capsys, name):
    from sftune.cli import parse_sft_args
    from sftune.data.preview import preview_rows

    tokenizer = real(name)
    model_dir = tmp_path / "tok"
    tokenizer.save_pretrained(model_dir)
    messages = CASES["reasoning"]
    (tmp_path / "data.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    (tmp_path / "recipe.yaml").write_text("assistant_only_loss: true\nmax_length: 4096\n")
    recipe = parse_sft_args(["--config", str(tmp_path / "recipe.yaml"), "--output_dir", str(tmp_path / "out")])[1]
    shown = preview_rows(str(model_dir), str(tmp_path / "data.jsonl"), 1, recipe, "never")
    out = capsys.readouterr().out
    check_rows(name, tokenizer, messages, shown)
    for turn, message in enumerate(messages):
        if message["role"] == "assistant":
            assert f"message {turn} (assistant)" in out
    exact = whole_is_exact(name, tokenizer, messages)
    assert ("rendered as at inference, because" in out) != exact
    for row in shown:  # the shown text is exactly the tokens, with the trained runs marked
        assert tokenizer.decode(row["input_ids"]) in out.replace("[[", "").replace("]]", "")
