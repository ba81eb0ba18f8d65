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

import oft_core.bypass as bypass
import oft_core.train as train
from oft_core.rotation import rotate_features
from oft_core.train import OFTTrainer, rotate_output


def reference(layer, y, bias, blocks, dim):
    if bias is None:
        return rotate_features(layer, y, dim=dim, blocks=blocks)
    z = y - (bias.reshape(-1, 1, 1) if dim == 1 else bias).to(y.dtype)
    return y + (rotate_features(layer, z, dim=dim, blocks=blocks) - z)


def exact_output(layer, y, bias, blocks, dim):
    """(out, the change (M − I)·z) in fp64 from the inputs as given (y, bias in their dtype, the fp32 blocks)."""
    y64 = y.double().movedim(dim, -1)  # features last (a Conv2d's channels moved there), M = blockdiag per split
    z = y64 if bias is None else y64 - bias.double()
    parts, start = [], 0
    for x, n, b in zip(blocks, layer.num_blocks, layer.block_sizes):
        v = z[..., start:start + n * b].unflatten(-1, (n, b))
        parts.append(torch.einsum("...nc,nbc->...nb", v, x.detach().double()).flatten(-2))
        start += n * b
    change = torch.cat(parts, -1) - z
    return (y64 + change).movedim(-1, dim), change.movedim(-1, dim)


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
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "autocast-bf16"])
def test_rotate_output_is_the_autograd_expression(kind, bias, splits, chunk, dtype, monkeypatch):
    if chunk is not None:  # many pieces (some of one row, some of several), also for conv outputs
        monkeypatch.setattr(train, "_CHUNK_ELEMENTS", chunk)
    layer, y, b, blocks, dim = case(kind, bias, splits)
    if dtype in ("bf16", "fp16"):
        half = torch.bfloat16 if dtype == "bf16" else torch.float16
        y, b = y.to(half), None if b is None else b.to(half)
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
    if kind == "conv" and dtype in ("fp32", "autocast-bf16"):  # channels first: y + D·y − D·b, fp32 products
        exact, change = exact_output(layer, y, b, blocks, dim)
        err = (o.double() - exact).abs()
        assert bool((err <= 2 ** -21 * (exact.abs() + change.abs().amax(1, keepdim=True))).all())
        assert float(err.max()) <= 4 * float((o_ref.double() - exact).abs().max()) + 1e-12
    elif dtype in ("bf16", "fp16"):  # `_RotateOutputHalf` / channels first: the change D·z in 16 bits
        exact, change = exact_output(layer, y, b, blocks, dim)
        # the output's own rounding (2⁻⁹ relative, 2⁻⁸ for two roundings) plus the change's (≤ 2⁻⁷ of its size)
        err = (o.double() - exact).abs()
        assert bool((err <= 2 ** -8 * exact.abs() + 2 ** -7 * change.abs().amax(dim, keepdim=True)).all())
        ref_err = (o_ref.double() - exact).abs().max()
        # within a few roundings of the fp32-math rotation rounded to 16 bits (0.5 ulp): D's own rounding and the
        # product's add up to ~1.5 ulp where the test's large rotations make D·z as large as y
        assert float(err.max()) <= 3 * float(ref_err)
    elif chunk is None:
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_the_output_and_the_blocks_are_kept_for_backward(kind, bias, splits, dtype):
    """The layer keeps y (z = y − bias is made again in backward) and the blocks; the plain expression keeps z, an
    activation-sized tensor of its own, and more in bf16 (its fp32 copy)."""
    layer, y, b, blocks, dim = case(kind, bias, splits)
    y, b = y.to(dtype).requires_grad_(True), None if b is None else b.to(dtype)

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


def test_the_16_bit_rotation_works_in_pieces_sized_for_the_device():
    """On a CPU the rows of a large output are cut into cache-sized pieces (`bypass._piece_rows`: at least
    `_MIN_PIECE_ROWS` rows); on an accelerator into pieces of `_ACCELERATOR_PIECE_ELEMENTS`, so a FLUX.1 linear1
    output at 4096 tokens takes a handful of batched products per pass, not hundreds of kernel launches. Counted on
    the meta device (shapes only, no data)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten.baddbmm.out
            return func(*args, **(kwargs or {}))

    m = nn.Linear(8, 21504)
    t = OFTTrainer([("linear1", m)], block_size=8, alpha=0)
    tl = t.layers[0]
    for device in ("meta", "cpu"):
        y = torch.zeros(4096, 21504, dtype=torch.bfloat16, device=device, requires_grad=True)
        blocks = [torch.eye(8, device=device).expand(21504 // 8, 8, 8).clone().requires_grad_(True)]
        bias = torch.zeros(21504, dtype=torch.bfloat16, device=device)
        with Count() as count:
            out = rotate_output(tl.layer, y, bias, blocks)
        forward = count.n
        with Count() as count:
            out.backward(torch.ones_like(out))
        if device == "meta":  # an accelerator's pieces: 2²⁴ elements, 780 rows → 6 pieces, one product each per pass
            assert forward == count.n == -(-4096 // (bypass._ACCELERATOR_PIECE_ELEMENTS // 21504)) == 6
        else:  # 2¹⁸ elements are 12 rows of 21504: pieces of the 32-row minimum
            assert forward == count.n == 4096 // bypass._MIN_PIECE_ROWS == 128
        if device == "cpu":  # identity blocks: the output and ∂y are the input and the gradient, bit for bit
            assert torch.equal(out, y) and torch.equal(y.grad, torch.ones_like(y))
