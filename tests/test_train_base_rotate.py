"""oft_core.train._base_rotate_output: a trained 16-bit Linear's base product and output rotation as one Function
(`_BaseRotateHalf`), the bias folded into the GEMM as M⁻¹·bias so that no pass over the output subtracts D·bias.

Pinned: the output is M·(W x) + bias to 16-bit rounding and no less precise than the two-Function path it replaces
(`frozen_base` then `rotate_output`), against fp64, for one split and FLUX's fused splits (qkv: 3, linear1: 4), with
and without a bias, a bias much larger than W x, bf16 / fp16 / fp32 weights under bf16 autocast, the weight kept or
made again; the gradients for the input and every rotation block are those of the plain expression (fp64 autograd);
identity blocks give the base layer's output and input gradient bit for bit; only ŷ and the blocks are kept for
backward (plus the weight where the old path's Linear kept it); the work runs in `bypass._piece_rows`' row pieces
with no read of a value back to the host; the trainer routes 16-bit Cayley Linears here and Cayley–Neumann ones
(whose blocks are not orthogonal: M⁻¹ ≠ Mᵀ) the old way; a short bf16 training run follows the old path to bf16
rounding.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from test_train_keep_input import cast_weight_fn, net_problem
from test_train_rotate_output import ProductCount, kept_storages
from torch import nn

import oft_core.bypass as bypass
import oft_core.train as train
from oft_core.train import (
    OFTTrainer,
    _base_rotate_output,
    checkpoint_blocks,
    frozen_base,
    gradient_checkpointing,
    rotate_output,
    run_training,
    select_targets,
)

# (path, in, out): FLUX's fused q|k|v (3 splits), linear1 (q|k|v|mlp: 4 splits) and a plain layer
LAYERS = {"plain": ("layer", 12, 48), "qkv": ("double_blocks.0.img_attn.qkv", 12, 3 * 32),
          "linear1": ("single_blocks.0.linear1", 12, 3 * 32 + 64)}


def case(kind: str, bias: bool, dtype: torch.dtype, seed: int = 0, bias_scale: float = 1.0, tokens: int = 37):
    """(module in `dtype`, trainer with random Cayley rotations, input) for one FLUX-like layer."""
    path, fin, fout = LAYERS[kind]
    g = torch.Generator().manual_seed(seed)
    m = nn.Linear(fin, fout, bias=bias)
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
        if bias:
            m.bias.copy_(torch.randn(fout, generator=g) * bias_scale)
    m = m.to(dtype).requires_grad_(False)
    splits = {path: (32, 32, 32, 64)} if kind == "linear1" else None  # as FLUX's 3072 × 3 + 12288, scaled down
    t = OFTTrainer([(path, m)], num_blocks=4, alpha=0, splits=splits)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(2, tokens, fin, generator=g)
    return m, t, x


def run(fn, m, t, x, x_dtype, *, autocast=False, weight_fn=train._default_weight_fn, keep_weight=False):
    """(out, ∂x, [∂B per split]) of one forward + backward of `fn` ("new": _base_rotate_output, "old": frozen_base
    then rotate_output) on detached leaf copies of the trainer's blocks."""
    tl = t.layers[0]
    blocks = [b.detach().clone().requires_grad_(True) for b in t.blocks(tl)]
    xx = x.detach().to(x_dtype).requires_grad_(True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        if fn == "new":
            out = _base_rotate_output(tl.layer, m, xx, weight_fn, blocks, keep_weight=keep_weight)
        else:
            out = rotate_output(tl.layer, *frozen_base(m, xx, weight_fn), blocks)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
    out.backward(g)
    return out.detach(), xx.grad, [b.grad for b in blocks]


def exact(m, t, x, x_dtype, g_dtype=torch.bfloat16):
    """(out, ∂x, [∂B per split]) of M·(W x) + bias in fp64 by autograd, from the inputs as the layer sees them and
    `run`'s output gradient rounded as it rounds it (to the output's dtype)."""
    tl = t.layers[0]
    blocks = [b.detach().double().requires_grad_(True) for b in t.blocks(tl)]
    x64 = x.detach().to(x_dtype).double().requires_grad_(True)
    z = x64 @ m.weight.double().t()
    parts, start = [], 0
    for r, n, b in zip(blocks, tl.layer.num_blocks, tl.layer.block_sizes):
        parts.append(torch.einsum("...nc,nbc->...nb", z[..., start:start + n * b].unflatten(-1, (n, b)), r).flatten(-2))
        start += n * b
    out = torch.cat(parts, -1) + (0 if m.bias is None else m.bias.double())
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(g_dtype).double()
    out.backward(g)
    return out.detach(), x64.grad, [b.grad for b in blocks]


def rel(a, ref):
    """The error of `a` against `ref`, relative to `ref`'s largest value (max and rms)."""
    d = a.double() - ref
    scale = float(ref.abs().max())
    return float(d.abs().max()) / scale, float(d.square().mean().sqrt()) / scale


SETUPS = [  # (weight dtype, input dtype, autocast, weight_fn, keep_weight)
    ("bf16", torch.bfloat16, torch.bfloat16, False, train._default_weight_fn, False),
    ("bf16 kept weight", torch.bfloat16, torch.bfloat16, False, train._default_weight_fn, True),
    ("fp16", torch.float16, torch.float16, False, train._default_weight_fn, False),
    ("fp32 weight, bf16 autocast", torch.float32, torch.float32, True, train._default_weight_fn, False),
    ("bf16 weight made per forward", torch.bfloat16, torch.bfloat16, False, cast_weight_fn, False),
]


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("bias,bias_scale", [(True, 1.0), (True, 30.0), (False, 1.0)])
@pytest.mark.parametrize("setup", SETUPS, ids=[s[0] for s in SETUPS])
def test_values_and_gradients_against_fp64(kind, bias, bias_scale, setup):
    _, w_dtype, x_dtype, autocast, weight_fn, keep_weight = setup
    m, t, x = case(kind, bias, w_dtype, bias_scale=bias_scale)
    kw = dict(autocast=autocast, weight_fn=weight_fn)
    new = run("new", m, t, x, x_dtype, keep_weight=keep_weight, **kw)
    old = run("old", m, t, x, x_dtype, **kw)
    half = torch.float16 if w_dtype == torch.float16 else torch.bfloat16
    ref = exact(m, t, x, x_dtype, half)
    assert new[0].dtype == old[0].dtype == half and new[1].dtype == x_dtype
    ulp = 2.0 ** (-10 if half == torch.float16 else -7)  # one ulp of the 16-bit output at 1
    # the output: a few of its own roundings relative to its scale (ŷ, M⁻¹·bias and the sum each round once) ...
    out_max, out_rms = rel(new[0], ref[0])
    assert out_max <= 2 * ulp and out_rms <= ulp / 4
    # ... and no worse than the old path (its y and the bias correction round as often); both err by roundings of
    # comparable size that land differently: within 2× on the worst element, 1.5× in rms
    old_max, old_rms = rel(old[0], ref[0])
    assert out_max <= 2 * old_max and out_rms <= 1.5 * old_rms
    # ∂x: ∂ŷ = Mᵀg made as on the old path (the same kernels): the same values bit for bit
    assert torch.equal(new[1], old[1])
    assert rel(new[1], ref[1])[0] <= 2 * ulp
    # ∂B = Σ g zᵀ with z = ŷ − M⁻¹·bias made as the old z = y − bias (a 16-bit output minus the vector its GEMM
    # added): the same kind of error, ŷ's rounding at the output's scale, which a large bias makes large for both
    # paths (one draw of roundings per case: within 1.5× in rms, 3× on the worst element; averaged over seeds in
    # the next test)
    for a, o, r in zip(new[2], old[2], ref[2]):
        assert a.dtype == torch.float32 and bool(a.abs().sum() > 0)
        b_max, b_rms = rel(a, r)
        o_max, o_rms = rel(o, r)
        assert b_rms <= 1.5 * o_rms and b_max <= 3 * o_max
        if bias_scale == 1.0:
            assert b_max <= 2 * ulp
    if not bias:  # ŷ = W x: the old path's products, bit for bit
        assert torch.equal(new[0], old[0]) and all(torch.equal(a, o) for a, o in zip(new[2], old[2]))


def test_fp64_precision_with_a_large_bias_matches_the_old_path_on_average():
    """With |bias| ≫ |W x| the gradient of the blocks is the sensitive part: Σ g zᵀ from a z that is the small
    difference of two large 16-bit numbers. Averaged over seeds (each case's error is one draw of roundings), the
    new path's error is the old one's: z is made the same way (a 16-bit output minus the vector its GEMM added).
    Measured while choosing it: subtracting (Σ g) ⊗ M⁻¹·bias from Σ g ŷᵀ instead (no z at all) erred 20–40× the old
    path's at |bias| = 10 |z|, since each piece's 16-bit Σ g ŷᵀ rounds at the bias's scale."""
    errs = {"new": 0.0, "old": 0.0}
    for seed in range(12):
        m, t, x = case("qkv", True, torch.bfloat16, seed=seed, bias_scale=30.0, tokens=100)
        ref = exact(m, t, x, torch.bfloat16)
        for fn in errs:
            got = run(fn, m, t, x, torch.bfloat16)
            errs[fn] += sum(rel(a, r)[1] for a, r in zip(got[2], ref[2]))
    assert errs["new"] <= 1.1 * errs["old"]  # measured: 0.98–1.01 on these layers at 37 and 100 tokens


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("autocast", [False, True])
def test_identity_blocks_give_the_base_output_bit_for_bit(kind, autocast):
    """At M = I, M⁻¹·bias is the bias exactly and ŷ + 0·ŷ is ŷ: the base layer's own output and input gradient."""
    m, t, x = case(kind, True, torch.float32 if autocast else torch.bfloat16)
    with torch.no_grad():
        for p in t.parameters():
            p.zero_()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    x = x.to(torch.float32 if autocast else torch.bfloat16)
    results = []
    for fn in ("new", "base"):
        xx = x.clone().requires_grad_(True)
        with ctx:
            if fn == "new":
                out = _base_rotate_output(t.layers[0].layer, m, xx, train._default_weight_fn, t.blocks(t.layers[0]))
            else:
                out = m(xx)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), xx.grad))
    assert torch.equal(results[0][0], results[1][0]) and results[0][0].dtype == torch.bfloat16
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("keep_weight", [False, True])
def test_only_the_output_and_the_blocks_are_kept(kind, bias, keep_weight):
    """ŷ and the blocks (and the weight only where the old path's Linear kept it): never x, never a second
    activation-sized tensor; the old path (frozen_base, then rotate_output) keeps the same."""
    m, t, x = case(kind, bias, torch.bfloat16)
    tl = t.layers[0]
    blocks = [b.detach().clone().requires_grad_(True) for b in t.blocks(tl)]
    xx = x.to(torch.bfloat16).requires_grad_(True)

    ours = kept_storages(lambda: _base_rotate_output(tl.layer, m, xx, train._default_weight_fn, blocks,
                                           keep_weight=keep_weight))
    theirs = kept_storages(lambda: rotate_output(tl.layer, *frozen_base(m, xx, train._default_weight_fn), blocks))
    y_bytes = x.shape[0] * x.shape[1] * m.weight.shape[0] * 2
    expected = {x.untyped_storage().data_ptr() for x in blocks}
    if keep_weight:
        expected.add(m.weight.untyped_storage().data_ptr())
    assert xx.untyped_storage().data_ptr() not in ours
    assert set(ours) - expected and len(set(ours) - expected) == 1  # ŷ
    assert [n for p, n in ours.items() if p not in expected] == [y_bytes]
    assert sum(ours.values()) <= sum(theirs.values()) + (m.weight.untyped_storage().nbytes() if keep_weight else 0)


def test_the_work_runs_in_row_pieces_with_no_host_read():
    """A FLUX.1 linear1 output (21504 features in blocks of 8) runs forward and backward in `bypass._piece_rows`'
    pieces (on a CPU the 32-row minimum), one batched product per piece and pass as `_RotateOutputHalf`, and no aten
    op reads a value back to the host (on a GPU that would wait for the device)."""
    tokens = 320  # more than `bypass._ONE_PIECE_ROWS`
    m = nn.Linear(16, 21504).to(torch.bfloat16).requires_grad_(False)
    t = OFTTrainer([("linear1", m)], block_size=8, alpha=0)
    tl = t.layers[0]
    x = torch.randn(1, tokens, 16, dtype=torch.bfloat16, requires_grad=True)
    with ProductCount() as fwd:
        out = _base_rotate_output(tl.layer, m, x, train._default_weight_fn, t.blocks(tl))
    with ProductCount() as bwd:
        out.backward(torch.ones_like(out))
    assert bypass._piece_rows(out.view(tokens, -1), 32) == bypass._MIN_PIECE_ROWS
    assert fwd.products == bwd.products == tokens // bypass._MIN_PIECE_ROWS == 10
    assert fwd.reads == bwd.reads == 0
    assert torch.equal(out, F.linear(x, m.weight, m.bias))  # identity blocks: the base output


def test_the_trainer_routes_16_bit_cayley_linears_here_and_neumann_ones_the_old_way():
    """M⁻¹·bias = Mᵀ·bias holds for the Cayley blocks (orthogonal to fp32 rounding), not for a truncated
    Cayley–Neumann series: those layers keep the old path (frozen base, then `_RotateOutputHalf`); fp32 outputs and
    convolutions never come here."""
    for terms, dtype, expected in ((0, torch.bfloat16, "_BaseRotateHalfBackward"),
                                   (5, torch.bfloat16, "_RotateOutputHalfBackward"),
                                   (0, torch.float32, "_RotateOutputBackward")):
        m, t, x = case("qkv", True, dtype)
        t = OFTTrainer([("qkv", m)], num_blocks=4, alpha=0, neumann_terms=terms, keep_input=False,
                       splits={"qkv": (32, 32, 32)})
        with torch.no_grad():
            for p in t.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
        xx = x.to(dtype).requires_grad_(True)
        with t.attach():
            out = m(xx)
        assert type(out.grad_fn).__name__ == expected
        # the values are M·(W x) + bias either way
        tl = t.layers[0]
        blocks = [b.detach().double() for b in t.blocks(tl)]
        z = xx.detach().double() @ m.weight.double().t()
        ref = torch.cat([torch.einsum("...nc,nbc->...nb", z[..., i * 32:(i + 1) * 32].unflatten(-1, (4, 8)), r)
                         .flatten(-2) for i, r in enumerate(blocks)], -1) + m.bias.double()
        assert rel(out.detach(), ref)[0] <= (2 ** -6 if dtype == torch.bfloat16 else 1e-5)


def follow(wrap: str, path: str, steps: int = 4):
    """([trained parameters], losses) of `steps` steps on the two-block net in bf16, all its Linears trained;
    `path` "old" sends the 16-bit Linears through frozen_base + rotate_output instead of _base_rotate_output."""
    net, x, context = net_problem()
    net = net.to(torch.bfloat16)
    x, context = x.to(torch.bfloat16), context.to(torch.bfloat16)
    t = OFTTrainer(select_targets(net, "all-linear", "generic"), num_blocks=2, alpha=0)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    ckpt = gradient_checkpointing(checkpoint_blocks(net)) if wrap == "checkpointing" else contextlib.nullcontext()
    calls = []
    real = train._BaseRotateHalf.apply

    def old(layer, module, xx, weight_fn, blocks, *, keep_weight=False):
        return rotate_output(layer, *frozen_base(module, xx, weight_fn), blocks)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train._BaseRotateHalf, "apply", lambda *a: calls.append(1) or real(*a))
        if path == "old":
            mp.setattr(train, "_base_rotate_output", old)
        with t.attach(), ckpt:
            losses = run_training(t.parameters(), lambda s, m: F.mse_loss(net(x, context).float(), target),
                                  steps=steps, lr=1e-2, optimizer="SGD")
    assert bool(calls) == (path == "new")
    return [p.detach().clone() for p in t.parameters()], losses


@pytest.mark.parametrize("wrap", ["none", "checkpointing"])
def test_a_short_bf16_training_follows_the_old_path(wrap):
    new, old = follow(wrap, "new"), follow(wrap, "old")
    assert new[1][-1] < new[1][0]
    # the losses to bf16 rounding of the outputs (2⁻⁸ relative), the trained generators to bf16 rounding of their
    # gradients (SGD: the parameters are sums of lr × gradient)
    torch.testing.assert_close(torch.tensor(new[1]), torch.tensor(old[1]), rtol=2 ** -8, atol=0)
    for a, b in zip(new[0], old[0]):
        assert float((a - b).abs().max()) <= 2 ** -6 * float(b.abs().max())


def per_block_backward(y2, g2, sizes, blocks, shift):
    """The 16-bit rotation's backward in its per-block form (the form before the grouped one): ∂y by the bypass
    hook's strided product per piece, ∂B per piece from (n, rows, b) copies of g and z = y − shift, one b × b
    product per block, the pieces' 16-bit sums added in fp32."""
    grad_y, grads, start = torch.empty_like(g2), [], 0
    for r, (n, bs) in zip(blocks, sizes):
        cols = slice(start, start + n * bs)
        start += n * bs
        d = train._product_deltas(r, False, y2.dtype)
        step = bypass._piece_rows(y2[:, cols], d.shape[-1])
        gr = torch.zeros_like(r)
        for i in range(0, y2.shape[0], step):
            gc = g2[i:i + step, cols]
            rows = gc.shape[0]
            bypass._add_block_product(gc, d, None, grad_y[i:i + step, cols])
            gt = gc.reshape(rows, n, bs).transpose(0, 1).contiguous()
            zt = y2[i:i + step, cols].reshape(rows, n, bs).transpose(0, 1).contiguous()
            if shift is not None:
                zt = zt - shift[cols].view(n, 1, bs)
            gr += torch.bmm(gt.transpose(1, 2), zt)
        grads.append(gr)
    return grad_y, grads


SPLITS = [((4, 8), (4, 8), (8, 8)), ((6, 8),), ((3, 16),), ((2, 48),), ((4, 8), (2, 16)), ((4, 8), (6, 8))]
SPLIT_IDS = ["linear1-like", "groups of 3", "groups of 2", "wide blocks", "block sizes differ", "groups differ"]


@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("sizes", SPLITS, ids=SPLIT_IDS)
def test_the_rotation_of_merged_splits_gives_the_per_split_values_bit_for_bit(rows, sizes, monkeypatch):
    """`_half_rotated` runs a fused layer's splits as one when their blocks and groups agree (`_merged_splits`: one
    product per piece over the whole width): the values of one product per split bit for bit, and the splits that
    cannot merge (other block sizes, other groups) stay apart."""
    monkeypatch.setattr(bypass, "_PIECE_ELEMENTS", 1)
    gen = torch.Generator().manual_seed(rows)
    width = sum(n * b for n, b in sizes)
    y2 = (torch.randn(rows, width, generator=gen) * 3).to(torch.bfloat16)
    blocks = [torch.linalg.matrix_exp(0.2 * (a - a.mT)) for a in (torch.randn(n, b, b, generator=gen)
                                                                   for n, b in sizes)]
    minus = (torch.randn(width, generator=gen) * 3).to(torch.bfloat16)
    ref, start = torch.empty_like(y2), 0
    for r, (n, b) in zip(blocks, sizes):
        cols = slice(start, start + n * b)
        start += n * b
        dt = train._product_deltas(r, True, y2.dtype)
        step = bypass._piece_rows(y2, dt.shape[-1])
        for i in range(0, rows, step):
            bypass._add_block_product(y2[i:i + step, cols], dt, None, ref[i:i + step, cols])
            ref[i:i + step, cols].sub_(minus[cols])
    assert torch.equal(train._half_rotated(y2, sizes, blocks, minus), ref)
    merged = train._merged_splits(sizes, blocks)
    assert len(merged[0]) == (1 if len(sizes) == 1 or sizes[0] == sizes[1] else len(sizes))


@pytest.mark.parametrize("rows", [1, 16, 37, 300])
@pytest.mark.parametrize("sizes", SPLITS, ids=SPLIT_IDS)
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_grouped_backward_gives_the_per_block_values_bit_for_bit(rows, sizes, shift, dtype, monkeypatch):
    """`_half_rotated_backward` copies each piece of g once to the grouped layout and reads it for ∂y and ∂B (the
    diagonal blocks of one grouped product per piece): the values of the per-block form bit for bit, for one row
    (a modulation vector: views, no copies), one piece, several pieces with a short last one, blocks grouped 4, 3
    or 2 at a time and blocks wider than a group; `want_y` / `want_r` off leave the other result as it is."""
    gen = torch.Generator().manual_seed(rows)
    width = sum(n * b for n, b in sizes)
    y2 = (torch.randn(rows, width, generator=gen) * 3).to(dtype)
    g2 = torch.randn(rows, width, generator=gen).to(dtype)
    blocks = [torch.linalg.matrix_exp(0.2 * (a - a.mT)) for a in (torch.randn(n, b, b, generator=gen)
                                                                   for n, b in sizes)]
    s = (torch.randn(width, generator=gen) * 3).to(dtype) if shift else None
    monkeypatch.setattr(bypass, "_PIECE_ELEMENTS", 1)  # pieces of the 32-row minimum past `_ONE_PIECE_ROWS`
    if rows == 300:
        assert bypass._piece_rows(y2, 32) == 32
    got = train._half_rotated_backward(y2, g2, sizes, blocks, True, [True] * len(sizes), s)
    ref = per_block_backward(y2, g2, sizes, blocks, s)
    assert torch.equal(got[0], ref[0])
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(got[1], ref[1]))
    only_y = train._half_rotated_backward(y2, g2, sizes, blocks, True, [False] * len(sizes), s)
    only_r = train._half_rotated_backward(y2, g2, sizes, blocks, False, [True, False, True][:len(sizes)], s)
    assert torch.equal(only_y[0], ref[0]) and only_y[1] == [None] * len(sizes)
    assert only_r[0] is None and torch.equal(only_r[1][0], ref[1][0])
    assert [a is None for a in only_r[1]] == [False, True, False][:len(sizes)]
    assert [a.shape for a in got[1]] == [r.shape for r in blocks]


def test_the_backward_of_splits_that_cannot_merge_runs_pieces_sized_on_each_split():
    """A fused output whose splits cannot merge (blocks of 8 and 32: kohya's linear1 keeps one block count for
    splits of 3072 and 12288 features) runs each split's backward in `bypass._piece_rows` of that split's width:
    320 rows, 3072 features in pieces of 85 rows (4 products), 12288 in pieces of 32 (10), not 10 + 10."""
    sizes = ((384, 8), (384, 32))
    gen = torch.Generator().manual_seed(3)
    y2 = torch.randn(320, 3072 + 12288, generator=gen).to(torch.bfloat16)
    g2 = torch.randn(y2.shape, generator=gen).to(torch.bfloat16)
    blocks = [torch.linalg.matrix_exp(0.1 * (a - a.mT)) for a in (torch.randn(n, b, b, generator=gen)
                                                                   for n, b in sizes)]
    assert len(train._merged_splits(sizes, blocks)[0]) == 2
    with ProductCount() as count:
        got = train._half_rotated_backward(y2, g2, sizes, blocks, True, [True, True], None)
    assert count.products == 4 + 10
    ref = per_block_backward(y2, g2, sizes, blocks, None)
    assert torch.equal(got[0], ref[0]) and all(torch.equal(a, b) for a, b in zip(got[1], ref[1]))
