"""The memory-efficient SwiGLU gives the same outputs and gradients as the model's own MLP."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from sftune.compat import dtype_kwargs
from sftune.memory import RMSNorm, SwiGLU, use_memory_efficient_mlp


def test_swiglu_matches_silu_times_up_in_value_and_gradient():
    torch.manual_seed(0)
    gate = torch.randn(4, 7, 16, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 7, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate, up))
    reference = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(SwiGLU.apply(gate, up), reference)


def test_patched_model_has_identical_loss_and_gradients(tiny_llama_path):
    ids = torch.randint(5, 500, (2, 12))
    results = []
    for patch in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, **dtype_kwargs(torch.float32))
        if patch:
            # Per layer: the MLP and two norms; plus the final norm.
            assert use_memory_efficient_mlp(model) == 3 * model.config.num_hidden_layers + 1
            assert use_memory_efficient_mlp(model) == 0  # idempotent
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_saved_activations_shrink(tiny_llama_path):
    def saved_bytes(patch: bool) -> int:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, **dtype_kwargs(torch.float32))
        if patch:
            use_memory_efficient_mlp(model)
        total = 0

        def pack(tensor):
            nonlocal total
            if not isinstance(tensor, torch.nn.Parameter):
                total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.randint(5, 500, (2, 64)), labels=None).logits.sum()
        return total

    assert saved_bytes(True) < saved_bytes(False)


def test_rms_norm_matches_transformers_in_value_and_gradient():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(16, eps=1e-6).double()
    norm.weight.data.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: RMSNorm.apply(a, w, 1e-6), (x, norm.weight))
    torch.testing.assert_close(RMSNorm.apply(x, norm.weight, 1e-6), norm(x))
