"""oft_core.train: the rotation blocks of all the trained layers of a checkpointed block made at its start as one
autograd node (`_unit_blocks`, `_TrainedBlocks`, `rotation._trained_blocks`).

Pinned: `_trained_blocks` gives every layer's `rotation_blocks(…, sync_free=True)` bit for bit, whatever mix of
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
from oft_core.rotation import _trained_blocks, rotation_blocks
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


def test_trained_blocks_are_each_layers_rotation_blocks_bit_for_bit():
    tls = mixed_trainer()
    with torch.no_grad():
        together = _trained_blocks([(tl.layer, tl.generators()) for tl in tls])
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
