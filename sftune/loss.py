"""Causal-LM loss without the full (tokens x vocabulary) logits, computed inside the model's own forward.

`enable_chunked_loss(model)` gives the causal LM a forward that, when called with `labels`, runs the model's body,
sends only the positions that have a label through the output layer, in chunks whose gradients are computed while
their logits exist (so logits are neither stored nor recomputed), and returns the usual output with that loss (and
no logits). Because it is the model's forward that does this, everything that wraps or hooks the forward sees a
normal call: DDP and FSDP gradient sync, accelerate's mixed-precision autocast, PEFT, torch.compile, forward hooks.
Without labels (generation, evaluation that needs logits) the model's own forward runs unchanged.

Only architectures whose output layer was checked are admitted (`HEAD_SCALES`), and at the first training step the
loss is compared once with the model's own on a small slice of the batch; on a mismatch the model's own loss is
used from then on, with one warning.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from .constants import IGNORE_INDEX

logger = logging.getLogger(__name__)


# model_type -> the factor the model multiplies its output layer's logits by (None: 1). Each entry was checked by
# tests/test_loss.py::test_allowlisted_architecture_matches_its_own_loss on a tiny random model of that type
# (loss and every gradient equal to the model's own), after reading its ForCausalLM.forward in transformers 5.23:
# logits = lm_head(hidden) [* scale], then the shared ForCausalLMLoss.
HEAD_SCALES: dict[str, Callable[[Any], float | None]] = {
    "llama": lambda config: None,
    "mistral": lambda config: None,
    "qwen2": lambda config: None,
    "qwen3": lambda config: None,
    "gemma": lambda config: None,
    "phi3": lambda config: None,
    "olmo2": lambda config: None,
    "smollm3": lambda config: None,
    "stablelm": lambda config: None,
    "starcoder2": lambda config: None,
    "granite": lambda config: 1.0 / config.logits_scaling,
    "cohere": lambda config: config.logit_scale,
}

# The first-step check compares on at most this many tokens of one row (a causal model's first n outputs depend
# only on the first n tokens, so cutting the row is exact).
CHECK_TOKENS = 256
# Relative tolerance of the first-step check. Both losses come from the same hidden states through the same
# weights; they differ only by summation order (~1e-7 relative in float32) or, under bf16/fp16 autocast, by how
# the output layer's matmul is blocked for a different number of rows (each logit rounded to 8 bits of mantissa,
# i.e. 4e-3 relative, errors that average out over thousands of logits to well under 1e-3 of the loss). A head
# this check exists to catch (a missing scale, softcap or bias) changes the loss by far more than 1% on any
# non-trivial model: Granite's logits_scaling is 4-16, Cohere's logit_scale 0.06-0.125.
CHECK_RTOL = {torch.float32: 1e-4, torch.float64: 1e-6}
CHECK_RTOL_LOW_PRECISION = 1e-2


@dataclass
class ChunkedLoss:
    """Per-model settings of the chunked loss. It holds no per-step results: those are on the forward's output."""

    chunk_size: int
    scale: float | None
    active: bool = True  # False after a failed first-step check: the model's own loss from then on
    checked: bool = False
    suspended: int = 0  # > 0 inside `model_own_loss()`


@dataclass
class CausalLMOutputWithTokenCounts(CausalLMOutputWithPast):
    """The chunked forward's output: the loss without logits, and what it counted while it had them.

    `num_label_tokens`: the tokens that had a label (the loss's denominator when not given one);
    `num_correct_tokens`: those whose label was the argmax prediction. Both are 0-dim int64 tensors on the model's
    device (reading them does not synchronise with the device until the caller converts them). A `ModelOutput`
    subclass, so DDP, FSDP, DeepSpeed, accelerate's float32 output conversion and torch's pytree keep the fields.
    """

    num_label_tokens: torch.Tensor | None = None
    num_correct_tokens: torch.Tensor | None = None


def token_counts(outputs: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(labelled, correct) token counts a forward returned on its output, or None when it returned none."""
    labelled = getattr(outputs, "num_label_tokens", None)
    correct = getattr(outputs, "num_correct_tokens", None)
    if labelled is None or correct is None:
        return None
    # nn.DataParallel gathers a 0-dim tensor per device into a vector: the batch's count is their sum.
    return labelled.sum(), correct.sum()


def _linear_cross_entropy(hidden, weight, bias, targets, scale, chunk_size, wants=(False, False, False)):
    """Summed cross-entropy of `linear(hidden, weight, bias) * scale` against `targets`, chunk by chunk, and the
    number of correct predictions; plus, for each input flagged in `wants` (hidden, weight, bias), its gradient.

    The gradients are computed while each chunk's logits exist anyway: softmax minus one-hot, then the two matmuls
    of the output layer's backward. Against recomputing each chunk in the backward pass this saves one
    output-layer matmul and three full passes over the (chunk x vocabulary) logits per chunk; only
    (rows x hidden) and the weight's gradient are kept, never the logits. Under autocast the matmuls run in the
    autocast dtype, as the model's own head would; the softmax is always float32.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(device_type, enabled=False):
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        grad_hidden = torch.empty_like(h) if wants[0] else None
        # Accumulated across chunks in the parameter's dtype, as autograd would.
        grad_weight = torch.zeros_like(weight) if wants[1] else None
        grad_bias = torch.zeros_like(bias) if wants[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, targets.numel(), chunk_size):
            rows = slice(start, start + chunk_size)
            target = targets[rows][:, None]
            logits = F.linear(h[rows], w, b)
            if scale is not None:
                log_probs = torch.log_softmax(logits.float().mul_(scale), dim=-1)
            else:  # float32 softmax straight from bf16/fp16 logits, without a float copy first
                log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            del logits
            picked = log_probs.gather(1, target)
            total -= picked.sum()
            correct += (log_probs.argmax(-1, keepdim=True) == target).sum()
            if not any(wants):
                continue
            grad = log_probs.exp_()  # softmax, in place
            grad.scatter_add_(1, target, torch.full_like(picked, -1.0))
            if scale is not None:
                grad.mul_(scale)
            grad = grad.to(compute_dtype)
            del log_probs
            if grad_hidden is not None:
                torch.mm(grad, w, out=grad_hidden[rows])
            if grad_weight is not None:
                grad_weight += grad.t() @ h[rows]
            if grad_bias is not None:
                grad_bias += grad.sum(0)
    return total, correct, (grad_hidden, grad_weight, grad_bias)


class _LinearCrossEntropy(torch.autograd.Function):
    """`_linear_cross_entropy` for autograd: the gradients come from the forward pass; the backward only multiplies
    them by the incoming gradient (the loss is a sum, so its gradient is that one scalar times these)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, chunk_size):  # noqa: ANN001, ANN205
        wants = ctx.needs_input_grad[:3]
        total, correct, grads = _linear_cross_entropy(hidden, weight, bias, targets, scale, chunk_size, wants)
        ctx.save_for_backward(*grads)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_correct):  # noqa: ANN001, ANN205
        grads = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.saved_tensors]
        if grads[0] is not None:
            grads[0] = grads[0].to(ctx.hidden_dtype)
        return *grads, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of `head(hidden) * scale` against `labels` (both (batch, seq, ...), unshifted).

    Returns (loss, number of labelled tokens, number predicted correctly). The loss is summed over labelled
    tokens and divided by `num_items_in_batch` when given (token average over an accumulated batch), else by
    the count here. With no labelled token the loss is a zero still connected to the head and the hidden states,
    so backward gives zero gradients (and DDP sees every parameter used) instead of failing.
    """
    shifted = labels[:, 1:]
    keep = shifted != IGNORE_INDEX
    selected = hidden[:, :-1][keep]
    targets = shifted[keep]
    count = targets.numel()

    def head_loss(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = head.weight, head.bias  # read inside the head's call: gathered there by sharded engines
        if count == 0:
            total = F.linear(selected, weight, bias).float().sum()  # an empty product: exactly 0
            return total, torch.zeros((), dtype=torch.long, device=hidden.device)
        if torch.is_grad_enabled() and (selected.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(selected, weight, bias, targets, scale, chunk_size)
        total, correct, _ = _linear_cross_entropy(selected, weight, bias, targets, scale, chunk_size)
        return total, correct

    total, correct = call_as_forward(head, head_loss, selected)
    denominator = num_items_in_batch if num_items_in_batch is not None else count
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device).clamp(min=1)
    else:
        denominator = max(denominator, 1)
    return total / denominator, torch.tensor(count, device=total.device), correct


def call_as_forward(module: torch.nn.Module, function: Callable, *args: Any) -> Any:
    """`function(*args)` run as `module`'s forward: through `module(...)`, so that the hooks engines put on the
    module run around it. FSDP2 and DeepSpeed ZeRO-3 gather a module's sharded parameters in its forward pre-hook
    and set up their gradients' reduction from it; reading `module.weight` outside a call sees only a shard."""
    own = module.__dict__.get("forward")
    module.forward = function  # an instance attribute shadows the class's forward for this one call
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


# ----------------------------------------------------------------------------------------------------------------
# The forward
# ----------------------------------------------------------------------------------------------------------------


def causal_lm_of(model: Any) -> Any:
    """The causal LM under a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_chunked_loss(model: Any) -> bool:
    """True for causal LMs of an allowlisted architecture with a plain linear output layer."""
    causal = causal_lm_of(model)
    config = getattr(causal, "config", None)
    if config is None or getattr(config, "model_type", None) not in HEAD_SCALES:
        return False
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    body = getattr(causal, "base_model", None)
    return isinstance(head, torch.nn.Linear) and body is not None and body is not causal


def enable_chunked_loss(model: Any, chunk_size: int) -> ChunkedLoss | None:
    """Make `model`'s forward compute the chunked loss when given labels; returns its settings, or None when the
    architecture is not allowlisted (the model's own loss is then used). Call it before accelerate prepares the
    model, so that mixed precision and distributed wrappers wrap this forward."""
    if chunk_size <= 0 or not supports_chunked_loss(model):
        return None
    causal = causal_lm_of(model)
    state = causal.__dict__.get("_sftune_chunked_loss")
    if state is not None:
        state.chunk_size = chunk_size
        return state
    state = ChunkedLoss(chunk_size, HEAD_SCALES[causal.config.model_type](causal.config))
    causal._sftune_chunked_loss = state
    # Bound to the instance (copy.deepcopy rebinds it to the copy); keeps the original signature, so the Trainer's
    # column selection, loss-kwargs detection and generate() see the model's own parameters.
    causal.forward = types.MethodType(_forward_with_chunked_loss(type(causal).forward), causal)
    return state


@contextlib.contextmanager
def model_own_loss(state: ChunkedLoss | None) -> Iterator[None]:
    """Within this block the model computes its own loss over full logits (evaluation that needs the logits)."""
    if state is None:
        yield
        return
    state.suspended += 1
    try:
        yield
    finally:
        state.suspended -= 1


def _forward_with_chunked_loss(original: Callable) -> Callable:
    signature = inspect.signature(original)
    # `**kwargs` in transformers 5, `**loss_kwargs` in 4.x: whatever its name, it is the extra keyword arguments.
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        state: ChunkedLoss = self._sftune_chunked_loss
        own = functools.partial(original, self)
        arguments = signature.bind_partial(self, *args, **kwargs).arguments
        extra = dict(arguments.pop(var_keyword, None) or {}) if var_keyword else {}
        arguments.pop("self")
        labels = arguments.get("labels")
        if labels is None or state.suspended or not _plain_training_call(arguments, extra):
            return own(*args, **kwargs)
        if not state.active:
            return _own_loss(own, arguments, extra)
        if not state.checked and self.training and torch.is_grad_enabled():
            _check_once(self, state, own, arguments, extra)
            if not state.active:
                return _own_loss(own, arguments, extra)
        num_items_in_batch = extra.pop("num_items_in_batch", None)
        outputs = self.base_model(**_body_inputs(arguments), **_body_extra(self.base_model, extra))
        loss, count, correct = chunked_cross_entropy(
            outputs.last_hidden_state,
            self.get_output_embeddings(),
            labels,
            num_items_in_batch,
            state.chunk_size,
            state.scale,
        )
        return CausalLMOutputWithTokenCounts(
            loss=loss,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            num_label_tokens=count,
            num_correct_tokens=correct,
        )

    del forward.__wrapped__  # accelerate's unwrapping follows __wrapped__ and would strip this forward off
    forward.__signature__ = signature
    return forward


def _plain_training_call(arguments: dict[str, Any], extra: dict[str, Any]) -> bool:
    """A call the chunked loss computes exactly: no cache, no logit slicing, a dict output."""
    return (
        arguments.get("past_key_values") is None
        and not arguments.get("logits_to_keep")
        and not arguments.get("num_logits_to_keep")  # its transformers 4.x name
        and extra.get("return_dict", True) is not False
    )


def _body_inputs(arguments: dict[str, Any]) -> dict[str, Any]:
    body = {
        k: v for k, v in arguments.items() if k not in ("labels", "logits_to_keep", "num_logits_to_keep", "use_cache")
    }
    return {**body, "use_cache": False}


def _body_extra(body: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The extra keyword arguments the model body takes. transformers 5's bodies take any (`**kwargs`); 4.x's
    take only their named ones, the causal LM keeping the rest (`token_type_ids` from a tokenizer, ...) for its
    loss, as here."""
    parameters = inspect.signature(body.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return extra
    return {k: v for k, v in extra.items() if k in parameters}


def _own_loss(own: Callable, arguments: dict[str, Any], extra: dict[str, Any]) -> Any:
    """The model's own forward and loss; a batch without labelled tokens gives a zero loss (its mean is 0/0)."""
    outputs = own(**arguments, **extra)
    if not (arguments["labels"][:, 1:] != IGNORE_INDEX).any():
        outputs.loss = torch.nan_to_num(outputs.logits.float()).sum() * 0
    return outputs


def _check_once(model: Any, state: ChunkedLoss, own: Callable, arguments: dict[str, Any], extra: dict) -> None:
    """Compare the chunked loss with the model's own on one row (at most CHECK_TOKENS tokens) that has labels.

    Runs without gradients and in eval mode (no dropout, so no random numbers drawn), once."""
    labels = arguments["labels"]
    # The row is cut to CHECK_TOKENS tokens, whose shifted labels are positions 1 .. CHECK_TOKENS - 1.
    labelled_rows = (labels[:, 1:CHECK_TOKENS] != IGNORE_INDEX).any(dim=1).nonzero()
    # Under sharded engines every forward gathers parameters (a collective): all ranks check together, or none.
    if not any_rank(len(labelled_rows) > 0, labels.device):
        return  # nothing to compare on in this batch on any rank; try the next one
    row = int(labelled_rows[0]) if len(labelled_rows) else 0  # a rank without one runs the check for the others
    counts = len(labelled_rows) > 0
    batch, length = labels.shape
    cut = min(length, CHECK_TOKENS)

    def one_row(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
            return value
        value = value[row : row + 1]
        if value.dim() >= 2 and value.shape[1] == length:
            value = value[:, :cut]
        if value.dim() == 4 and value.shape[-1] == length and value.shape[-2] == length:  # (batch, 1, q, k) mask
            value = value[..., :cut, :cut]
        return value

    small = {key: one_row(value) for key, value in arguments.items()}
    small_extra = {key: one_row(value) for key, value in extra.items() if key != "num_items_in_batch"}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = own(**small, **small_extra).loss.float()
            outputs = model.base_model(**_body_inputs(small), **_body_extra(model.base_model, small_extra))
            chunked, _, _ = chunked_cross_entropy(
                outputs.last_hidden_state, model.get_output_embeddings(), small["labels"], None, state.chunk_size,
                state.scale,
            )  # fmt: skip
    finally:
        model.train(was_training)
    state.checked = True
    low_precision = torch.is_autocast_enabled(reference.device.type) or model.dtype not in CHECK_RTOL
    rtol = CHECK_RTOL_LOW_PRECISION if low_precision else CHECK_RTOL[model.dtype]
    difference = abs(float(chunked) - float(reference))
    mismatch = counts and not difference <= rtol * max(1.0, abs(float(reference)))
    if any_rank(mismatch, labels.device):  # one loss for all ranks: the same forward, the same collectives
        state.active = False
        if not mismatch:
            logger.warning("The chunked loss check failed on another process: training with the model's own loss.")
            return
        logger.warning(
            "The chunked loss (%.6f) differs from %s's own loss (%.6f) on the first batch, beyond the tolerance "
            "%.0e: training with the model's own loss over full logits instead (more memory). Please report this "
            "architecture; set loss_chunk_size=0 to skip this check.",
            float(chunked),
            type(model).__name__,
            float(reference),
            rtol,
        )


def any_rank(flag: bool, device: torch.device) -> bool:
    """`flag` or'ed over all processes (the flag itself when not distributed): a decision every rank takes alike."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return bool(flag)
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())
