"""Find where each assistant turn lies in a conversation rendered once by its chat template, for any template.

The whole conversation is rendered once (that string, tokenized whole, is exactly what
`apply_chat_template(tokenize=True)` gives). Assistant turns are then located in that very string, so templates that
rewrite earlier turns (drop past reasoning, end past turns differently, move the system prompt) need no special case:

1. `{% generation %}` markers, where the template has them, are honoured as they are (transformers' own indices).
2. Otherwise the conversation is rendered once more with a private-use *sentinel* pair around each assistant
   field (content, reasoning, tool-call names and string arguments); leading/trailing whitespace stays outside the
   sentinels so templates that `trim` still render them. Removing the sentinels must give back the plain rendering
   exactly, which proves every sentinel sits where the field sits in the real rendering.
3. Where that check fails for a template that transforms a field (e.g. splits `</think>` out of the content), each
   turn falls back to a diff: render with that turn's fields emptied; the region that changes is the turn.

A located field region is then extended to the whole reply as the model generates it:
- start: where inference's prompt ends. For a template with a generation prompt: right after it as it appears
  before the reply (the longest prefix of it, cut at a special token or its end, so that DeepSeek-R1's
  `<｜Assistant｜><think>\\n`, absent from the whole rendering, is found as `<｜Assistant｜>`): a string search, no
  extra rendering. Without one (Llama-2, Mistral): the end of the history rendered with the generation prompt when
  that is a prefix of the whole rendering (so the template's space before a reply, `[/INST] `, is the model's to
  generate); when the template rewrites history so that it is not (Mistral moves the system prompt and tools into
  the last user turn), after the last occurrence of that prompt's tail from its last special token (`[/INST]`). What the template puts
  between that header and the content (GPT-OSS `<|channel|>final<|message|>`, Qwen3's `<think>` block) is the
  model's to generate, so it is trained. DeepSeek-R1's generation prompt `<｜Assistant｜><think>\\n` never appears in
  the whole rendering; its `<｜Assistant｜>` prefix does, so the reply starts after it.
- end: through the first end-of-turn special token after the field (and any end-of-turn tokens glued to it), never
  the newline or header that follows. End-of-turn tokens are learned from the template itself by probes (the special
  token it puts right after an assistant reply, the last one of a conversation ending in a reply or a tool call) plus
  the tokenizer's EOS.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

Span = tuple[int, int]

FIELDS = ("content", "reasoning_content", "thinking", "reasoning")
SENTINEL_BASE = 0xF0000  # Supplementary Private Use Area-A: never produced by templates or normal text
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


class SpanError(ValueError):
    """A turn cannot be located exactly; `turn` is its message index."""

    def __init__(self, turn: int, reason: str):
        super().__init__(reason)
        self.turn = turn


def sentinels(k: int) -> tuple[str, str]:
    return chr(SENTINEL_BASE + 2 * k), chr(SENTINEL_BASE + 2 * k + 1)


def render(tokenizer: Any, messages: list[dict], tools: list | None, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(
    tokenizer: Any,
    messages: list[dict],
    full: str,
    tools: list | None = None,
    turns: list[int] | None = None,
) -> list[Span]:
    """Character spans of `full` (the plain rendering of `messages`) to train: the assistant turns `turns`
    (message indices; default all assistant messages), each the reply as the model generates it plus its
    end-of-turn token(s). Raises SpanError naming the turn where a turn cannot be located."""
    if turns is None:
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not turns:
        return []
    template = tokenizer.chat_template
    if GENERATION_MARKER.search(template):
        return generation_marker_spans(tokenizer, messages, full, tools)
    regions = sentinel_regions(tokenizer, messages, full, tools, turns)
    if regions is None:
        regions = {i: diff_region(tokenizer, messages, full, tools, i) for i in turns}
    probes = template_probes(tokenizer, template)
    spans: list[Span] = []
    lower = 0
    ordered = sorted(turns)
    for n, i in enumerate(ordered):
        region = regions.get(i)
        upper = len(full)
        for later in ordered[n + 1 :]:
            if regions.get(later):
                upper = regions[later][0]
                break
        start = reply_start(full, probes.header_cuts, lower, region[0]) if region else None
        if start is None:
            start = prompt_end(tokenizer, messages[:i], tools, full, lower, region[0] if region else upper)
        if region is None:
            if start is None:
                raise SpanError(i, "the chat template does not render this assistant turn's content")
            region = (start, start)  # rendered empty (e.g. tool calls a template ignores): the reply is its end
        if start is None:
            start = anchored_start(tokenizer, messages[:i], tools, full, lower, region[0], probes.specials)
        end = reply_end(full, probes.end_of_turn, region[1], upper)
        if end <= start:
            raise SpanError(i, "the chat template renders nothing for this assistant turn")
        spans.append((start, end))
        lower = spans[-1][1]
    return spans


# --------------------------------------------------------------------------------------------------------------
# Locating fields
# --------------------------------------------------------------------------------------------------------------


def wrap(value: str, open_: str, close: str) -> str:
    core = value.strip()
    if not core:
        return value
    head = value[: len(value) - len(value.lstrip())]
    tail = value[len(value.rstrip()) :]
    return head + open_ + core + close + tail


def marked_message(message: dict, next_pair) -> dict:
    """A copy of an assistant message with a fresh sentinel pair (from `next_pair()`) around each string field."""
    out = dict(message)
    for field in FIELDS:
        value = out.get(field)
        if isinstance(value, str):
            out[field] = wrap(value, *next_pair())
        elif field == "content" and isinstance(value, list):
            out[field] = [
                {**part, "text": wrap(part["text"], *next_pair())}
                if isinstance(part, dict) and isinstance(part.get("text"), str)
                else part
                for part in value
            ]
    if isinstance(out.get("tool_calls"), list):
        calls = []
        for call in out["tool_calls"]:
            if not isinstance(call, dict):
                calls.append(call)
                continue
            call = dict(call)
            function = dict(call["function"]) if isinstance(call.get("function"), dict) else None
            target = function if function is not None else call
            for key in ("name", "arguments"):
                if isinstance(target.get(key), str):
                    target[key] = wrap(target[key], *next_pair())
            if function is not None:
                call["function"] = function
            calls.append(call)
        out["tool_calls"] = calls
    return out


def sentinel_regions(
    tokenizer: Any, messages: list[dict], full: str, tools: list | None, turns: list[int]
) -> dict[int, Span | None] | None:
    """{turn: (start of its first field, end of its last field) in `full`}, or None when a template transforms a
    field. Each field gets its own sentinel pair and only its first rendering counts: templates may repeat a field
    later (GPT-OSS names the called tool again in the tool's reply), which is not this turn's text."""
    owner: list[int] = []  # pair number -> turn

    def allocate(turn: int):
        def next_pair() -> tuple[str, str]:
            owner.append(turn)
            return sentinels(len(owner) - 1)

        return next_pair

    marked = list(messages)
    for i in turns:
        marked[i] = marked_message(messages[i], allocate(i))
    if not owner:
        return {i: None for i in turns}
    top = chr(SENTINEL_BASE + 2 * len(owner) - 1)
    sentinel = re.compile(f"[{chr(SENTINEL_BASE)}-{top}]")
    if sentinel.search(full):
        return None
    try:
        text = render(tokenizer, marked, tools)
    except Exception:
        return None
    first_open: dict[int, int] = {}
    first_close: dict[int, int] = {}
    depth = [0] * len(owner)
    pieces = []
    position = last = 0
    for match in sentinel.finditer(text):
        pieces.append(text[last : match.start()])
        position += match.start() - last
        last = match.end()
        pair, is_close = divmod(ord(match.group()) - SENTINEL_BASE, 2)
        if is_close:
            if depth[pair] <= 0:
                return None  # a close without its open: the template cut the field
            depth[pair] -= 1
            first_close.setdefault(pair, position)
        else:
            depth[pair] += 1
            first_open.setdefault(pair, position)
    pieces.append(text[last:])
    if any(depth) or "".join(pieces) != full:
        return None
    regions: dict[int, Span | None] = {i: None for i in turns}
    for pair, turn in enumerate(owner):
        if pair in first_open:
            start, end = first_open[pair], first_close[pair]
            old = regions[turn]
            regions[turn] = (start, end) if old is None else (min(old[0], start), max(old[1], end))
    return regions


def diff_region(tokenizer: Any, messages: list[dict], full: str, tools: list | None, turn: int) -> Span | None:
    """Where `full` changes when this turn's fields are emptied: the text the template renders from them."""
    emptied = dict(messages[turn])
    for field in FIELDS:
        if isinstance(emptied.get(field), (str, list)):
            emptied[field] = ""
    emptied.pop("tool_calls", None)
    try:
        other = render(tokenizer, [*messages[:turn], emptied, *messages[turn + 1 :]], tools)
    except Exception:
        return None
    prefix = 0
    limit = min(len(full), len(other))
    while prefix < limit and full[prefix] == other[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and full[-1 - suffix] == other[-1 - suffix]:
        suffix += 1
    end = len(full) - suffix
    return (prefix, end) if end > prefix else None


def generation_marker_spans(tokenizer: Any, messages: list[dict], full: str, tools: list | None) -> list[Span]:
    """The template's own `{% generation %}` blocks, as transformers finds them (character spans)."""
    from ..compat import render_with_generation_spans

    rendered, indices = render_with_generation_spans(
        tokenizer.chat_template, messages, tools, **tokenizer.special_tokens_map
    )
    if rendered != full:
        raise SpanError(0, "the template's {% generation %} rendering differs from its plain rendering")
    return [(start, end) for start, end in indices if end > start]


# --------------------------------------------------------------------------------------------------------------
# Extending a field region to the whole reply
# --------------------------------------------------------------------------------------------------------------


class Probes:
    def __init__(self, header_cuts: list[str], end_of_turn: list[str], specials: list[str]):
        self.header_cuts = header_cuts  # longest first
        self.end_of_turn = end_of_turn
        self.specials = specials


def special_tokens(tokenizer: Any) -> list[str]:
    """Added tokens, special or not: each is one atomic token (some real tokenizers leave turn markers unflagged)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens = {getattr(t, "content", str(t)) for t in decoder.values()}
    tokens |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted((t for t in tokens if t), key=len, reverse=True)


def template_probes(tokenizer: Any, template: str) -> Probes:
    return _probes(tokenizer, template, tuple(special_tokens(tokenizer)), tokenizer.eos_token)


@lru_cache(maxsize=64)
def _probes(tokenizer: Any, template: str, specials: tuple[str, ...], eos: str | None) -> Probes:
    pattern = re.compile("|".join(re.escape(t) for t in specials)) if specials else None
    user = {"role": "user", "content": "x"}

    def first_special(text: str, at: int) -> str | None:
        match = pattern.match(text, at + len(text[at:]) - len(text[at:].lstrip(" \t"))) if pattern else None
        return match.group() if match else None

    def last_special(text: str) -> str | None:
        matches = list(pattern.finditer(text)) if pattern else []
        return matches[-1].group() if matches else None

    end_of_turn = {eos} if eos else set()
    open_, close = sentinels(0)
    reply = {"role": "assistant", "content": f"{open_}y{close}"}
    for conversation in (
        [user, reply],
        [user, reply, {"role": "user", "content": "z"}, {"role": "assistant", "content": "w"}],
        [user, {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]}],
    ):
        try:
            text = render(tokenizer, conversation, None)
        except Exception:
            continue
        if close in text:
            found = first_special(text, text.index(close) + 1)
            if found:
                end_of_turn.add(found)
        if conversation[-1] is not reply and len(conversation) == 2:
            found = last_special(text)
            if found:
                end_of_turn.add(found)
        elif conversation[-1] is reply:
            found = last_special(text.replace(open_, "").replace(close, ""))
            if found and text.rstrip().endswith(found):
                end_of_turn.add(found)
    header = ""
    try:
        with_prompt = render(tokenizer, [user], None, generation_prompt=True)
        without = render(tokenizer, [user], None)
        if with_prompt.startswith(without):
            header = with_prompt[len(without) :]
    except Exception:
        pass
    cuts = {len(header)} if header.strip() else set()
    if pattern:
        cuts |= {m.end() for m in pattern.finditer(header)}
    header_cuts = [header[:cut] for cut in sorted(cuts, reverse=True) if header[:cut].strip()]
    return Probes(header_cuts, sorted(end_of_turn, key=len, reverse=True), list(specials))


TOOL_CALL = {"type": "function", "function": {"name": "probe_tool", "arguments": {"a": 1}}}


def prompt_end(tokenizer: Any, history: list[dict], tools: list | None, full: str, lower: int, field_start: int):
    """Where inference's prompt for this turn ends, when the template renders it as a prefix of the whole."""
    if not history:
        return None
    try:
        prompt = render(tokenizer, history, tools, generation_prompt=True)
    except Exception:
        return None
    if lower <= len(prompt) <= field_start and full.startswith(prompt):
        return len(prompt)
    return None


def reply_start(full: str, header_cuts: list[str], lower: int, field_start: int) -> int | None:
    for header in header_cuts:
        found = full.rfind(header, lower, field_start)
        if found >= 0:
            return found + len(header)
    return None


def anchored_start(
    tokenizer: Any,
    history: list[dict],
    tools: list | None,
    full: str,
    lower: int,
    field_start: int,
    specials: list[str],
) -> int:
    """Templates without a generation prompt that rewrite history (Mistral moves the system prompt and tools into
    the last user turn): inference's prompt ends with a special token (`[/INST]`); the reply starts after the
    last occurrence of the prompt's tail from that token on, before the reply; else at the field itself."""
    try:
        prompt = render(tokenizer, history, tools, generation_prompt=True)
    except Exception:
        return field_start
    tails = [prompt.rfind(token) for token in specials]
    cut = max(tails, default=-1)
    if cut < 0 or not prompt[cut:].strip():
        return field_start
    found = full.rfind(prompt[cut:], lower, field_start)
    return found + len(prompt) - cut if found >= 0 else field_start


def reply_end(full: str, end_of_turn: list[str], field_end: int, upper: int) -> int:
    best = None
    for token in end_of_turn:
        found = full.find(token, field_end, upper)
        if found >= 0 and (best is None or found < best[0]):
            best = (found, found + len(token))
    if best is None:
        return field_end
    end = best[1]
    glued = True
    while glued:
        glued = False
        for token in end_of_turn:
            if full.startswith(token, end) and end + len(token) <= upper:
                end += len(token)
                glued = True
                break
    return end
