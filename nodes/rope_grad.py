"""A backward for comfy-kitchen's RoPE ops, when the installed comfy-kitchen has none (training needs it).

Newer ComfyUI (0.8.0: `comfy/ldm/flux/math.py`, `apply_rope = comfy.quant_ops.ck.apply_rope`) computes RoPE in every
FLUX, Wan, Qwen-Image, HiDream, Lumina and Kandinsky forward through comfy-kitchen's custom ops
`comfy_kitchen::apply_rope` / `comfy_kitchen::apply_rope1` (`torch.library.custom_op`). comfy-kitchen 0.2.40 registers
no autograd formula for them, so any backward through attention fails ("Trying to backward through
comfy_kitchen.apply_rope.default but no autograd formula was registered"): the OFT trainer (and core's LoRA trainer)
cannot train those models. ComfyUI 0.3.64 has its own plain-torch RoPE and comfy-kitchen is not used.

RoPE is linear in its input: each pair (x[2k], x[2k+1]) is multiplied by the 2×2 matrix M = freqs_cis[..., k, :, :]
(ComfyUI's layout: out_i = Σ_j M[i, j] x_j). Its gradient is Mᵀ applied to the output gradient, i.e. the same op with
freqs_cis transposed in its last two dimensions: exact, no new math. freqs_cis (positions, never trained) gets no
gradient.

`ensure_rope_backward()` probes each op once with a 1×1×1×2 tensor and registers the formula only when a backward
through it fails (feature detection: a comfy-kitchen that ships its own formula is left alone; without comfy-kitchen
or on 0.3.64 nothing happens). The registration is process-wide and changes no forward value.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_CHECKED = False


def _transposed(freqs_cis: torch.Tensor) -> torch.Tensor:
    return freqs_cis.transpose(-1, -2).contiguous()


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[-1])  # freqs_cis (a constant: positions)


def _backward_rope1(ctx, grad):
    (freqs_cis,) = ctx.saved_tensors
    return torch.ops.comfy_kitchen.apply_rope1(grad.contiguous(), _transposed(freqs_cis)), None


def _backward_rope(ctx, grad_q, grad_k):
    (freqs_cis,) = ctx.saved_tensors
    ft = _transposed(freqs_cis)
    op = torch.ops.comfy_kitchen.apply_rope1
    dq = None if grad_q is None else op(grad_q.contiguous(), ft)
    dk = None if grad_k is None else op(grad_k.contiguous(), ft)
    return dq, dk, None


def _probe(name: str) -> bool | None:
    """Whether a backward through comfy_kitchen::`name` works: False when it has no formula, None when the probe
    itself fails otherwise (an op whose signature changed: left alone)."""
    op = getattr(torch.ops.comfy_kitchen, name)
    freqs = torch.eye(2).reshape(1, 1, 1, 1, 2, 2)  # (batch, heads, tokens, head_dim / 2, 2, 2)
    x = torch.ones(1, 1, 1, 2, requires_grad=True)  # (batch, heads, tokens, head_dim)
    try:
        out = op(x, freqs) if name == "apply_rope1" else op(x, x, freqs)[0]
        out.sum().backward()
    except RuntimeError as e:
        if "autograd" in str(e):
            return False
        log.warning("comfy_kitchen::%s could not be probed (%s): its backward is left as it is", name, e)
        return None
    return True


def ensure_rope_backward() -> None:
    """Register the exact RoPE backward on comfy-kitchen's apply_rope / apply_rope1 where they have none."""
    global _CHECKED
    if _CHECKED:
        return
    try:
        import comfy_kitchen  # noqa: F401  (defines the ops where it is installed)
    except ImportError:
        pass
    ns = torch.ops.comfy_kitchen
    with torch.inference_mode(False), torch.enable_grad():
        for name, backward in (("apply_rope1", _backward_rope1), ("apply_rope", _backward_rope)):
            if not hasattr(ns, name) or _probe(name) is not False:
                continue
            torch.library.register_autograd(f"comfy_kitchen::{name}", backward, setup_context=_setup_context)
            if not _probe(name):
                raise RuntimeError(f"comfy_kitchen::{name} still has no backward after registering one")
            log.info("comfy-kitchen's %s has no autograd formula: registered the exact RoPE backward "
                     "(needed to train FLUX-like models)", name)
    _CHECKED = True
