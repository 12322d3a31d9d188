"""Locate an assistant turn's fields (content, reasoning, tool-call names and string arguments) in a rendering of
its conversation, for any chat template. sftune.data.render uses it where a reply must be found in a rendering
that does not start with the turn's inference prompt.

1. The conversation is rendered once more with a private-use *sentinel* pair around each assistant field;
   leading/trailing whitespace stays outside the sentinels so templates that `trim` still render them. Removing
   the sentinels must give back the plain rendering exactly, which proves every sentinel sits where the field
   sits in the real rendering.
2. Where that check fails for a template that transforms a field (e.g. splits `</think>` out of the content), the
   turn falls back to a diff: render with that turn's fields emptied; the region that changes is the turn.
"""

from __future__ import annotations

import re
from typing import Any

Span = tuple[int, int]

FIELDS = ("content", "reasoning_content", "thinking", "reasoning")
SENTINEL_BASE = 0xF0000  # Supplementary Private Use Area-A: never produced by templates or normal text


def sentinels(k: int) -> tuple[str, str]:
    return chr(SENTINEL_BASE + 2 * k), chr(SENTINEL_BASE + 2 * k + 1)


def render(
    tokenizer: Any,
    messages: list[dict],
    tools: list | None,
    generation_prompt: bool = False,
    template_kwargs: dict | None = None,
) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt, **(template_kwargs or {})
    )


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
    tokenizer: Any,
    messages: list[dict],
    full: str,
    tools: list | None,
    turns: list[int],
    template_kwargs: dict | None = None,
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
        text = render(tokenizer, marked, tools, template_kwargs=template_kwargs)
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


def diff_region(
    tokenizer: Any,
    messages: list[dict],
    full: str,
    tools: list | None,
    turn: int,
    template_kwargs: dict | None = None,
) -> Span | None:
    """Where `full` changes when this turn's fields are emptied: the text the template renders from them."""
    emptied = dict(messages[turn])
    for field in FIELDS:
        if isinstance(emptied.get(field), (str, list)):
            emptied[field] = ""
    emptied.pop("tool_calls", None)
    try:
        other = render(
            tokenizer, [*messages[:turn], emptied, *messages[turn + 1 :]], tools, template_kwargs=template_kwargs
        )
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


def special_tokens(tokenizer: Any) -> list[str]:
    """Added tokens, special or not: each is one atomic token (some real tokenizers leave turn markers unflagged)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens = {getattr(t, "content", str(t)) for t in decoder.values()}
    tokens |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted((t for t in tokens if t), key=len, reverse=True)
