"""oft_core.train: the rotation blocks of all the trained layers of a checkpointed block made at its start as one
autograd node (`_unit_blocks`, `_TrainedBlocks`, `rotation._split_batches`).

Pinned: the block node gives every layer's `rotation_blocks(…, sync_free=True)` bit for bit, whatever mix of
block sizes, Cayley methods, constraints and splits it batches; the node's gradients are those of one node per
layer bit for bit; under `gradient_checkpointing` each checkpointed block makes one node (in forward and again in its
recomputation) that its layers take their blocks from, and a training run gives the same adapter bit for bit as
without checkpointing (where every layer makes its own).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_train_keep_input import net_problem, randomize, train_net
from torch import nn

import oft_core.train as train
from oft_core.formats._triangle import skew_from_upper, upper_grad
from oft_core.rotation import rotation_blocks
from oft_core.spec import Constraint
from oft_core.train import OFTTrainer, checkpoint_blocks, gradient_checkpointing, select_targets


def mixed_trainer(alpha: float | None = None):
    """Layers of blocks 8 (solve), 24 (series or solve by the bound), 100 (elimination), a fused 3-split layer and
    an unconstrained one, with non-trivial generators; `alpha` given: every layer constrained by it (0: none)."""
    layers = [("a", nn.Linear(4, 64)), ("b", nn.Linear(4, 96)), ("c", nn.Linear(4, 960)),
              ("double_blocks.0.img_attn.qkv", nn.Linear(4, 3 * 48)), ("e", nn.Linear(4, 200))]
    sizes = {"a": 8, "b": 24, "c": 24, "double_blocks.0.img_attn.qkv": 8, "e": 100}
    alphas = {n: (0.0 if n == "c" else 1e-3) if alpha is None else alpha for n, _ in layers}
    trainers = [OFTTrainer([(n, m)], block_size=sizes[n], alpha=alphas[n], root=nn.Module())
                for n, m in layers]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in trainers:
            for p in t.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return [t.layers[0] for t in trainers]


def test_the_block_node_gives_each_layers_rotation_blocks_bit_for_bit():
    tls = mixed_trainer()
    with torch.no_grad():
        flat = train._TrainedBlocks.apply(tuple(tl.layer for tl in tls), *[p for tl in tls for p in tl.params])
        together, k = [], 0
        for tl in tls:
            together.append(flat[k:k + len(tl.params)])
            k += len(tl.params)
        for tl, got in zip(tls, together):
            alone = rotation_blocks(tl.layer, blocks=tl.generators(), sync_free=True)
            assert len(got) == len(alone) == len(tl.params)
            assert all(torch.equal(a, b) for a, b in zip(got, alone))


def test_one_node_for_several_layers_gives_the_per_layer_gradients_bit_for_bit():
    tls = mixed_trainer()
    g = torch.Generator().manual_seed(1)
    upstream = [[torch.randn(p.shape[0], b, b, generator=g) for p, b in zip(tl.params, tl.layer.block_sizes)]
                for tl in tls]
    flat = train._TrainedBlocks.apply(tuple(tl.layer for tl in tls), *[p for tl in tls for p in tl.params])
    torch.autograd.backward(flat, [u for us in upstream for u in us])
    together = [[p.grad.clone() for p in tl.params] for tl in tls]
    for tl in tls:
        for p in tl.params:
            p.grad = None
    for tl, us in zip(tls, upstream):
        torch.autograd.backward(train._TrainedBlocks.apply((tl.layer,), *tl.params), us)
    for tl, grads in zip(tls, together):
        assert all(bool(a.abs().sum() > 0) and torch.equal(a, p.grad) for a, p in zip(grads, tl.params))


def test_outputs_of_the_node_that_get_no_gradient_count_as_zero():
    # a checkpointed block whose forward leaves a trained layer unused: autograd hands the node zeros for that
    # layer's blocks (materialised gradients), so it gets a zero gradient and the others their own, bit for bit
    tls = mixed_trainer()
    g = torch.Generator().manual_seed(2)
    first = tls[0]
    upstream = [torch.randn(p.shape[0], b, b, generator=g) for p, b in zip(first.params, first.layer.block_sizes)]
    flat = train._TrainedBlocks.apply(tuple(tl.layer for tl in tls), *[p for tl in tls for p in tl.params])
    torch.autograd.backward(flat[:len(first.params)], upstream)
    together = [[p.grad.clone() for p in tl.params] for tl in tls]
    for tl in tls:
        for p in tl.params:
            p.grad = None
    torch.autograd.backward(train._TrainedBlocks.apply((first.layer,), *first.params), upstream)
    assert all(bool(a.abs().sum() > 0) and torch.equal(a, p.grad) for a, p in zip(together[0], first.params))
    assert all(not bool(a.any()) for grads in together[1:] for a in grads)


def test_a_checkpointed_block_makes_one_node_for_its_layers_in_forward_and_recomputation():
    net, x, context = net_problem()
    targets = select_targets(net, "all-linear", "generic")
    t = OFTTrainer(targets, num_blocks=2, alpha=1e-3)
    randomize(t, scale=0.02)
    nodes = []
    real = train._TrainedBlocks.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train._TrainedBlocks, "apply", lambda layers, *p: nodes.append(len(layers)) or real(layers, *p))
        with t.attach(), gradient_checkpointing(checkpoint_blocks(net)):
            net(x, context).square().sum().backward()
    per_block = sum(1 for n, _ in targets if n.startswith("blocks.0."))
    # two checkpointed blocks, each: one node in forward, one in its recomputation, for all its layers
    assert nodes == [per_block] * 4 and per_block == 10
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in t.parameters())
    assert train._UNIT == [] and train._ATTACHED == []


@pytest.mark.parametrize("keep_input", [None, False])
def test_training_with_block_nodes_gives_the_adapter_of_per_layer_nodes_bit_for_bit(keep_input):
    trained = {wrap: train_net(wrap, alpha=1e-3, keep_input=keep_input) for wrap in ("none", "checkpointing")}
    assert trained["none"][1] == trained["checkpointing"][1] and trained["none"][1][-1] < trained["none"][1][0]
    assert all(torch.equal(a, b) for a, b in zip(trained["none"][0], trained["checkpointing"][0]))


def test_without_gradients_no_block_node_is_made():
    net, x, context = net_problem()
    t = OFTTrainer(select_targets(net, "all-linear", "generic"), num_blocks=2, alpha=1e-3)
    randomize(t, scale=0.02)
    with t.attach(), gradient_checkpointing(checkpoint_blocks(net)):
        with torch.no_grad():
            a = net(x, context)
        b = net(x, context)
    assert torch.equal(a, b.detach())


# ---------------------------------------------------------------------------------------------------- closed forms
def _described(kind: str, value: float, split_size: int):
    """The two fields `_constrain` / `_constrain_grad` read of a layer."""
    return SimpleNamespace(constraint=Constraint(kind, value), split_sizes=(split_size,))


@pytest.mark.parametrize("kind, value, outside", [
    ("none", 0.0, None),
    ("norm_clamp", 1.0, False),  # ‖q‖ under the bound: the clamp passes q through
    ("norm_clamp", 1e-3, True),  # over it: q scaled down, the radial term
    ("block_projection", 0.3, "some"),  # some blocks inside the ball, some projected
    ("block_projection", 1e-3, "all"),
])
def test_the_constraint_gradient_is_autograds_in_fp64(kind, value, outside):
    from oft_core.rotation import _constrain, _constrain_grad
    n, b = 6, 5
    layer = _described(kind, value, n * b)
    gen = torch.Generator().manual_seed(7)
    spread = torch.linspace(0.01, 1, n, dtype=torch.float64).view(n, 1, 1)  # block norms from small to large
    u = torch.randn(n, b, b, generator=gen, dtype=torch.float64) * spread
    q = (u - u.mT).requires_grad_(True)
    g = torch.randn(n, b, b, generator=gen, dtype=torch.float64)
    out = _constrain(layer, q, 0)
    if kind == "norm_clamp":
        assert bool(q.detach().norm() > value * n * b) is outside
    if kind == "block_projection":
        moved = (out.detach() != q.detach()).flatten(1).any(1)
        assert bool(moved.all()) if outside == "all" else (bool(moved.any()) and not bool(moved.all()))
    expected, = torch.autograd.grad(out, q, g)
    got = _constrain_grad(layer, q.detach(), g, 0)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14 * float(expected.abs().max()))


def test_the_constraint_gradient_at_zero_generators_is_the_upstream_gradient():
    """Step 0 of every training starts at Q = 0: no 0/0 in the radial terms."""
    from oft_core.rotation import _constrain_grad
    g = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(8))
    for kind, value in (("norm_clamp", 1e-3), ("block_projection", 1e-3), ("norm_clamp", 0.0)):
        assert torch.equal(_constrain_grad(_described(kind, value, 12), torch.zeros(4, 3, 3), g, 0), g)


@pytest.mark.parametrize("b", [2, 8, 12, 13, 24])  # the matmul way up to 12, the gather way above
def test_the_packing_gradient_is_autograds_bit_for_bit(b):
    from oft_core.formats._triangle import skew_from_upper, upper_grad
    gen = torch.Generator().manual_seed(b)
    vec = torch.randn(5, b * (b - 1) // 2, generator=gen).requires_grad_(True)
    g = torch.randn(5, b, b, generator=gen)
    expected, = torch.autograd.grad(skew_from_upper(vec, b), vec, g)
    assert torch.equal(upper_grad(g, b), expected)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1e-3])  # none; the clamp inactive at these generators; active
def test_the_block_node_gradient_is_autograds_through_the_whole_map(alpha):
    """The node's backward (closed forms through the Cayley map, the constraint and the packing) against autograd
    of the plain expression (generators by `unpack_upper`, `rotation_blocks` with autograd through the solve), for
    every block size / Cayley method / split mix of `mixed_trainer`, at fp32 rounding."""
    from oft_core.formats._triangle import unpack_upper
    tls = mixed_trainer(alpha)
    kinds = {tl.layer.constraint.kind for tl in tls}
    assert kinds == ({"norm_clamp"} if alpha else {"none"})
    with torch.no_grad():
        clamped = [bool(q.norm() > alpha * s) for tl in tls for q, s in zip(tl.generators(), tl.layer.split_sizes)]
    if alpha:
        assert all(clamped) if alpha == 1e-3 else not any(clamped)
    gen = torch.Generator().manual_seed(2)
    for tl in tls:
        ups = [torch.randn(p.shape[0], b, b, generator=gen) for p, b in zip(tl.params, tl.layer.block_sizes)]
        torch.autograd.backward(train._TrainedBlocks.apply((tl.layer,), *tl.params), ups)
        got = [p.grad.clone() for p in tl.params]
        for p in tl.params:
            p.grad = None
        gens = [unpack_upper(p, b) - unpack_upper(p, b).mT for p, b in zip(tl.params, tl.layer.block_sizes)]
        torch.autograd.backward(rotation_blocks(tl.layer, blocks=gens, sync_free=True), ups)
        for a, p in zip(got, tl.params):
            scale = float(p.grad.abs().max())
            assert scale > 0 and float((a - p.grad).abs().max()) <= 2e-6 * scale
            p.grad = None


# ------------------------------------------------------------------------------------ the node batched over splits
def _described_layer(name: str, counts, b: int, constraint: Constraint, transpose: bool):
    """A Cayley layer of `len(counts)` splits of `counts[i]` blocks of b (zero generators: the live ones are the
    packed parameters passed to the node)."""
    from oft_core.spec import make_layer
    return make_layer(path="", name=name, side="out", blocks=[torch.zeros(n, b, b) for n in counts],
                      transpose=transpose, constraint=constraint, source="peft" if not transpose else "kohya",
                      key=name)


def batched_mix():
    """(layers, params) of one node that takes every branch of the batches (`rotation._split_batches`): block sizes
    5, 8, 24, 100; at 8 a kohya clamp (clamped), a fused 3-split layer, PEFT COFT (some blocks projected, not
    transposed) in one batch (one method, two kinds), fp64 parameters (a batch of their own); at 24 two clamp widths
    (series / solve: two batches) and an unconstrained split (the solve: a batch of two kinds); a layer whose
    parameters are frozen."""
    clamp = Constraint("norm_clamp", 1e-3)
    spec = [  # name, blocks per split, b, constraint, transpose, dtype, trained
        ("a", (8,), 8, clamp, True, torch.float32, True),
        ("coft", (6,), 8, Constraint("block_projection", 0.5), False, torch.float32, True),
        ("qkv", (6, 6, 6), 8, clamp, True, torch.float32, True),
        ("narrow", (4,), 24, clamp, True, torch.float32, True),  # bound 0.096: the series
        ("wide", (40,), 24, clamp, True, torch.float32, True),  # bound 0.96: the solve
        ("free", (3,), 24, Constraint(), True, torch.float32, True),  # no bound: the solve
        ("frozen", (5,), 8, clamp, True, torch.float32, False),
        ("big", (2,), 100, clamp, True, torch.float32, True),  # bound 0.2: block elimination
        ("small", (7,), 5, Constraint(), False, torch.float32, True),
        ("double", (3,), 8, clamp, True, torch.float64, True),
    ]
    g = torch.Generator().manual_seed(3)
    layers, params = [], []
    for name, counts, b, constraint, transpose, dtype, trained in spec:
        layers.append(_described_layer(name, counts, b, constraint, transpose))
        for n in counts:
            scale = torch.linspace(0.005, 0.3, n).view(n, 1) if constraint.kind == "block_projection" else 0.02
            p = (torch.randn(n, b * (b - 1) // 2, generator=g) * scale).to(dtype)
            params.append(p.requires_grad_(trained))
    return tuple(layers), params


def test_the_mix_takes_every_branch_of_the_batches():
    from oft_core.rotation import _cayley_method, _split_batches, _split_key
    layers, params = batched_mix()
    splits = [(layer, i) for layer in layers for i in range(len(layer.block_sizes))]
    batches = _split_batches(tuple(_split_key(layer, i, p.shape[0], p.dtype, p.device)
                                   for (layer, i), p in zip(splits, params)))
    shapes = sorted((bt.b, bt.counts, tuple(kind for kind, *_ in bt.kinds)) for bt in batches)
    assert shapes == [(5, (7,), ("none",)), (8, (3,), ("norm_clamp",)),
                      (8, (8, 6, 6, 6, 5, 6), ("norm_clamp", "block_projection")),
                      (24, (4,), ("norm_clamp",)), (24, (40, 3), ("norm_clamp", "none")),
                      (100, (2,), ("norm_clamp",))]
    methods = {(bt.b, bt.counts): _cayley_method(bt.b, bt.bound) for bt in batches}
    assert methods[(24, (4,))][0] == "series" and methods[(24, (40, 3))] == "solve"
    assert methods[(8, (8, 6, 6, 6, 5, 6))] == methods[(8, (3,))] == "eliminate"
    assert methods[(100, (2,))] == "blocks" and methods[(5, (7,))] == "solve"
    with torch.no_grad():  # the clamp bites at 8 and the COFT projection moves some blocks, not all
        q = skew_from_upper(params[0], 8)
        assert bool(q.norm() > 1e-3 * 64)
        coft = skew_from_upper(params[1], 8)
        moved = torch.linalg.matrix_norm(coft) > 0.5 / 6**0.5
        assert bool(moved.any()) and not bool(moved.all())


def test_the_batched_node_gives_every_layers_rotation_blocks_bit_for_bit():
    layers, params = batched_mix()
    with torch.no_grad():
        flat = train._TrainedBlocks.apply(layers, *params)
    k = 0
    for layer in layers:
        ps = params[k:k + len(layer.block_sizes)]
        alone = rotation_blocks(layer, blocks=[skew_from_upper(p, b) for p, b in zip(ps, layer.block_sizes)],
                                sync_free=True)
        for got, want in zip(flat[k:k + len(ps)], alone):
            assert got.shape == want.shape and got.dtype == torch.float32 and torch.equal(got, want), layer.name
        k += len(ps)
    assert k == len(flat) == len(params)


def _per_split_grads(layers, params, upstream):
    """The node's backward as it was before the batches, split by split: ∂L/∂p = upper_grad(_constrain_grad(q,
    _cayley_grad(R, G))) with q made again from p, R the split's blocks as `rotation_blocks` makes them (untransposed),
    G the upstream gradient (transposed for a transposed layer); None for frozen parameters."""
    from oft_core.rotation import _cayley_grad, _constrain_grad
    out, k = [], 0
    for layer in layers:
        ps = params[k:k + len(layer.block_sizes)]
        with torch.no_grad():
            blocks = rotation_blocks(layer, blocks=[skew_from_upper(p, b) for p, b in zip(ps, layer.block_sizes)],
                                     sync_free=True)
        for i, (p, blk, g) in enumerate(zip(ps, blocks, upstream[k:k + len(ps)])):
            if not p.requires_grad:
                out.append(None)
                continue
            b = layer.block_sizes[i]
            r, g = (blk.mT, g.mT) if layer.transpose else (blk, g)
            q = skew_from_upper(p.detach(), b).to(torch.float32)
            out.append(upper_grad(_constrain_grad(layer, q, _cayley_grad(r, g), i), b).to(p.dtype))
        k += len(ps)
    return out


def test_the_batched_node_gives_the_per_split_gradients_bit_for_bit():
    layers, params = batched_mix()
    gen = torch.Generator().manual_seed(4)
    upstream = [torch.randn(p.shape[0], b, b, generator=gen) for layer, p in
                zip([la for la in layers for _ in la.block_sizes], params)
                for b in [int(round((1 + (1 + 8 * p.shape[1]) ** 0.5) / 2))]]
    torch.autograd.backward(train._TrainedBlocks.apply(layers, *params), upstream)
    want = _per_split_grads(layers, params, upstream)
    for p, w in zip(params, want):
        if w is None:
            assert p.grad is None
            continue
        assert p.grad.dtype == p.dtype and bool(p.grad.abs().sum() > 0) and torch.equal(p.grad, w)


def test_the_batched_node_gradient_is_autograds_through_the_whole_map():
    """The mix's gradients against autograd of the plain expression in fp64 (generators by `unpack_upper`, the
    constraint by `_constrain`, R by LAPACK's solve (I − Q)⁻¹(I + Q)): COFT, non-transposed and frozen layers
    included; fp32 rounding of the node (the tolerance of `test_the_block_node_gradient_is_autograds_through_the_
    whole_map`)."""
    from oft_core.formats._triangle import unpack_upper
    from oft_core.rotation import _constrain
    layers, params = batched_mix()
    gen = torch.Generator().manual_seed(5)
    ups = []
    for layer in layers:
        for n, b in zip(layer.num_blocks, layer.block_sizes):
            ups.append(torch.randn(n, b, b, generator=gen))
    torch.autograd.backward(train._TrainedBlocks.apply(layers, *params), ups)
    got = [None if p.grad is None else p.grad.clone() for p in params]
    wide = [p.detach().double().requires_grad_(p.requires_grad) for p in params]
    k, outs, grads = 0, [], []
    for layer in layers:
        ps = wide[k:k + len(layer.block_sizes)]
        for i, (p, b) in enumerate(zip(ps, layer.block_sizes)):
            if p.requires_grad:
                q = _constrain(layer, unpack_upper(p, b) - unpack_upper(p, b).mT, i)
                eye = torch.eye(b, dtype=q.dtype).expand_as(q)
                r = torch.linalg.solve(eye - q, eye + q)
                outs.append(r.mT if layer.transpose else r)
                grads.append(ups[k + i].double())
        k += len(ps)
    torch.autograd.backward(outs, grads)
    for a, p in zip(got, wide):
        if a is None:
            assert not p.requires_grad
            continue
        scale = float(p.grad.abs().max())
        assert scale > 0 and float((a.double() - p.grad).abs().max()) <= 2e-6 * scale


def test_the_batched_node_reads_nothing_from_the_device():
    from test_sync_free import count_reads
    layers, params = batched_mix()
    with count_reads() as reads:
        flat = train._TrainedBlocks.apply(layers, *params)
        torch.autograd.backward(flat, [torch.ones_like(x) for x in flat])
    assert sum(reads.values()) == 0, dict(reads)
    with count_reads() as reads:  # the counter sees reads (the count above is not vacuous)
        float(flat[0].detach().sum())
    assert sum(reads.values()) == 1
