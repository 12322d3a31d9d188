"""What a conversation trains: the replies the model must generate, each in the context it has at inference.

The definition (one for every chat template, no per-family code). For assistant message *t* of a conversation:

- its **context** is the inference prompt `P_t = apply_chat_template(messages[:t], tools=tools,
  add_generation_prompt=True, **template_kwargs)`, exactly. A forced prefill at the end of `P_t` (DeepSeek-R1's
  `<think>\\n`, SmolLM3's empty think block, Gemma-4's empty thought channel) is context, never trained;
- its **reply** (the trained text) is what the model must generate after `P_t`: the turn as the template renders
  it when it is the last message (`R_t = apply_chat_template(messages[:t + 1])`), from where `P_t` ends through
  the first **stop token** after the reply's fields, and nothing after it (no newline, next header, or a trailing
  `<|endoftext|>` the template appends). Stop tokens are the model's `generation_config.eos_token_id` where known,
  else the tokenizer's EOS plus the end-of-turn token the template renders after a final reply or tool call (or,
  for templates that end a reply only by the next role's header, that header), see `stop_tokens`.
  Where `R_t` starts with `P_t` the reply is simply `R_t[len(P_t):]` up to its stop token. Where it does not (the
  prefill is missing from `R_t`, or the template moves the system prompt into the last user turn), the reply
  starts where `R_t` ends its copy of the prompt: after the generation prompt, from its last occurrence before
  the reply's first field (located by sentinels, sftune.data.chat_spans) and as far as it matches there, cut only
  between special tokens (or, for templates without a generation prompt, after the longest tail of `P_t` found
  there); what the template puts between that point and the field (a `<think>` block, a harmony channel) is the
  model's to generate, so it is trained. Where `R_t` renders no stop token after the reply (the next role's
  header ends a turn) and the whole conversation does, the reply runs through that one.
- Tokens: an example's text is tokenized whole (sftune.data.tokenize), so the context's ids are `P_t`'s own,
  except where a reply begins with characters the tokenizer merges with the prompt's last ones (ChatML's
  `assistant\n` + a reply starting with `\n`): that one token carries reply text and is trained.

Examples. A conversation is kept as one example (its whole rendering `W`, tokens equal to
`apply_chat_template(tokenize=True)`) when, for every trained turn, `W` starts with `P_t + reply_t`. Turns for
which that fails (templates that drop past reasoning, end past turns differently, prefill the prompt or drop the
system prompt from the whole rendering) become their own example `P_t + reply_t` ("rendered as at inference");
the whole rendering keeps the exact turns and is cut after the last of them (it is dropped when none is exact).
`TokenizeOptions.inexact_turns="error"` refuses such turns instead, naming the row, the turn and the reason; and
`assistant_turns_as_examples=True` makes every turn its own example. The token overhead of the default on
multi-turn reasoning data is measured by benchmarks/prepare_chat.py and documented in the README.

Plain functions that other paths (generation, IterativeSFTTrainer) use: `render`, `inference_prompt`,
`inference_prompt_ids`, `stop_tokens`, `turn_replies`, `conversation_plan`.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .. import compat
from ..errors import RenderError
from . import chat_spans

# Why a turn is rendered on its own (the whole rendering does not show it as at inference).
PROMPT_DIFFERS = (
    "the whole conversation's rendering before this reply differs from its inference prompt (history rewritten, "
    "system prompt moved, or a generation prompt the whole rendering lacks)"
)
REPLY_DIFFERS = "the whole conversation renders this reply differently from inference (e.g. drops its reasoning)"
PREFILL = "the inference prompt ends with a prefill the rendered reply lacks"
NO_STOP = "the template renders no stop token after the reply (it is trained up to the end of its rendering)"


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


def template_for(tokenizer: Any, tools: list | None = None) -> str:
    return tokenizer.get_chat_template(None, tools)


class Renderer:
    """The compiled chat template of a tokenizer, called as `apply_chat_template(tokenize=False)` calls it.

    A conversation is converted to what the template sees once (`prepare`); its prefixes then render without
    converting again, which is most of `apply_chat_template`'s cost on short turns. The first rendering of each
    template is checked against `apply_chat_template` itself; where they differ (another transformers version),
    every rendering goes through `apply_chat_template`."""

    checked: dict[tuple[int, str], bool] = {}

    def __init__(self, tokenizer: Any, tools: list | None = None, template_kwargs: dict | None = None):
        self.tokenizer, self.tools, self.template_kwargs = tokenizer, tools, template_kwargs or {}
        self.template = template_for(tokenizer, tools)
        # Tools given as functions are converted by apply_chat_template itself: those go the slow way.
        self.compiled: Any = (
            compat.compile_chat_template(self.template) if all(isinstance(t, dict) for t in tools or []) else None
        )
        self.fast = self.compiled is not None
        if self.fast:
            self.context = compat.plain_template_data({**tokenizer.special_tokens_map, **self.template_kwargs})
            self.tool_schemas = compat.plain_template_data(tools)

    def __reduce__(self) -> tuple:
        # The compiled template holds a ContextVar that cannot be pickled; datasets pickles map functions (to
        # fingerprint them, and to send them to worker processes), which reach this object: rebuild it instead.
        return (Renderer, (self.tokenizer, self.tools, self.template_kwargs))

    def prepare(self, messages: list[dict]) -> list[dict]:
        if not self.fast:
            return messages
        return compat.template_messages(messages)

    def text(self, prepared: list[dict], add_generation_prompt: bool = False, original: list | None = None) -> str:
        if self.fast:
            key = (id(self.tokenizer), self.template)
            if key not in self.checked and original is not None:
                fast = self.compiled.render(
                    messages=prepared,
                    tools=self.tool_schemas,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **self.context,
                )
                self.checked[key] = fast == self.slow(original, add_generation_prompt)
            if self.checked.get(key, True):
                return self.compiled.render(
                    messages=prepared,
                    tools=self.tool_schemas,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **self.context,
                )
        return self.slow(original if original is not None else prepared, add_generation_prompt)

    def slow(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tools=self.tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **self.template_kwargs,
        )


class _RendererCache(weakref.WeakKeyDictionary):
    """Renderers per tokenizer, for this process. datasets fingerprints a map function by pickling what it reaches,
    this cache included: it pickles as an empty cache, never as every tokenizer the process has rendered with."""

    def __reduce__(self) -> tuple:
        return (_RendererCache, ())


_RENDERERS: _RendererCache = _RendererCache()


def renderer_for(tokenizer: Any, tools: list | None = None, template_kwargs: dict | None = None) -> Renderer:
    """A Renderer, reused per tokenizer and template for the common case of no tools and no template kwargs."""
    if tools or template_kwargs:
        return Renderer(tokenizer, tools, template_kwargs)
    try:
        cache = _RENDERERS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        return Renderer(tokenizer)
    key = (template_for(tokenizer), repr(tokenizer.special_tokens_map))
    if key not in cache:
        cache.clear()
        cache[key] = Renderer(tokenizer)
    return cache[key]


def render_many(
    tokenizer: Any,
    conversations: list[list[dict]],
    tools: list | None = None,
    add_generation_prompt: bool = False,
    template_kwargs: dict | None = None,
) -> list[str]:
    """`apply_chat_template(c, tokenize=False, ...)` for each conversation."""
    renderer = renderer_for(tokenizer, tools, template_kwargs)
    return [renderer.text(renderer.prepare(c), add_generation_prompt, c) for c in conversations]


def render(
    tokenizer: Any,
    messages: list[dict],
    tools: list | None = None,
    add_generation_prompt: bool = False,
    **template_kwargs: Any,
) -> str:
    """The template's text for `messages`, as `apply_chat_template(tokenize=False)` gives it."""
    return render_many(tokenizer, [messages], tools, add_generation_prompt, template_kwargs)[0]


def inference_prompt(tokenizer: Any, messages: list[dict], tools: list | None = None, **template_kwargs: Any) -> str:
    """The prompt the model is given at inference to reply after `messages` (generation prompt and prefill included)."""
    return render(tokenizer, messages, tools, add_generation_prompt=True, **template_kwargs)


def inference_prompt_ids(
    tokenizer: Any, messages: list[dict], tools: list | None = None, **template_kwargs: Any
) -> list[int]:
    """`inference_prompt` tokenized as `apply_chat_template(tokenize=True)` does (no extra special tokens)."""
    return tokenizer(inference_prompt(tokenizer, messages, tools, **template_kwargs), add_special_tokens=False)[
        "input_ids"
    ]


# --------------------------------------------------------------------------------------------------------------
# Stop tokens
# --------------------------------------------------------------------------------------------------------------


def stop_tokens(tokenizer: Any, generation_config: Any = None) -> tuple[str, ...]:
    """The tokens that end generation, as strings: `generation_config.eos_token_id` where known (given, or the
    `generation_config.json` beside a local tokenizer); else the tokenizer's EOS plus the end-of-turn tokens the
    template renders (see `template_end_of_turn`)."""
    ids = eos_ids(generation_config if generation_config is not None else local_generation_config(tokenizer))
    if ids:
        return tuple(dict.fromkeys(tokenizer.convert_ids_to_tokens(i) for i in ids))
    found = list(template_end_of_turn(tokenizer, template_for(tokenizer)))
    if tokenizer.eos_token:
        found.append(tokenizer.eos_token)
    return tuple(dict.fromkeys(found))


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(token) for token in stop_tokens(tokenizer, generation_config)]


def eos_ids(generation_config: Any) -> list[int]:
    if generation_config is None:
        return []
    value = generation_config.get("eos_token_id") if isinstance(generation_config, dict) else None
    if value is None and not isinstance(generation_config, dict):
        value = getattr(generation_config, "eos_token_id", None)
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def local_generation_config(tokenizer: Any) -> dict | None:
    path = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "generation_config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def template_end_of_turn(tokenizer: Any, template: str) -> tuple[str, ...]:
    return _end_of_turn(tokenizer, template, tuple(chat_spans.special_tokens(tokenizer)))


PROBE_CALL = {"type": "function", "function": {"name": "probe_tool", "arguments": {"a": 1}}}


@lru_cache(maxsize=64)
def _end_of_turn(tokenizer: Any, template: str, specials: tuple[str, ...]) -> tuple[str, ...]:
    """The special token the template renders right after a final reply, and at the end of a conversation that ends
    with a tool call; for templates that render none (the next role's header ends a turn), the special token that
    follows a reply before the next user turn and a tool call before its result."""
    import re

    if not specials:
        return ()
    pattern = re.compile("|".join(re.escape(t) for t in specials))
    open_, close = chat_spans.sentinels(0)
    user = {"role": "user", "content": "x"}
    reply = {"role": "assistant", "content": f"{open_}y{close}"}
    call = {"role": "assistant", "content": "", "tool_calls": [PROBE_CALL]}
    result = {"role": "tool", "content": "1", "name": "probe_tool"}

    def attempt(messages: list[dict]) -> str | None:
        try:
            return render(tokenizer, messages)
        except Exception:
            return None

    def special_at(text: str, at: int) -> str | None:
        rest = text[at:]
        match = pattern.match(text, at + len(rest) - len(rest.lstrip()))
        return match.group() if match else None

    found: list[str] = []
    last = attempt([user, reply])
    after_reply = special_at(last, last.index(close) + 1) if last and close in last else None
    ended = attempt([user, call])
    if after_reply:
        found.append(after_reply)
        matches = list(pattern.finditer(ended)) if ended else []
        if ended and matches and matches[-1].end() == len(ended.rstrip()):
            found.append(matches[-1].group())
    else:  # nothing ends a final reply: the next role's header does
        following = attempt([user, reply, {"role": "user", "content": "z"}])
        if following and close in following:
            token = special_at(following, following.index(close) + 1)
            if token:
                found.append(token)
        called = attempt([user, call, result])
        if ended and called and called.startswith(ended.rstrip()):
            token = special_at(called, len(ended.rstrip()))
            if token:
                found.append(token)
    return tuple(dict.fromkeys(found))


# --------------------------------------------------------------------------------------------------------------
# Turns as at inference
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Turn:
    """Assistant message `message`: its inference prompt (`context`) and the text to train after it (`reply`)."""

    message: int
    context: str
    reply: str
    stopped: bool  # the reply ends with a stop token (False: the rendering has none after it)
    in_whole: bool = False  # the whole rendering shows it exactly (context + reply is a prefix of it)
    reason: str = ""  # why not, when it is not


@dataclass
class Plan:
    """How a conversation becomes examples: the whole rendering `whole`, cut at `whole_end` and training the
    `whole_spans`, plus one example per turn in `separate` (context untrained, reply trained)."""

    whole: str
    turns: list[Turn] = field(default_factory=list)
    whole_end: int = 0
    whole_spans: list[tuple[int, int]] = field(default_factory=list)
    separate: list[Turn] = field(default_factory=list)


def first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """The end of the first stop token in `text` at or after `start`."""
    best = None
    for token in stops:
        found = text.find(token, start)
        if found >= 0 and (best is None or found < best[0]):
            best = (found, found + len(token))
    return best[1] if best else None


def reply_in(
    rendered: str,
    start: int,
    stops: tuple[str, ...],
    field_end: int | None = None,
    limit: int | None = None,
) -> tuple[str, bool]:
    """`rendered[start:]` through its first stop token at or after the reply's fields (before `limit`)."""
    limit = len(rendered) if limit is None else limit
    end = first_stop(rendered[:limit], stops, max(start, field_end or start))
    if end is None:
        return rendered[start:limit], False
    return rendered[start:end], True


def turn_replies(
    tokenizer: Any,
    messages: list[dict],
    turns: list[int],
    tools: list | None = None,
    template_kwargs: dict | None = None,
    stops: tuple[str, ...] | None = None,
    whole: str | None = None,
    renderer: Renderer | None = None,
    chat: list[dict] | None = None,
) -> list[Turn]:
    """Each turn's inference prompt and reply (the module's definition); raises RenderError naming the turn where
    the reply cannot be found in the template's rendering. `renderer` and `chat` (its `prepare(messages)`) may be
    passed to reuse them."""
    stops = stop_tokens(tokenizer) if stops is None else stops
    renderer = renderer or renderer_for(tokenizer, tools, template_kwargs)
    chat = renderer.prepare(messages) if chat is None else chat
    prompts = [renderer.text(chat[:t], True, messages[:t]) for t in turns]
    lasts = {t: renderer.text(chat[: t + 1], False, messages[: t + 1]) for t in turns if t + 1 < len(messages)}
    out = []
    for t, prompt in zip(turns, prompts, strict=True):
        last = (
            lasts[t]
            if t in lasts
            else whole
            if whole is not None
            else render_many(tokenizer, [messages], tools, False, template_kwargs)[0]
        )
        if last.startswith(prompt):
            field_end = field_end_of(tokenizer, messages, t, last, tools, template_kwargs, len(prompt), stops)
            reply, stopped = reply_in(last, len(prompt), stops, field_end)
            turn = Turn(t, prompt, reply, stopped)
        else:
            turn = misaligned_turn(tokenizer, messages, t, prompt, last, tools, template_kwargs, stops)
        if not turn.reply.strip():
            raise RenderError(t, "the chat template renders nothing for this assistant turn after its inference prompt")
        out.append(turn)
    return out


def field_end_of(
    tokenizer: Any,
    messages: list[dict],
    t: int,
    last: str,
    tools: list | None,
    template_kwargs: dict | None,
    start: int,
    stops: tuple[str, ...],
) -> int | None:
    """Where the reply's fields end, needed only when a stop token occurs inside the reply's own text (a reply
    that quotes `<|im_end|>`, a harmony analysis channel ended by a token that also ends a turn elsewhere)."""
    end = first_stop(last, stops, start)
    if end is None or end == len(last.rstrip()) or not reply_has_text_after(last, end, stops):
        return None
    region = field_region(tokenizer, messages, t, last, tools, template_kwargs)
    return region[1] if region else None


def reply_has_text_after(last: str, end: int, stops: tuple[str, ...]) -> bool:
    """Whether anything but whitespace and stop tokens follows `end` in the last turn's rendering."""
    return bool(strip_stops(last[end:], stops).strip())


def strip_stops(text: str, stops: tuple[str, ...]) -> str:
    for token in stops:
        text = text.replace(token, "")
    return text


def field_region(
    tokenizer: Any, messages: list[dict], t: int, last: str, tools: list | None, template_kwargs: dict | None
) -> tuple[int, int] | None:
    """Where turn t's fields (content, reasoning, tool calls) lie in `last`, its rendering as the last message."""
    history = messages[: t + 1]
    regions = chat_spans.sentinel_regions(tokenizer, history, last, tools, [t], template_kwargs)
    if regions is None:
        return chat_spans.diff_region(tokenizer, history, last, tools, t, template_kwargs)
    return regions.get(t)


def misaligned_turn(
    tokenizer: Any,
    messages: list[dict],
    t: int,
    prompt: str,
    last: str,
    tools: list | None,
    template_kwargs: dict | None,
    stops: tuple[str, ...],
) -> Turn:
    """The reply when the last-turn rendering does not start with the inference prompt: it starts after the
    rendering's own copy of the prompt's end (the generation prompt as far as it matches from its last
    occurrence before the reply's fields; for templates without one, the longest tail of the prompt)."""
    history = render_many(tokenizer, [messages[:t]], tools, False, template_kwargs)[0] if t else ""
    generation = prompt[len(history) :] if prompt.startswith(history) else ""
    region = field_region(tokenizer, messages, t, last, tools, template_kwargs)
    if region is None and generation.strip():
        common = outside_specials(last, common_prefix(prompt, last), chat_spans.special_tokens(tokenizer))
        if common >= len(history):  # the rendering leaves the prompt inside its generation prompt: a prefill
            region = (common, common)
    if region is None:
        raise RenderError(t, "the chat template does not render this assistant turn's content")
    head = last[: region[0]]
    if generation.strip():
        cuts = token_cuts(generation, chat_spans.special_tokens(tokenizer))
        anchor = next((cut for cut in cuts if generation[:cut].strip()), len(generation))
        at = head.rfind(generation[:anchor])
        size = max((cut for cut in cuts if cut >= anchor and head.startswith(generation[:cut], at)), default=anchor)
        piece = generation[:size] if at >= 0 else ""
    else:
        size = longest(lambda n: prompt[len(prompt) - n :] in head, min(len(prompt), len(head)))
        piece = prompt[len(prompt) - size :]
    if not piece.strip():
        raise RenderError(t, "the rendered reply has no copy of the inference prompt's end to start after")
    start = head.rfind(piece) + len(piece)
    reply, stopped = reply_in(last, start, stops, region[1])
    reason = PREFILL if generation.strip() and size < len(generation) else PROMPT_DIFFERS
    return Turn(t, prompt, reply, stopped, reason=reason)


def common_prefix(a: str, b: str) -> int:
    return longest(lambda n: a[:n] == b[:n], min(len(a), len(b)))


def outside_specials(text: str, position: int, specials: list[str]) -> int:
    """`position`, moved back to the start of the special token of `text` it falls inside, if any."""
    for token in specials:
        start = text.find(token, max(0, position - len(token) + 1))
        if 0 <= start < position < start + len(token):
            return start
    return position


def token_cuts(text: str, specials: list[str]) -> list[int]:
    """Positions where `text` may be cut without splitting one of its special tokens, in order."""
    inside: set[int] = set()
    for token in specials:
        at = text.find(token)
        while at >= 0:
            inside.update(range(at + 1, at + len(token)))
            at = text.find(token, at + len(token))
    return [cut for cut in range(1, len(text) + 1) if cut not in inside]


def longest(fits: Callable[[int], bool], upper: int) -> int:
    """The largest n in [0, upper] with fits(n) (fits is monotone: true up to some n, false after)."""
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def conversation_plan(
    tokenizer: Any,
    messages: list[dict],
    turns: list[int] | None = None,
    tools: list | None = None,
    template_kwargs: dict | None = None,
    stops: tuple[str, ...] | None = None,
    whole: str | None = None,
) -> Plan:
    """How `messages` is trained under the module's definition (see the module docstring)."""
    renderer = renderer_for(tokenizer, tools, template_kwargs)
    chat = renderer.prepare(messages)
    if whole is None:
        whole = renderer.text(chat, False, messages)
    if turns is None:
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    plan = Plan(whole)
    if not turns:
        return plan
    stops = stop_tokens(tokenizer) if stops is None else stops
    plan.turns = turn_replies(tokenizer, messages, turns, tools, template_kwargs, stops, whole, renderer, chat)
    cursor = 0
    for turn in plan.turns:
        start = len(turn.context)
        if turn.reason:
            pass
        elif start < cursor or not whole.startswith(turn.context):
            turn.reason = PROMPT_DIFFERS
        elif not whole.startswith(turn.reply, start):
            turn.reason = REPLY_DIFFERS
        if turn.reason:
            plan.separate.append(turn)
            continue
        if not turn.stopped:  # the rendering as last message ends without one: the next message's header stops it
            end = start + len(turn.reply)
            stop = first_stop(whole, stops, end)
            if stop is not None and not strip_stops(whole[end:stop], stops).strip():
                turn.reply, turn.stopped = whole[start:stop], True
        turn.in_whole = True
        cursor = start + len(turn.reply)
        plan.whole_spans.append((start, cursor))
    if plan.whole_spans:
        plan.whole_end = len(whole) if not plan.separate else plan.whole_spans[-1][1]
    return plan
