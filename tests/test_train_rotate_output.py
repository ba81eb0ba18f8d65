"""oft_core.train.rotate_output: the trained layer's rotated output as one autograd Function (memory of a step).

Pinned: the forward gives the values of the plain autograd expression it replaces (bit for bit in one piece),
`y + (rotate_features(z) − z)` with z = y − bias (`rotate_features(y)` without a bias), for Linear and Conv2d
outputs, one split and FLUX-style fused splits, fp32 and bf16 (plain and under autocast), in one piece and cut into
many; its gradients (for the activation and for every rotation block) match autograd on that expression; larger
fp32 Linear outputs (the delta form y + D·(y − bias) in the bypass hook's product, `train._rotated_rows`) and their
gradients are held to fp64 at fp32 rounding bounds derived from the block size and row count, with the same bits in
one piece and in many, the base output and gradient bit for bit at identity blocks, and a short training run
following the rows path to fp32 rounding; and it keeps for backward only the layer's output y and the blocks —
never an extra activation-sized copy.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import oft_core.bypass as bypass
import oft_core.train as train
from oft_core.rotation import rotate_features
from oft_core.train import OFTTrainer, rotate_output

U = 2.0 ** -24  # fp32 unit roundoff


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


def many_pieces(monkeypatch, chunk: int) -> None:
    """Cut the rotation into many row pieces: `_rotated`'s own (`_CHUNK_ELEMENTS`) and the bypass hook's
    (`bypass._piece_rows`, which the fp32 Linear path and `_RotateOutputHalf` use): pieces of a few rows, some fewer
    than a grouped block is wide (the product's other branch)."""
    monkeypatch.setattr(train, "_CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(bypass, "_ONE_PIECE_ROWS", 0)
    monkeypatch.setattr(bypass, "_MIN_PIECE_ROWS", 1)
    monkeypatch.setattr(bypass, "_PIECE_ELEMENTS", 5 * chunk)


def exact_rows(layer, y, bias, blocks, g):
    """fp64 autograd of y + (M − I)(y − bias) on the last axis, from the inputs as given (y, bias, the fp32 blocks
    and the output gradient g): (out, ∂y, [∂B per split]), and the fp32 rounding bounds of the delta form, derived
    from the block size k and the rows N (γ_m = m·u up to O(u²), u = 2⁻²⁴):
    out = fl(fl(y − fl(D b)) + fl(D y)) with D = fl(M − I): |err| ≤ (2k + 4)·u·(|y| + |D||y| + |D||b|);
    ∂y = fl(g + fl(Dᵀ g)): |err| ≤ (k + 2)·u·(|g| + |D|ᵀ|g|); ∂B = Σ over N rows of g zᵀ with z = fl(y − b):
    |err| ≤ (N + 2)·u·Σ |g| |z|ᵀ."""
    y64 = y.detach().double().requires_grad_(True)
    b64 = None if bias is None else bias.double()
    m64 = [x.detach().double().requires_grad_(True) for x in blocks]
    z = y64 if b64 is None else y64 - b64
    parts, abs_dy, abs_dg, start = [], [], [], 0
    g64 = g.double()
    for m, n, k in zip(m64, layer.num_blocks, layer.block_sizes):
        v = z[..., start:start + n * k].unflatten(-1, (n, k))
        parts.append(torch.einsum("...nc,nbc->...nb", v, m).flatten(-2))
        d = (m.detach() - torch.eye(k, dtype=torch.float64)).abs()
        ya = y64.detach()[..., start:start + n * k].abs().unflatten(-1, (n, k))
        dy_abs = torch.einsum("...nc,nbc->...nb", ya, d)
        if b64 is not None:
            dy_abs = dy_abs + torch.einsum("nc,nbc->nb", b64[start:start + n * k].abs().view(n, k), d)
        abs_dy.append(dy_abs.flatten(-2))
        ga = g64[..., start:start + n * k].abs().unflatten(-1, (n, k))
        abs_dg.append(torch.einsum("...nb,nbc->...nc", ga, d).flatten(-2))
        start += n * k
    out = y64 + (torch.cat(parts, -1) - z)
    out.backward(g64)
    k = max(layer.block_sizes)
    rows = y.numel() // y.shape[-1]
    out_bound = (2 * k + 4) * U * (y64.detach().abs() + torch.cat(abs_dy, -1))
    gy_bound = (k + 2) * U * (g64.abs() + torch.cat(abs_dg, -1))
    za = z.detach().abs().reshape(rows, -1)
    gb_bounds, start = [], 0
    for n, kk in zip(layer.num_blocks, layer.block_sizes):
        gs = g64.abs().reshape(rows, -1)[:, start:start + n * kk].unflatten(-1, (n, kk))
        zs = za[:, start:start + n * kk].unflatten(-1, (n, kk))
        gb_bounds.append((rows + 2) * U * torch.einsum("rnb,rnc->nbc", gs, zs))
        start += n * kk
    return out.detach(), y64.grad, [m.grad for m in m64], out_bound, gy_bound, gb_bounds


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


class ProductCount(TorchDispatchMode):
    """Counts the batched block products (`baddbmm.out`) and the host reads (`_local_scalar_dense`) of the aten ops
    run inside it (shared with tests/test_train_base_rotate.py)."""

    def __init__(self):
        super().__init__()
        self.products = self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.products += func is torch.ops.aten.baddbmm.out
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def kept_storages(fn) -> dict[int, int]:
    """{storage address: bytes} of every tensor autograd saves while `fn()` runs (then backward of its sum)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return seen


@pytest.mark.parametrize("kind,bias,splits", CASES)
@pytest.mark.parametrize("chunk", [None, 40])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "autocast-bf16"])
def test_rotate_output_is_the_autograd_expression(kind, bias, splits, chunk, dtype, monkeypatch):
    if chunk is not None:  # many pieces (some of one row, some of several), also for conv outputs
        many_pieces(monkeypatch, chunk)
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


@pytest.mark.parametrize("bias,splits", [(True, 1), (False, 1), (True, 3), (False, 3)])
@pytest.mark.parametrize("chunk", [None, 40])
@pytest.mark.parametrize("dtype", ["fp32", "autocast-bf16"])
def test_fp32_rows_in_the_delta_form_are_exact_to_fp32_rounding(bias, splits, chunk, dtype, monkeypatch):
    """fp32 Linear outputs of `train._DELTA_MIN_ELEMENTS` or more (here every size) take the delta form
    y + D·(y − b) in the bypass hook's product (`train._rotated_rows`; also under autocast: the rotation of an fp32
    output stays fp32). It rounds otherwise than (M z − z) + y, so its values and gradients are held to fp64 at the
    fp32 rounding bounds of `exact_rows`, and its output error to the previous form's (measured 0.9–1.7×)."""
    monkeypatch.setattr(train, "_DELTA_MIN_ELEMENTS", 0)
    if chunk is not None:
        many_pieces(monkeypatch, chunk)
    layer, y, b, blocks, dim = case("linear", bias, splits)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "autocast-bf16" else contextlib.nullcontext()
    with ctx:
        o, gy, gb = run_rows(layer, y, b, blocks, g)
    assert o.dtype == gy.dtype == torch.float32
    exact, gy64, gb64, out_bound, gy_bound, gb_bounds = exact_rows(layer, y, b, blocks, g)
    assert bool(((o.double() - exact).abs() <= out_bound).all())
    assert bool(((gy.double() - gy64).abs() <= gy_bound).all())
    for a, r, bound in zip(gb, gb64, gb_bounds):
        assert a.shape == r.shape and bool(a.abs().sum() > 0)
        assert bool(((a.double() - r).abs() <= bound).all())
    with torch.no_grad():  # the previous form, fp32 throughout (no autocast here)
        ref = reference(layer, y, b, blocks, dim)
    err, ref_err = (o.double() - exact).abs().max(), (ref.double() - exact).abs().max()
    assert float(err) <= 4 * float(ref_err)


def test_identity_rotation_gives_the_base_output_bit_for_bit():
    layer, y, b, blocks, dim = case("linear", True)
    eye = [torch.eye(x.shape[-1]).expand_as(x).clone() for x in blocks]
    assert torch.equal(rotate_output(layer, y, b, eye, dim=dim), y)
    layer, y, b, blocks, dim = case("conv", True)
    eye = [torch.eye(x.shape[-1]).expand_as(x).clone() for x in blocks]
    assert torch.equal(rotate_output(layer, y, b, eye, dim=dim), y)


def run_rows(layer, y, b, blocks, g):
    yy = y.detach().clone().requires_grad_(True)
    bl = [x.detach().clone().requires_grad_(True) for x in blocks]
    out = rotate_output(layer, yy, b, bl, dim=-1)
    out.backward(g)
    return out.detach(), yy.grad, [x.grad for x in bl]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
def test_fp32_rows_give_the_same_bits_in_one_piece_and_in_many(bias, splits, monkeypatch):
    """The fp32 Linear path (`train._rotated_rows`): each row's output and ∂y is its own product, so pieces of at
    least a grouped block's width of rows (the CPU's pieces: ≥ `bypass._MIN_PIECE_ROWS` = `_GROUP_WIDTH`) give
    the one-piece bits (with a bias, a last piece narrower than that takes the product's other branch, y − b
    first: a rounding apart, held to fp64 in the test above with pieces of a few rows); ∂B sums the pieces in
    another order (also held to fp64 there)."""
    monkeypatch.setattr(train, "_DELTA_MIN_ELEMENTS", 0)
    layer, y, b, blocks, _ = case("linear", bias, splits)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    one = run_rows(layer, y, b, blocks, g)
    rows = y.shape[0] * y.shape[1]  # 74: two pieces of 37 rows, wider than any grouped block here (≤ 32)
    assert rows == 2 * 37 and 37 > bypass._GROUP_WIDTH
    monkeypatch.setattr(bypass, "_ONE_PIECE_ROWS", 0)
    monkeypatch.setattr(bypass, "_MIN_PIECE_ROWS", 37)
    monkeypatch.setattr(bypass, "_PIECE_ELEMENTS", 1)
    many = run_rows(layer, y, b, blocks, g)
    assert torch.equal(many[0], one[0]) and torch.equal(many[1], one[1])
    for a, r in zip(many[2], one[2]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("chunk", [None, 40])
def test_fp32_rows_at_identity_give_the_base_output_and_gradient_bit_for_bit(bias, splits, chunk, monkeypatch):
    """The delta form at identity blocks: D = M − I = 0 exactly, out = y − 0·b + 0·y = y and ∂y = g + 0 = g, in
    one piece and in many."""
    monkeypatch.setattr(train, "_DELTA_MIN_ELEMENTS", 0)
    if chunk is not None:
        many_pieces(monkeypatch, chunk)
    layer, y, b, blocks, _ = case("linear", bias, splits)
    eye = [torch.eye(x.shape[-1]).expand_as(x).clone() for x in blocks]
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    out, gy, gb = run_rows(layer, y, b, eye, g)
    assert torch.equal(out, y) and torch.equal(gy, g)
    assert all(bool(x.abs().sum() > 0) for x in gb)


@pytest.mark.parametrize("kind,bias,splits", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("delta", [False, True])
def test_only_the_output_and_the_blocks_are_kept_for_backward(kind, bias, splits, dtype, delta, monkeypatch):
    """The layer keeps y (z = y − bias is made again in backward) and the blocks; the plain expression keeps z, an
    activation-sized tensor of its own, and more in bf16 (its fp32 copy). `delta`: fp32 Linear outputs of any size
    in the delta form (`train._rotated_rows`)."""
    if delta:
        monkeypatch.setattr(train, "_DELTA_MIN_ELEMENTS", 0)
    layer, y, b, blocks, dim = case(kind, bias, splits)
    y, b = y.to(dtype).requires_grad_(True), None if b is None else b.to(dtype)

    ours = kept_storages(lambda: rotate_output(layer, y, b, blocks, dim=dim))
    expected = {y.untyped_storage().data_ptr()} | {x.untyped_storage().data_ptr() for x in blocks}
    assert set(ours) == expected
    theirs = kept_storages(lambda: reference(layer, y, b, blocks, dim))
    block_bytes = sum(x.untyped_storage().nbytes() for x in blocks)
    assert sum(ours.values()) - block_bytes <= y.untyped_storage().nbytes()
    if bias:
        assert sum(theirs.values()) - block_bytes >= y.untyped_storage().nbytes()


def test_the_16_bit_rotation_works_in_pieces_sized_for_the_device():
    """On a CPU the rows of a large output are cut into cache-sized pieces (`bypass._piece_rows`: at least
    `_MIN_PIECE_ROWS` rows); on an accelerator into pieces of `_ACCELERATOR_PIECE_ELEMENTS`, so a FLUX.1 linear1
    output at 4096 tokens takes a handful of batched products per pass, not hundreds of kernel launches. Counted on
    the meta device (shapes only, no data)."""
    m = nn.Linear(8, 21504)
    t = OFTTrainer([("linear1", m)], block_size=8, alpha=0)
    tl = t.layers[0]
    for device in ("meta", "cpu"):
        y = torch.zeros(4096, 21504, dtype=torch.bfloat16, device=device, requires_grad=True)
        blocks = [torch.eye(8, device=device).expand(21504 // 8, 8, 8).clone().requires_grad_(True)]
        bias = torch.zeros(21504, dtype=torch.bfloat16, device=device)
        with ProductCount() as count:
            out = rotate_output(tl.layer, y, bias, blocks)
        forward = count.products
        with ProductCount() as count:
            out.backward(torch.ones_like(out))
        if device == "meta":  # an accelerator's pieces: 2²⁴ elements, 780 rows → 6 pieces, one product each per pass
            assert forward == count.products == -(-4096 // (bypass._ACCELERATOR_PIECE_ELEMENTS // 21504)) == 6
        else:  # 2¹⁸ elements are 12 rows of 21504: pieces of the 32-row minimum
            assert forward == count.products == 4096 // bypass._MIN_PIECE_ROWS == 128
        if device == "cpu":  # identity blocks: the output and ∂y are the input and the gradient, bit for bit
            assert torch.equal(out, y) and torch.equal(y.grad, torch.ones_like(y))


@pytest.mark.parametrize("wrap", ["none", "checkpointing"])
@pytest.mark.parametrize("keep_input", [False, None])
def test_whole_training_follows_the_previous_rows_path(wrap, keep_input, monkeypatch):
    """Three steps on the two-block net of tests/test_train_keep_input.py, all its fp32 Linears trained (keeping y,
    or the default policy with y made again), every output in the delta form: the losses and trained parameters
    follow the rows path (z = y − b, M·z through transposed copies, − z, + y; what `_rotated` does below
    `_DELTA_MIN_ELEMENTS`) to fp32 rounding."""
    from test_train_keep_input import train_net

    monkeypatch.setattr(train, "_DELTA_MIN_ELEMENTS", 0)
    new = train_net(wrap, keep_input=keep_input, through_weight=False)
    monkeypatch.setattr(train, "_DELTA_MIN_ELEMENTS", 1 << 62)
    old = train_net(wrap, keep_input=keep_input, through_weight=False)
    assert new[1][-1] < new[1][0]
    torch.testing.assert_close(torch.tensor(new[1]), torch.tensor(old[1]), rtol=1e-5, atol=0)
    for a, b in zip(new[0], old[0]):
        assert bool(a.abs().sum() > 0)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n,bs", [(16, 8), (15, 8), (8, 4), (6, 16), (40, 8)])
def test_block_gradients_in_pairs_are_the_per_block_sums(n, bs):
    """`_add_block_grads` (blocks under 16 wide taken in pairs: one (2·bs)² product per pair, its diagonal blocks
    kept) adds Σ g_k z_kᵀ per block to what is there, on row-strided column slices of wider tensors (a split of a
    fused layer, a row piece), as close to fp64 as the per-block product; odd counts and wide blocks per block."""
    g = torch.Generator().manual_seed(n * bs)
    rows, width = 300, n * bs + 24
    big_g, big_z = torch.randn(rows + 7, width, generator=g), torch.randn(rows + 7, width, generator=g)
    gs, zs = big_g[3:3 + rows, 16:16 + n * bs], big_z[3:3 + rows, 16:16 + n * bs]  # strided views
    start = torch.randn(n, bs, bs, generator=g)
    acc = start.clone()
    train._add_block_grads(acc, gs, zs, n, bs)
    exact = start.double() + torch.einsum("rkb,rkc->kbc", gs.double().view(rows, n, bs), zs.double().view(rows, n, bs))
    per_block = start + torch.bmm(gs.reshape(rows, n, bs).permute(1, 2, 0), zs.reshape(rows, n, bs).transpose(0, 1))
    err, err_per_block = (float((t.double() - exact).abs().max()) for t in (acc, per_block))
    assert err <= max(2 * err_per_block, 1e-5 * float(exact.abs().max()))
    assert bool((acc != start).any())
