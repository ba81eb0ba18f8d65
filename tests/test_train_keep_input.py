"""oft_core.train: trained layers that keep their INPUT for backward and make the base output again there
(`rotate_from_input`, the `keep_input` policy), instead of keeping the base output y (`rotate_output`).

Pinned: the made-again y is the forward's bit for bit, so outputs, input gradients and rotation gradients are
exactly those of the plain path (fp32, CPU), for Linear (with / without bias, fused splits, wide expansions) and
Conv2d (bias, stride, non-zero padding modes), with host weights made per forward (`weight_fn`, QOFT) and with the
rotation cut into many pieces; what is kept for backward is x, not y; the default policy comes from shapes
(`keeps_input`), 16-bit Linear outputs (FLUX, bf16 training) keep y whatever the policy; Linears that read one
input keep it once; under gradient checkpointing the same layers keep x in forward and in the recomputation; a whole
training run (checkpointed or not, a context read in several checkpointed blocks) gives the same adapter bit for bit
whichever policy; the trainer's zero layer descriptions take no memory.
These tests pin the path that makes y again (`through_weight=False`); layers that rotate their weight instead are
pinned in tests/test_train_through_weight.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oft_core.bypass as bypass
import oft_core.train as train
from oft_core.train import (
    OFTTrainer,
    checkpoint_blocks,
    gradient_checkpointing,
    keeps_input,
    run_training,
    select_targets,
)


def randomize(trainer: OFTTrainer, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def cast_weight_fn(module, x):
    """A host that makes the weight per forward (as ComfyUI's cast ops do): a fresh tensor each call."""
    b = None if module.bias is None else module.bias.to(x.dtype) * 1.0
    return module.weight.to(x.dtype) * 1.0, b


def layer_case(kind: str, seed: int = 0):
    """(module, path, input) of one trained layer."""
    g = torch.Generator().manual_seed(seed)
    path = "layer"
    if kind == "linear-expand":  # a GEGLU-like projection: out = 8 × in
        m, x = nn.Linear(8, 64), torch.randn(2, 37, 8, generator=g)
    elif kind == "linear-nobias":
        m, x = nn.Linear(12, 24, bias=False), torch.randn(2, 37, 12, generator=g)
    elif kind == "linear-2d":
        m, x = nn.Linear(12, 24), torch.randn(41, 12, generator=g)
    elif kind == "linear-splits":  # FLUX-style fused q|k|v: three rotations in one layer
        m, x, path = nn.Linear(8, 48), torch.randn(2, 9, 8, generator=g), "qkv"
    elif kind == "conv":
        m, x = nn.Conv2d(3, 16, 3, padding=1), torch.randn(2, 3, 9, 7, generator=g)
    elif kind == "conv-stride-nobias":
        m, x = nn.Conv2d(4, 16, 3, stride=2, padding=1, bias=False), torch.randn(2, 4, 9, 8, generator=g)
    elif kind == "conv-reflect":
        m, x = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), torch.randn(2, 3, 6, 6, generator=g)
    elif kind == "conv-1x1":
        m, x = nn.Conv2d(2, 32, 1), torch.randn(2, 2, 5, 6, generator=g)
    elif kind == "conv-same":  # a string padding: convolution_backward takes only integers
        m, x = nn.Conv2d(3, 16, 3, padding="same"), torch.randn(2, 3, 6, 5, generator=g)
    elif kind == "conv-same-even":  # "same" with an even kernel pads unevenly (one more row / column after)
        m, x = nn.Conv2d(3, 16, (2, 3), padding="same", dilation=(1, 2)), torch.randn(2, 3, 6, 7, generator=g)
    elif kind == "conv-valid":
        m, x = nn.Conv2d(3, 16, 3, padding="valid"), torch.randn(2, 3, 6, 5, generator=g)
    else:
        raise AssertionError(kind)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.requires_grad_(False), path, x


def run_layer(m, path, x, *, keep_input, through_weight=False, weight_fn=None, recompute_weight=False, saved=None,
              ctx=None, keep_output=None):
    """(output, ∂x, [∂ packed parameters], the trainer) of one forward + backward with a fixed output gradient
    (`through_weight=False`: a layer that keeps x makes y again; tests/test_train_through_weight.py sets it)."""
    splits = {"qkv": (16, 16, 16)} if path == "qkv" else None
    t = OFTTrainer([(path, m)], num_blocks=2, alpha=0, keep_input=keep_input, through_weight=through_weight,
                   weight_fn=weight_fn, recompute_weight=recompute_weight, splits=splits, keep_output=keep_output)
    randomize(t)
    xx = x.detach().clone().requires_grad_(True)
    hooks = contextlib.nullcontext()
    if saved is not None:
        def pack(v):
            saved[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
            return v
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v)
    with t.attach(), hooks, ctx or contextlib.nullcontext():
        out = m(xx)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
    out.backward(g)
    return out.detach(), xx.grad, [p.grad.clone() for p in t.parameters()], t


KINDS = ["linear-expand", "linear-nobias", "linear-2d", "linear-splits", "conv", "conv-stride-nobias",
         "conv-reflect", "conv-1x1", "conv-same", "conv-same-even", "conv-valid"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("host", ["module weight", "weight made per forward", "weight made again (QOFT)"])
@pytest.mark.parametrize("chunk", [None, 40])
@pytest.mark.parametrize("delta", [False, True])
def test_keeping_the_input_gives_the_plain_values_and_gradients_bit_for_bit(kind, host, chunk, delta, monkeypatch):
    if delta:  # fp32 Linear outputs of any size in the delta form (`train._rotated_rows`)
        monkeypatch.setattr(train, "_DELTA_MIN_ELEMENTS", 0)
    if chunk is not None:  # the rotation and ∂y (written over the made-again y) in many pieces: `_rotated`'s own
        monkeypatch.setattr(train, "_CHUNK_ELEMENTS", chunk)  # and, for fp32 Linear outputs, the bypass hook's
        monkeypatch.setattr(bypass, "_ONE_PIECE_ROWS", 0)
        monkeypatch.setattr(bypass, "_MIN_PIECE_ROWS", 1)
        monkeypatch.setattr(bypass, "_PIECE_ELEMENTS", 5 * chunk)
    m, path, x = layer_case(kind)
    kw = {"module weight": {}, "weight made per forward": {"weight_fn": cast_weight_fn},
          "weight made again (QOFT)": {"weight_fn": cast_weight_fn, "recompute_weight": True}}[host]
    plain = run_layer(m, path, x, keep_input=False, **kw)
    kept = run_layer(m, path, x, keep_input=True, **kw)
    assert torch.equal(kept[0], plain[0])
    assert torch.equal(kept[1], plain[1])
    assert len(kept[2]) == len(plain[2]) and all(torch.equal(a, b) for a, b in zip(kept[2], plain[2]))
    assert all(bool(g.abs().sum() > 0) for g in kept[2]) and bool(kept[1].abs().sum() > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_bases_give_the_layers_own_output_and_input_gradient(kind):
    """An untrained layer run through `frozen_base` (QOFT: its weight made again in backward) gives what the layer's
    own forward and autograd give, bit for bit, whatever its padding ("same" with an even kernel pads unevenly)."""
    m, _, x = layer_case(kind)
    g = torch.randn(m(x).shape, generator=torch.Generator().manual_seed(7))
    got = []
    for frozen in (False, True):
        xx = x.detach().clone().requires_grad_(True)
        with train.frozen_bases([m], cast_weight_fn) if frozen else contextlib.nullcontext():
            out = m(xx)
        out.backward(g)
        got.append((out.detach(), xx.grad))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    assert bool(got[1][1].abs().sum() > 0)


@pytest.mark.parametrize("kind", ["linear-expand", "linear-splits", "conv-1x1", "conv-reflect"])
def test_the_input_is_kept_for_backward_not_the_output(kind):
    m, path, x = layer_case(kind)
    saved_plain, saved_kept = {}, {}
    out = run_layer(m, path, x, keep_input=False, saved=saved_plain)[0]
    run_layer(m, path, x, keep_input=True, saved=saved_kept)
    y_bytes = out.numel() * out.element_size()
    assert y_bytes in saved_plain.values()  # the plain path keeps y
    assert y_bytes not in saved_kept.values()  # this one does not; it keeps x (or its padded copy)
    x_bytes = (F.pad(x, (1, 1, 1, 1)) if kind == "conv-reflect" else x).untyped_storage().nbytes()
    assert x_bytes in saved_kept.values()
    # (and not the weight either, which autograd keeps for the plain product's ∂x: it is asked for again)
    assert sum(saved_plain.values()) - sum(saved_kept.values()) >= y_bytes - x_bytes


def test_default_policy_comes_from_shapes():
    assert keeps_input(nn.Linear(320, 2560))  # SD1.x GEGLU projection (8×)
    assert keeps_input(nn.Linear(320, 320)) and keeps_input(nn.Linear(768, 1280))  # pointwise, out ≥ in
    assert not keeps_input(nn.Linear(1280, 320))  # the feed-forward's second layer: y is the smaller
    assert keeps_input(nn.Conv2d(320, 320, 1)) and not keeps_input(nn.Conv2d(640, 320, 1))
    assert not keeps_input(nn.Conv2d(320, 320, 1, stride=2))  # a quarter of the positions out
    assert keeps_input(nn.Conv2d(4, 320, 3, padding=1))  # a UNet's input conv (4 latent channels): 80×
    assert not keeps_input(nn.Conv2d(320, 320, 3)) and not keeps_input(nn.Conv2d(320, 640, 3))  # 3×3: keep y
    assert not keeps_input(nn.Conv2d(4, 64, 3, stride=2))  # 64 < 8 · 4 · 2²
    assert not keeps_input(nn.LayerNorm(8))


def test_16bit_linear_outputs_keep_the_output():
    """bf16 Linear outputs (FLUX / bf16 training) take the plain path, whatever the policy: no extra product."""
    m, path, x = layer_case("linear-expand")
    m = m.to(torch.bfloat16)
    saved = {}
    run_layer(m, path, x.to(torch.bfloat16), keep_input=True, saved=saved)
    y_bytes = x.shape[0] * x.shape[1] * 64 * 2
    assert max(saved.values()) == y_bytes


def test_an_inference_tensor_input_keeps_the_output():
    """A host's tensor made under inference mode (ComfyUI's conditioning) cannot be saved for backward: the layer
    keeps y for it, with the same values and rotation gradients."""
    m, path, x = layer_case("linear-expand")
    with torch.inference_mode():
        xi = x.clone()
    results = []
    for keep in (False, True):
        t = OFTTrainer([(path, m)], num_blocks=2, alpha=0, keep_input=keep, through_weight=False)
        randomize(t)
        with t.attach():
            out = m(xi)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad for p in t.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


class Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None = None):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        context = x if context is None else context  # self-attention: to_q / to_k / to_v read one tensor
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out(F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0])


class Block(nn.Module):
    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1, self.attn2 = Attention(dim), Attention(dim, context_dim)
        self.proj = nn.Linear(dim, 8 * dim)  # GEGLU, as SD's feed-forward
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        a, gate = self.proj(self.norm3(x)).chunk(2, dim=-1)
        return x + self.out(a * F.gelu(gate))


class Net(nn.Module):
    """Two transformer blocks and a context every block reads. As ComfyUI's UNet drives its TimestepEmbedSequential
    blocks, the host iterates each Sequential and calls its layers: `gradient_checkpointing` checkpoints those layers
    without copying their inputs, so the same context tensor is read in several checkpointed runs."""

    def __init__(self, dim: int = 8, context_dim: int = 6, seed: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(Block(dim, context_dim)), nn.Sequential(Block(dim, context_dim))])
        self.head = nn.Linear(dim, dim)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, context):
        for seq in self.blocks:
            for layer in seq:
                x = layer(x, context)
        return self.head(x)


def net_problem():
    g = torch.Generator().manual_seed(3)
    return Net().requires_grad_(False), torch.randn(2, 10, 8, generator=g), torch.randn(2, 4, 6, generator=g)


def train_net(wrap: str, alpha: float = 0.0, **kw):
    """([trained parameters], losses) of 3 steps on the two-block net, all its Linears trained with OFTTrainer(**kw),
    `wrap` "checkpointing" (its blocks under `gradient_checkpointing`) or "none"."""
    net, x, context = net_problem()
    t = OFTTrainer(select_targets(net, "all-linear", "generic"), num_blocks=2, alpha=alpha, **kw)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    ckpt = gradient_checkpointing(checkpoint_blocks(net)) if wrap == "checkpointing" else contextlib.nullcontext()
    with t.attach(), ckpt:
        losses = run_training(t.parameters(), lambda s, m: F.mse_loss(net(x, context), target), steps=3, lr=1e-2)
    return [p.detach().clone() for p in t.parameters()], losses


def test_readers_of_one_input_keep_it_once():
    """to_q, to_k and to_v read one tensor: they keep that tensor (stored once) instead of three outputs of their own;
    gradients equal the plain path's bit for bit."""
    net, x, context = net_problem()
    attn = net.blocks[0][0].attn1
    results = {}
    for keep in (False, None):
        t = OFTTrainer([(n, m) for n, m in attn.named_children() if n != "to_out"], num_blocks=2, alpha=0,
                       keep_input=keep, through_weight=False)
        randomize(t)
        saved = {}

        def pack(v, saved=saved):
            saved[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
            return v

        h = x.clone().requires_grad_(True)
        with t.attach(), torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            out = attn(h)
        out.square().sum().backward()
        results[keep] = (out.detach(), h.grad, [p.grad for p in t.parameters()], saved)
    plain, kept = results[False], results[None]
    assert torch.equal(kept[0], plain[0]) and torch.equal(kept[1], plain[1])
    assert all(torch.equal(a, b) for a, b in zip(kept[2], plain[2]))
    act = x.untyped_storage().nbytes()  # one (2, 10, 8) activation; SDPA keeps q, k, v, out on both paths
    n_act = {k: sum(1 for n in r[3].values() if n == act) for k, r in results.items()}
    assert n_act[False] == n_act[None] + 2  # the base outputs of to_q, to_k, to_v → their one input


@pytest.mark.parametrize("wrap", ["none", "checkpointing"])
def test_whole_training_gives_the_same_adapter_whichever_layer_keeps_what(wrap):
    """A GEGLU-like projection keeps its input, self-attention's layers keep their one input, a context is read in
    every checkpointed block: the losses and trained parameters equal keep_input=False's bit for bit."""
    trained = {keep: train_net(wrap, keep_input=keep, through_weight=False) for keep in (False, None, True)}
    assert trained[None][1] == trained[False][1] == trained[True][1]
    assert trained[False][1][-1] < trained[False][1][0]
    for keep in (None, True):
        assert all(torch.equal(a, b) for a, b in zip(trained[keep][0], trained[False][0]))


def test_checkpointed_runs_keep_inputs_where_the_policy_says():
    """Under gradient_checkpointing the layers `keeps_input` picks keep x, in forward and again in the
    recomputation (the checkpoint requires the same tensors saved both times); keep_input=False: none."""
    for keep in (False, None):
        net, x, context = net_problem()
        targets = select_targets(net, "all-linear", "generic")
        t = OFTTrainer(targets, num_blocks=2, alpha=0, keep_input=keep, through_weight=False)
        randomize(t)
        calls = []
        real = train._RotateFromInput.apply
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train._RotateFromInput, "apply", lambda *a: calls.append(a[1].module) or real(*a))
            with t.attach(), gradient_checkpointing(checkpoint_blocks(net)):
                net(x, context).square().sum().backward()
        if keep is False:
            assert calls == []
            continue
        names = {id(m): n for n, m in targets}
        expected = {n for n, m in targets if keeps_input(m)}
        assert {names[id(m)] for m in calls} == expected
        assert "blocks.0.0.proj" in expected and "blocks.0.0.out" not in expected  # 8× wider; 4× narrower
        for n in expected:  # in a checkpointed block: forward and recomputation; the head: forward only
            assert sum(1 for m in calls if names[id(m)] == n) == (1 if n == "head" else 2)


def test_zero_layer_descriptions_take_no_memory():
    net, _, _ = net_problem()
    t = OFTTrainer(select_targets(net, "all-linear", "generic"), num_blocks=2, alpha=0)
    for tl in t.layers:
        assert all(b.untyped_storage().nbytes() <= 4 and not bool(b.any()) for b in tl.layer.blocks)
