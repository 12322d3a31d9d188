"""A short README.md beside every saved model: what it was trained from, on what, and how."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models import MODEL_TAGS
from ..version import __version__

CARD = """---
library_name: transformers
base_model: {base_model}
tags:
{tags}
---

# {name}

Fine-tuned from `{base_model}` with [sftune](https://pypi.org/project/sftune/) {version} (supervised fine-tuning).

## Training

| setting | value |
| --- | --- |
| method | {method} |
| learning rate | {learning_rate} |
| epochs | {epochs} |
| batch size per device | {batch_size} |
| gradient accumulation | {grad_accum} |
| max sequence length | {max_len} |
| packing | {packing} |
| steps trained | {steps} |

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{path}")
tokenizer = AutoTokenizer.from_pretrained("{path}")
```
"""


def write_model_card(output_dir: Path, trainer: Any) -> Path:
    args = trainer.args
    is_peft = hasattr(trainer.model, "peft_config")
    model_tags = getattr(trainer.accelerator.unwrap_model(trainer.model), "model_tags", None) or []
    tags = list(dict.fromkeys([*MODEL_TAGS, *model_tags]))
    card = CARD.format(
        tags="\n".join(f"- {tag}" for tag in tags),
        base_model=trainer.model_id or "unknown",
        name=output_dir.name,
        version=__version__,
        method="LoRA adapters (PEFT)" if is_peft else "full fine-tuning",
        learning_rate=args.learning_rate,
        epochs=args.num_train_epochs if args.max_steps <= 0 else "-",
        batch_size=args.per_device_train_batch_size,
        grad_accum=args.gradient_accumulation_steps,
        max_len=getattr(args, "max_seq_length", None) or getattr(args, "max_length", "-"),
        packing=getattr(args, "packing", False),
        steps=trainer.state.global_step,
        path=output_dir,
    )
    path = output_dir / "README.md"
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(card)
    return path
