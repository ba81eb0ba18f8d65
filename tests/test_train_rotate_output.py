"""oft_core.train.rotate_output: the trained layer's rotated output as one autograd Function (memory of a step).

Pinned: the forward gives the values of the plain autograd expression it replaces (bit for bit in one piece),
`y + (rotate_features(z) − z)` with z = y − bias (`rotate_features(y)` without a bias), for Linear and Conv2d
outputs, one split and FLUX-style fused splits, fp32 and bf16 (plain and under autocast), in one piece and cut into
many; its gradients (for the activation and for every rotation block) match autograd on that expression; and it keeps
for backward only the layer's output y and the blocks — never an extra activation-sized copy.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import oft_core.train as train
from oft_core.rotation import rotate_features
from oft_core.train import OFTTrainer, rotate_output


def reference(layer, y, bias, blocks, dim):
    if bias is None:
        return rotate_features(layer, y, dim=dim, blocks=blocks)
    z = y - (bias.reshape(-1, 1, 1) if dim == 1 else bias).to(y.dtype)
    return y + (rotate_features(layer, z, dim=dim, blocks=blocks) - z)


def case(kind: str, bias: bool, splits: int = 1, seed: int = 0):
    """(trained layer, y, bias, blocks as leaves with gradients, dim) with non-trivial rotations."""
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        out = 48 * splits
        m = nn.Linear(16, out, bias=bias)
        path = "double_blocks.0.img_attn.qkv" if splits == 3 else "layer"
        y = torch.randn(2, 37, out, generator=g)
        dim = -1
    else:
        m = nn.Conv2d(3, 24, 3, padding=1, bias=bias)
        path = "conv"
        y = torch.randn(2, 24, 7, 5, generator=g)
        dim = 1
    t = OFTTrainer([(path, m)], num_blocks=4, alpha=0)
    tl = t.layers[0]
    with torch.no_grad():
        for p in tl.params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    blocks = [b.detach().clone().requires_grad_(True) for b in t.blocks(tl)]
    b = torch.randn(m.weight.shape[0], generator=g) if bias else None
    return tl.layer, y, b, blocks, dim


CASES = [("linear", True, 1), ("linear", False, 1), ("linear", True, 3), ("linear", False, 3), ("conv", True, 1),
         ("conv", False, 1)]


@pytest.mark.parametrize("kind,bias,splits", CASES)
@pytest.mark.parametrize("chunk", [None, 40])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "autocast-bf16"])
def test_rotate_output_is_the_autograd_expression(kind, bias, splits, chunk, dtype, monkeypatch):
    if chunk is not None:  # many pieces (some of one row, some of several), also for conv outputs
        monkeypatch.setattr(train, "_CHUNK_ELEMENTS", chunk)
    layer, y, b, blocks, dim = case(kind, bias, splits)
    if dtype == "bf16":
        y, b = y.bfloat16(), None if b is None else b.bfloat16()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "autocast-bf16" else contextlib.nullcontext()
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    results = []
    for fn in (reference, lambda *a: rotate_output(a[0], a[1], a[2], a[3], dim=a[4])):
        yy = y.detach().clone().requires_grad_(True)
        bl = [x.detach().clone().requires_grad_(True) for x in blocks]
        with ctx:
            out = fn(layer, yy, b, bl, dim)
        out.backward(g)
        results.append((out.detach(), yy.grad, [x.grad for x in bl]))
    (o_ref, gy_ref, gb_ref), (o, gy, gb) = results
    assert o.dtype == o_ref.dtype and o.shape == o_ref.shape
    if chunk is None:
        assert torch.equal(o, o_ref)  # the forward in one piece: the same values, bit for bit
    else:  # in pieces the GEMM kernels may round differently (a few ulp)
        eps = 1e-6 if dtype == "fp32" else 1e-2
        torch.testing.assert_close(o, o_ref, rtol=eps, atol=eps)
    # the gradients: the same derivatives, computed in fp32 (the reference rounds through y's dtype more often)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "fp32" else dict(rtol=2e-2, atol=2e-2)
    assert gy.dtype == gy_ref.dtype
    torch.testing.assert_close(gy.float(), gy_ref.float(), **tol)
    scale = max(float(x.abs().max()) for x in gb_ref)
    for a, r in zip(gb, gb_ref):
        assert a.shape == r.shape and bool(a.abs().sum() > 0)
        torch.testing.assert_close(a / scale, r / scale, **tol)


def test_identity_rotation_gives_the_base_output_bit_for_bit():
    layer, y, b, blocks, dim = case("linear", True)
    eye = [torch.eye(x.shape[-1]).expand_as(x).clone() for x in blocks]
    assert torch.equal(rotate_output(layer, y, b, eye, dim=dim), y)
    layer, y, b, blocks, dim = case("conv", True)
    eye = [torch.eye(x.shape[-1]).expand_as(x).clone() for x in blocks]
    assert torch.equal(rotate_output(layer, y, b, eye, dim=dim), y)


@pytest.mark.parametrize("kind,bias,splits", CASES)
def test_only_the_output_and_the_blocks_are_kept_for_backward(kind, bias, splits):
    """The layer keeps y (z = y − bias is made again in backward) and the blocks; the plain expression keeps z, an
    activation-sized tensor of its own, and more in bf16 (its fp32 copy)."""
    layer, y, b, blocks, dim = case(kind, bias, splits)
    y = y.requires_grad_(True)

    def kept(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        out.sum().backward()
        return seen

    ours = kept(lambda: rotate_output(layer, y, b, blocks, dim=dim))
    expected = {y.untyped_storage().data_ptr()} | {x.untyped_storage().data_ptr() for x in blocks}
    assert set(ours) == expected
    theirs = kept(lambda: reference(layer, y, b, blocks, dim))
    block_bytes = sum(x.untyped_storage().nbytes() for x in blocks)
    assert sum(ours.values()) - block_bytes <= y.untyped_storage().nbytes()
    if bias:
        assert sum(theirs.values()) - block_bytes >= y.untyped_storage().nbytes()
