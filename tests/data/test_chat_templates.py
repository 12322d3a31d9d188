"""Exact tokens and masks on the real chat templates of /work/shared/chat-templates with real vocabularies.

Expected tokens come from `tokenizer.apply_chat_template(tokenize=True)`. Expected trained spans are located here,
independently of sftune.data.chat_spans: from the end of the family's assistant header (as its README lists it)
before the reply's first rendered text, to the end of the family's first end-of-turn token after the reply's last
rendered text; a token is expected trained when any of its characters is in such a span.
"""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from sftune.compat import TRANSFORMERS_5
from sftune.data import chat_spans, formats
from sftune.data.formats import DatasetFormatError
from sftune.data.tokenize import SOURCE_ROW, TokenizeOptions, make_tokenize_function, prepare_dataset
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
    out.pop(SOURCE_ROW)
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


def expected_spans(name, messages, full, turns=None):
    header, ends = HEADER[name], END_OF_TURN[name]
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            at = full.find(message["content"].strip(), cursor)  # past this message (tools may be listed before)
            cursor = at + len(message["content"].strip()) if at >= 0 else cursor
            continue
        fields = rendered_fields(message, full, cursor)
        if fields is None:  # rendered empty: the reply is just its end-of-turn token
            at = full.index(header[0] if isinstance(header, tuple) else header, cursor) + len(header)
            fields = (at, at)
        headers = header if isinstance(header, tuple) else (header,)
        start = max(full.rfind(h, cursor, fields[0]) + len(h) for h in headers if h in full[cursor : fields[0]])
        end = min(full.index(e, fields[1]) + len(e) for e in ends if e in full[fields[1] :])
        if turns is None or i in turns:
            spans.append((start, end))
        cursor = end
    return spans


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


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_tokens_and_masks_are_exact(real, name, case):
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
    # Templates that ignore reasoning or tool calls render those turns without them; exactness still holds.
    expected_ids = reference_ids(tokenizer, messages, tools)
    full = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    everything = prepare(tokenizer, [row])[0]
    assert everything["input_ids"] == expected_ids
    assert all(everything["loss_mask"])
    replies = prepare(tokenizer, [row], assistant_only_loss=True)[0]
    assert replies["input_ids"] == expected_ids
    assert replies["loss_mask"] == expected_mask(tokenizer, full, expected_spans(name, messages, full))
    runs = trained_text(tokenizer, replies["input_ids"], replies["loss_mask"])
    assert len(runs) == sum(m["role"] == "assistant" for m in messages)
    for run in runs:  # never the newline after the end-of-turn token, never the next header
        assert any(run.endswith(end) for end in END_OF_TURN[name]), run
        assert not run.startswith(HEADER[name]), run


@pytest.mark.parametrize("name", NAMES)
def test_conversational_prompt_completion_trains_exactly_the_completion(real, name):
    tokenizer = real(name)
    messages = [m for m in CASES["three_turns"]]
    prompt, completion = messages[:-1], messages[-1:]
    row = prepare(tokenizer, [{"prompt": prompt, "completion": completion}])[0]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert row["input_ids"] == reference_ids(tokenizer, messages)
    spans = expected_spans(name, messages, full, turns={len(messages) - 1})
    assert row["loss_mask"] == expected_mask(tokenizer, full, spans)


def test_a_reply_starting_with_a_newline_trains_the_token_that_straddles_the_header(real):
    """ChatML's header ends with `\\n`; a reply starting with `\\n\\n` makes one `\\n\\n\\n` token with it. The ids are
    the template's (that one token), and it is trained because it carries reply text."""
    tokenizer = real("qwen2_5")
    messages = [user("Poem?"), assistant("\n\nRoses.")]
    row = prepare(tokenizer, [{"messages": messages}], assistant_only_loss=True)[0]
    tokens = tokenizer.convert_ids_to_tokens(row["input_ids"])
    straddler = tokens.index("ĊĊĊ")
    assert tokens[straddler - 1] == "assistant"
    assert row["loss_mask"][straddler] == 1 and row["loss_mask"][straddler - 1] == 0


@pytest.mark.parametrize("name", ["qwen3", "gptoss"])
def test_turns_as_examples_train_every_turns_reasoning(real, name):
    tokenizer = real(name)
    messages = CASES["reasoning"]
    rows = prepare(tokenizer, [{"messages": messages}], assistant_only_loss=True, assistant_turns_as_examples=True)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(rows) == len(turns)
    for row, i in zip(rows, turns, strict=True):
        history = messages[: i + 1]
        full = tokenizer.apply_chat_template(history, tokenize=False)
        assert row["input_ids"] == reference_ids(tokenizer, history)
        assert row["loss_mask"] == expected_mask(tokenizer, full, expected_spans(name, history, full, turns={i}))
        (run,) = trained_text(tokenizer, row["input_ids"], row["loss_mask"])
        if name == "gptoss" and not TRANSFORMERS_5 and messages[i]["reasoning_content"] not in full:
            continue  # transformers 4.x renders this history without the turn's reasoning: nothing of it to train
        assert messages[i]["reasoning_content"] in run and messages[i]["content"] in run


@pytest.mark.skipif(
    not TRANSFORMERS_5,
    reason="transformers 4.x builds this test's DeepSeek tokenizer with a decoder that does not "
    "undo byte-level pieces ('ĊĊ'), so decoded text cannot be compared; its tokens are checked in the other tests",
)
def test_deepseek_r1_generation_prompt_is_not_in_the_tokens(real):
    real("smollm2")  # builds the cached vocabulary
    """DeepSeek-R1 (template: deepseek-ai/DeepSeek-R1-Distill-Qwen tokenizer_config, tool parts left out) strips
    reasoning from every assistant turn and its generation prompt `<｜Assistant｜><think>\\n` never appears in the
    whole rendering: the tokens are the whole rendering's and each reply starts right after `<｜Assistant｜>`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_tokenizers.cache_dir() / "smollm2")  # a private copy to edit
    tokenizer.add_special_tokens(
        {
            "additional_special_tokens": [
                "<｜User｜>",
                "<｜Assistant｜>",
                "<｜end▁of▁sentence｜>",
                "<｜begin▁of▁sentence｜>",
            ]
        }
    )
    tokenizer.bos_token, tokenizer.eos_token = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    tokenizer.chat_template = DEEPSEEK_R1
    messages = [SYSTEM, *CASES["reasoning"]]
    messages = [
        {**m, "content": f"<think>\n{m.pop('reasoning_content')}\n</think>\n\n{m['content']}"}
        if m["role"] == "assistant"
        else m
        for m in (dict(m) for m in messages)
    ]
    assert "<｜Assistant｜><think>\n" not in tokenizer.apply_chat_template(messages, tokenize=False)
    for rows in (
        [{"messages": messages}],
        [{"prompt": messages[:-1], "completion": messages[-1:]}],
    ):
        row = prepare(tokenizer, rows, assistant_only_loss=True)[0]
        assert row["input_ids"] == reference_ids(tokenizer, messages)
        runs = trained_text(tokenizer, row["input_ids"], row["loss_mask"])
        expected = [f"{m['content'].split('</think>')[-1]}<｜end▁of▁sentence｜>" for m in messages[2::2]]
        assert runs == (expected if "messages" in rows[0] else expected[-1:])


DEEPSEEK_R1 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor -%}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)


def test_generation_markers_are_honoured_and_agree_with_located_spans(real):
    tokenizer = real("qwen2_5")
    marked = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    messages = CASES["leading_newlines_and_spaces"]
    tokenizer.chat_template = marked
    try:
        own = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        row = prepare(tokenizer, [{"messages": messages}], assistant_only_loss=True)[0]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        tokenizer.chat_template = marked.replace("{% generation %}", "").replace("{% endgeneration %}", "")
        located = chat_spans.assistant_spans(tokenizer, messages, full)
    finally:
        tokenizer.chat_template = real_tokenizers.template_text("qwen2_5")
    assert row["input_ids"] == list(own["input_ids"])
    assert row["loss_mask"] == list(own["assistant_masks"])
    assert row["loss_mask"] == expected_mask(tokenizer, full, located)


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
        assert "Row 0" in str(error.value) and "message 1 (assistant)" in str(error.value)
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
def test_preview_shows_the_exact_tokens_and_the_trained_ones(real, tmp_path, capsys, name):
    from sftune.data.preview import preview_rows

    tokenizer = real(name)
    model_dir = tmp_path / "tok"
    tokenizer.save_pretrained(model_dir)
    messages = CASES["three_turns_system"]
    (tmp_path / "data.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    (tmp_path / "recipe.yaml").write_text("assistant_only_loss: true\nmax_length: 4096\n")
    shown = preview_rows(str(model_dir), str(tmp_path / "data.jsonl"), 1, str(tmp_path / "recipe.yaml"), "never")
    out = capsys.readouterr().out
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert shown[0]["input_ids"] == reference_ids(tokenizer, messages)
    spans = expected_spans(name, messages, full)
    shown_text = out.split("\n", 1)[1].rsplit("\n(", 1)[0]  # between the row's header line and the legend
    assert shown_text.replace("[[", "").replace("]]", "") == tokenizer.decode(shown[0]["input_ids"])
    trained = [piece.split("]]")[0].strip() for piece in shown_text.split("[[")[1:]]
    assert trained == [full[start:end].strip() for start, end in spans]
