"""oft_core.train: the rotation blocks of all the trained layers of a checkpointed block made at its start as one
autograd node (`_unit_blocks`, `_TrainedBlocks`, `rotation._trained_blocks`).

Pinned: `_trained_blocks` gives every layer's `rotation_blocks(…, sync_free=True)` bit for bit, whatever mix of
block sizes, Cayley methods, constraints and splits it batches; the node's gradients are those of one node per
layer bit for bit; under `gradient_checkpointing` each checkpointed block makes one node (in forward and again in its
recomputation) that its layers take their blocks from, and a training run gives the same adapter bit for bit as
without checkpointing (where every layer makes its own).
"""

from __future__ import annotations

import pytest
import torch
from test_train_keep_input import net_problem, randomize, train_net
from torch import nn

import oft_core.train as train
from oft_core.rotation import _trained_blocks, rotation_blocks
from oft_core.train import OFTTrainer, checkpoint_blocks, gradient_checkpointing, select_targets


def mixed_trainer():
    """Layers of blocks 8 (solve), 24 (series or solve by the bound), 100 (elimination), a fused 3-split layer and
    an unconstrained one, with non-trivial generators."""
    layers = [("a", nn.Linear(4, 64)), ("b", nn.Linear(4, 96)), ("c", nn.Linear(4, 960)),
              ("double_blocks.0.img_attn.qkv", nn.Linear(4, 3 * 48)), ("e", nn.Linear(4, 200))]
    sizes = {"a": 8, "b": 24, "c": 24, "double_blocks.0.img_attn.qkv": 8, "e": 100}
    trainers = [OFTTrainer([(n, m)], block_size=sizes[n], alpha=0.0 if n == "c" else 1e-3, root=nn.Module())
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
