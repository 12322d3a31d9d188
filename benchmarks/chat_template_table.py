"""What each shared chat template's conversations become: tokens, trained tokens, whether every trained turn's
context equals its inference prompt, and which rendering was used (a Markdown table).

    python benchmarks/chat_template_table.py [--templates /work/shared/chat-templates]

The conversation: a system prompt (dropped for templates without a system role) and 3 user/assistant turns with
reasoning on every reply. "context == inference prompt" is checked on tokens, independently of the renderer: the
ids before each trained run must equal `apply_chat_template(messages[:t], add_generation_prompt=True,
tokenize=True)` (a reply starting with characters that merge with the prompt's last token is the one exception,
and none occurs here).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two make four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six.", "reasoning_content": "Three and three make six."},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "Eight.", "reasoning_content": "Four doubled is eight."},
]


def ids_of(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def row_for(name: str) -> dict:
    import datasets

    from sftune.data import render
    from sftune.data.tokenize import TokenizeOptions, prepare_dataset
    from tests import real_tokenizers

    datasets.disable_progress_bars()
    tokenizer = real_tokenizers.load(name)
    messages = MESSAGES
    try:
        tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:
        messages = MESSAGES[1:]  # no system role
    options = TokenizeOptions(max_length=None, assistant_only_loss=True)
    data = datasets.Dataset.from_list([{"messages": messages}])
    rows = list(prepare_dataset(data, tokenizer, options))
    whole = ids_of(tokenizer.apply_chat_template(messages, tokenize=True))
    turns = [t for t, m in enumerate(messages) if m["role"] == "assistant"]
    prompts = [
        ids_of(tokenizer.apply_chat_template(messages[:t], add_generation_prompt=True, tokenize=True)) for t in turns
    ]
    runs = []
    for row in rows:
        ids, mask = row["input_ids"], row["loss_mask"]
        i = 0
        while i < len(ids):
            if mask[i]:
                j = i
                while j < len(ids) and mask[j]:
                    j += 1
                runs.append(ids[:i])
                i = j
            else:
                i += 1
    matched = sum(1 for context in runs if context in prompts)
    plan = render.conversation_plan(tokenizer, messages)
    apart = len(plan.separate)
    if not apart:
        rendering = "whole conversation"
    else:
        reasons = sorted({t.reason.split(" (")[0] for t in plan.separate})
        kept = "whole conversation + " if plan.whole_spans else ""
        rendering = f"{kept}{apart} turn(s) apart: {'; '.join(reasons)}"
    return {
        "template": name,
        "examples": len(rows),
        "tokens": sum(len(r["input_ids"]) for r in rows),
        "whole_tokens": len(whole),
        "trained": sum(sum(r["loss_mask"]) for r in rows),
        "context_ok": f"{matched}/{len(turns)}" + (" yes" if matched == len(turns) == len(runs) else " NO"),
        "rendering": rendering,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    from tests import real_tokenizers

    names = sorted(n for n in real_tokenizers.PAIRS if (real_tokenizers.TEMPLATES_DIR / f"{n}.jinja").exists())
    print("| template | examples | tokens (whole rendering) | trained | context == inference prompt | rendering |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        r = row_for(name)
        print(
            f"| {r['template']} | {r['examples']} | {r['tokens']} ({r['whole_tokens']}) | {r['trained']} | "
            f"{r['context_ok']} | {r['rendering']} |"
        )


if __name__ == "__main__":
    main()
