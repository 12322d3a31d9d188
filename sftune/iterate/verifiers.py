"""Verifiers: does a reply deserve to be trained on? Built-ins and user functions given as `module:function`.

A verifier is `verify(reply: str, reference) -> bool`. It is resolved (and its options checked) before any
generation, so a typo costs a second, not a round of sampling.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable
from typing import Any

from ..errors import VerifierError

Verifier = Callable[[str, Any], bool]


def exact_match(strip: bool = True, case_sensitive: bool = True) -> Verifier:
    def verify(reply: str, reference: Any) -> bool:
        a, b = (reply.strip(), str(reference).strip()) if strip else (reply, str(reference))
        return a == b if case_sensitive else a.lower() == b.lower()

    return verify


def regex(pattern: str | None = None, full: bool = False, flags: str = "") -> Verifier:
    """Accept replies matching `pattern` (searched; `full: true` for the whole reply). Without a pattern, the
    reference of each row is the pattern."""
    flag_bits = 0
    for letter in flags:
        flag_bits |= {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}[letter]
    compiled = re.compile(pattern, flag_bits) if pattern is not None else None

    def verify(reply: str, reference: Any) -> bool:
        rx = compiled or re.compile(str(reference), flag_bits)
        return bool((rx.fullmatch if full else rx.search)(reply.strip() if full else reply))

    return verify


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def extract_number(text: str, which: str = "last") -> float | None:
    """The last (or first) number written in `text` (`1,234`, `-3.5`, `2e3`), or None."""
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float((found[-1] if which == "last" else found[0]).replace(",", ""))
    except ValueError:
        return None


def number(which: str = "last", rel_tol: float = 1e-6, abs_tol: float = 1e-9, only_number: bool = False) -> Verifier:
    """Accept a reply whose last (`which: first`) number equals the reference's. `only_number: true` also requires
    the reply to be just that number."""

    def verify(reply: str, reference: Any) -> bool:
        expected = float(reference) if isinstance(reference, (int, float)) else extract_number(str(reference))
        if expected is None:
            raise ValueError(f"the reference {reference!r} holds no number")
        if only_number and not NUMBER.fullmatch(reply.strip()):
            return False
        got = extract_number(reply, which)
        return got is not None and math.isclose(got, expected, rel_tol=rel_tol, abs_tol=abs_tol)

    return verify


def valid_json(equal_reference: bool = False, require_object: bool = False) -> Verifier:
    """Accept replies that parse as JSON (an object if `require_object`; equal to the reference's JSON if
    `equal_reference`)."""

    def verify(reply: str, reference: Any) -> bool:
        try:
            value = json.loads(reply)
        except ValueError:
            return False
        if require_object and not isinstance(value, dict):
            return False
        if equal_reference:
            expected = json.loads(reference) if isinstance(reference, str) else reference
            return value == expected
        return True

    return verify


BUILT_INS: dict[str, Callable[..., Verifier]] = {
    "exact": exact_match,
    "exact_match": exact_match,
    "regex": regex,
    "number": number,
    "json": valid_json,
}


def make_verifier(name: str, args: dict[str, Any] | None = None) -> Verifier:
    """The verifier called `name` (a built-in, or `module:function` importable from here) with options `args`.

    Raises ValueError with the fix when the name or the options are wrong."""
    args = dict(args or {})
    if name in BUILT_INS:
        try:
            return BUILT_INS[name](**args)
        except TypeError as err:
            raise ValueError(f"verifier {name!r}: bad verifier_args {args}: {err}.") from err
        except re.error as err:
            raise ValueError(f"verifier {name!r}: the pattern is not a valid regular expression: {err}.") from err
    if ":" not in name:
        raise ValueError(
            f"Unknown verifier {name!r}. Use one of {', '.join(sorted(BUILT_INS))}, or your own function as "
            "'module:function' (called as function(reply, reference) -> bool)."
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"verifier {name!r}: cannot import module {module_name!r}: {err}.") from err
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"verifier {name!r}: module {module_name!r} has no function {attr!r}.")
    if args:
        import functools

        return functools.partial(function, **args)
    return function


def check(verify: Verifier, reply: str, reference: Any, prompt_id: Any) -> bool:
    """`verify(reply, reference)` as a bool; an exception names the prompt and the reply."""
    try:
        return bool(verify(reply, reference))
    except Exception as err:
        raise VerifierError(
            f"The verifier raised {type(err).__name__}: {err} on prompt {prompt_id!r}, reply {reply[:200]!r} "
            f"(reference {str(reference)[:100]!r})."
        ) from err
