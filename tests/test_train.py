"""oft_core.train: the input-centric OFT trainer, on toy models (no ComfyUI).

What is pinned: identity at step 0 (bit for bit), training lowers a fixed loss, base weights never change (also when
the training raises), same seed -> same adapter, the kohya constraint holds, and the exported kohya file, read back
by the pack's reader and merged with `rotate_weight`, reproduces the trained model (≤ 1e-5 relative, fp32), for
plain layers, convolutions and FLUX fused q|k|v / linear1 splits.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oft_core import OFTError, load_adapter, rotate_weight
from oft_core.demo import _ToyModel
from oft_core.formats import write_adapter
from oft_core.rotation import _constrain
from oft_core.train import (
    OFTTrainer,
    _split_sizes,
    checkpoint_blocks,
    frozen_for_training,
    gradient_checkpointing,
    inplace_safe,
    run_training,
    select_targets,
    training_metadata,
)

REL = 1e-5


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model: nn.Module, before: dict[str, torch.Tensor]):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# ------------------------------------------------------------------------------------------------ toy problems
def toy_problem(seed: int = 0):
    model = _ToyModel(seed=seed).requires_grad_(False)
    teacher = _ToyModel(seed=seed + 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 4, 4, generator=g)
    with torch.no_grad():
        target = teacher(x) * 0.5 + model(x) * 0.5
    return model, x, target


class FluxLike(nn.Module):
    """Module names of ComfyUI's FLUX (BFL): fused double-block qkv and single-block linear1 (q|k|v|mlp)."""

    def __init__(self, h: int = 8, mlp: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        blk = nn.Module()
        blk.img_attn = nn.Module()
        blk.img_attn.qkv, blk.img_attn.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        blk.img_mod = nn.Module()
        blk.img_mod.lin = nn.Linear(h, 6 * h)
        self.double_blocks = nn.ModuleList([blk])
        sb = nn.Module()
        sb.linear1, sb.linear2 = nn.Linear(h, 3 * h + mlp), nn.Linear(h + mlp, h)
        self.single_blocks = nn.ModuleList([sb])
        self.h, self.mlp = h, mlp
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)

    def forward(self, x):
        b = self.double_blocks[0]
        q, k, v = b.img_attn.qkv(x).chunk(3, -1)
        x = x + b.img_attn.proj(F.scaled_dot_product_attention(q, k, v))
        s = self.single_blocks[0]
        qkv, m = s.linear1(x).split([3 * self.h, self.mlp], -1)
        q, k, v = qkv.chunk(3, -1)
        return x + s.linear2(torch.cat([F.scaled_dot_product_attention(q, k, v), F.gelu(m)], -1))


def train_toy(model, x, target, *, steps=25, lr=2e-2, seed=0, preset="all-linear+conv", family="generic",
              batch=4, **kw):
    trainer = OFTTrainer(select_targets(model, preset, family), **kw)
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(step, micro):
        idx = torch.randperm(x.shape[0], generator=gen)[:batch]
        return F.mse_loss(model(x[idx]), target[idx])

    with trainer.attach():
        losses = run_training(trainer.parameters(), loss_fn, steps=steps, lr=lr)
    return trainer, losses


def fixed_loss(model, x, target, trainer=None):
    with torch.no_grad():
        if trainer is None:
            return float(F.mse_loss(model(x), target))
        with trainer.attach():
            return float(F.mse_loss(model(x), target))


def merged_copy(model: nn.Module, adapter) -> nn.Module:
    """The model with every adapter layer merged into its weight (the pack's merge path)."""
    merged = copy.deepcopy(model)
    modules = {n.replace(".", "_"): m for n, m in merged.named_modules()}  # kohya names are underscored
    for layer in adapter:
        m = modules[layer.name.replace(".", "_")]
        with torch.no_grad():
            m.weight.copy_(rotate_weight(layer, m.weight))
    return merged


# ------------------------------------------------------------------------------------------------ tests
def test_step0_is_the_base_model_exactly():
    model, x, _ = toy_problem()
    base = model(x)
    trainer = OFTTrainer(select_targets(model, "all-linear+conv", "generic"), num_blocks=2, alpha=1e-2)
    with trainer.attach():
        out = model(x)
    assert torch.equal(out, base)
    # a FLUX-like model with fused splits too
    flux = FluxLike().requires_grad_(False)
    t = torch.randn(2, 5, 8)
    base = flux(t)
    trainer = OFTTrainer(select_targets(flux, "attention"), num_blocks=2, alpha=0)
    with trainer.attach():
        assert torch.equal(flux(t), base)


def test_training_lowers_a_fixed_loss_and_never_writes_base_weights():
    model, x, target = toy_problem()
    before = snapshot(model)
    base_out = model(x)
    start = fixed_loss(model, x, target)
    trainer, losses = train_toy(model, x, target, num_blocks=2, alpha=0)
    end = fixed_loss(model, x, target, trainer)
    assert end < 0.8 * start, (start, end, losses)
    assert_same_weights(model, before)
    assert "forward" not in model.attn.to_q.__dict__  # detached: the class forward again
    assert torch.equal(model(x), base_out)


class NormModel(nn.Module):
    """Conv + group_norm + attention + layer_norm: frozen layers a gradient passes through, as in a UNet block."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8)
        self.attn = _ToyModel(dim=8, channels=8).attn
        self.register_buffer("scale", torch.full((8,), 0.5))
        self.head = nn.Linear(8, 4)

    def forward(self, img):
        t = self.gn(self.conv(img)).flatten(2).transpose(1, 2)
        return self.head(self.ln(self.attn(t)) * self.scale)


def test_weights_made_in_inference_mode_train_zero_copy_and_come_back_untouched():
    """As under ComfyUI's executor: the model is built (loaded) and trained inside torch.inference_mode(), so every
    weight and buffer is an inference tensor; training (under inference_mode(False)) fails without
    `frozen_for_training` and works with it, using the same memory, and the very same tensors are back afterwards."""
    with torch.inference_mode():
        torch.manual_seed(0)
        model = NormModel()
        x = torch.randn(2, 3, 4, 4)
        target = torch.randn(2, 16, 4)
    originals = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    assert all(v.is_inference() for v in originals.values())
    before = {k: v.clone() for k, v in originals.items()}
    ptrs = {k: v.data_ptr() for k, v in originals.items()}
    trainer = OFTTrainer(select_targets(model, "attention", "generic"), num_blocks=2, alpha=0)

    def train():
        return run_training(trainer.parameters(), lambda s, m: F.mse_loss(model(x.clone()), target.clone()),
                            steps=3, lr=1e-2)

    with torch.inference_mode():
        with torch.inference_mode(False), torch.enable_grad():
            with trainer.attach(), pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
                train()
            seen = {}
            with frozen_for_training(model) as n, trainer.attach():
                assert n == len(originals)
                for k, v in model.state_dict(keep_vars=True).items():
                    seen[k] = (v.is_inference(), v.data_ptr(), v.requires_grad)
                losses = train()
    assert all(not inf and ptr == ptrs[k] and not rg for k, (inf, ptr, rg) in seen.items()), seen  # aliases
    assert losses[-1] < losses[0]
    assert any(float(p.detach().abs().max()) > 0 for p in trainer.parameters())
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is originals[k] for k in originals)  # the same objects are back
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_frozen_for_training_restores_on_error_and_freezes_normal_parameters():
    model = NormModel()  # normal tensors, requires_grad True (as a model a host built outside inference mode)
    params = dict(model.named_parameters())
    with pytest.raises(ValueError), frozen_for_training(model) as n:
        assert n == 0
        assert not any(p.requires_grad for p in model.parameters())
        raise ValueError("cancelled")
    assert all(p.requires_grad for p in model.parameters())
    assert all(model.get_parameter(k) is p for k, p in params.items())


def test_attach_restores_the_model_when_training_raises():
    model, x, target = toy_problem()
    before = snapshot(model)
    base_out = model(x)
    trainer = OFTTrainer(select_targets(model, "all-linear", "generic"), num_blocks=2, alpha=0)

    def cancel(step):
        if step == 2:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        with trainer.attach():
            run_training(trainer.parameters(), lambda s, m: F.mse_loss(model(x), target), steps=5, lr=1e-2,
                         before_step=cancel)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert_same_weights(model, before)
    assert torch.equal(model(x), base_out)
    assert any(p.abs().sum() > 0 for p in trainer.parameters())  # two steps did happen


def test_same_seed_same_adapter_and_other_seed_differs():
    model, x, target = toy_problem()
    a, _ = train_toy(model, x, target, steps=6, seed=3, num_blocks=2, alpha=0)
    b, _ = train_toy(model, x, target, steps=6, seed=3, num_blocks=2, alpha=0)
    c, _ = train_toy(model, x, target, steps=6, seed=4, num_blocks=2, alpha=0)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_kohya_constraint_holds_after_training():
    model, x, target = toy_problem()
    alpha = 1e-3
    trainer, _ = train_toy(model, x, target, steps=15, lr=5e-2, num_blocks=2, alpha=alpha)
    clamped = 0
    for tl in trainer.layers:
        for i, q in enumerate(trainer.stored_generators(tl)):
            bound = alpha * tl.layer.split_sizes[i]
            assert float(_constrain(tl.layer, q, i).norm()) <= bound * (1 + 1e-5)
            clamped += float(q.norm()) > bound
    assert clamped, "the test should drive some layer into the constraint"
    adapter = trainer.to_adapter()
    assert {layer.constraint.value for layer in adapter} == {float(torch.tensor(alpha))}


@pytest.mark.parametrize("alpha", [0.0, 2e-3])
def test_exported_kohya_file_merged_equals_the_trained_model(tmp_path, alpha):
    model, x, target = toy_problem()
    trainer, _ = train_toy(model, x, target, steps=15, num_blocks=2, alpha=alpha)
    with torch.no_grad(), trainer.attach():
        trained = model(x)
    meta = training_metadata(steps=15, lr=2e-2, optimizer="AdamW", seed=0, batch_size=4, grad_accum=1)
    path = write_adapter(trainer.to_adapter(meta), tmp_path / "toy.safetensors", "kohya")
    loaded = load_adapter(path)
    assert loaded.format == "kohya" and len(loaded) == len(trainer.layers)
    assert loaded.metadata["ss_network_module"] == "networks.oft"
    assert loaded.metadata["ss_steps"] == "15" and float(loaded.metadata["ss_learning_rate"]) == 2e-2
    assert {layer.key for layer in loaded} == {"oft_unet_" + tl.path.replace(".", "_") for tl in trainer.layers}
    with torch.no_grad():
        out = merged_copy(model, loaded)(x)
    assert rel_err(out, trained) <= REL
    assert rel_err(trained, model(x)) > 1e-3  # the adapter does something


def test_flux_fused_layers_export_as_splits(tmp_path):
    flux = FluxLike().requires_grad_(False)
    targets = select_targets(flux, "attention+single")
    assert [p for p, _ in targets] == ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj",
                                       "single_blocks.0.linear1", "single_blocks.0.linear2"]
    # sd-scripts oft_flux: attention = the double blocks' SelfAttention only; all-linear = every block Linear
    assert [p for p, _ in select_targets(flux, "attention")] == [p for p, _ in targets[:2]]
    assert [p for p, _ in select_targets(flux, "all-linear")] == [p for p, _ in targets[:2]] + [
        "double_blocks.0.img_mod.lin"] + [p for p, _ in targets[2:]]
    assert _split_sizes(*targets[0]) == (8, 8, 8)
    assert _split_sizes(*targets[2]) == (8, 8, 8, 16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 8, generator=g)
    target = torch.randn(4, 5, 8, generator=g)
    trainer = OFTTrainer(targets, num_blocks=2, alpha=0)
    with trainer.attach():
        losses = run_training(trainer.parameters(), lambda s, m: F.mse_loss(flux(x), target), steps=10, lr=3e-2)
        with torch.no_grad():
            trained = flux(x)
    assert losses[-1] < losses[0]
    path = write_adapter(trainer.to_adapter(), tmp_path / "flux.safetensors", "kohya")
    loaded = load_adapter(path)
    assert loaded.format == "kohya_flux" and loaded.metadata["ss_network_module"] == "networks.oft_flux"
    qkv = loaded.layers[("unet", "double_blocks_0_img_attn_qkv")]
    assert qkv.split_sizes == (8, 8, 8) and qkv.num_blocks == (2, 2, 2)
    assert loaded.layers[("unet", "single_blocks_0_linear1")].split_sizes == (8, 8, 8, 16)
    with torch.no_grad():
        assert rel_err(merged_copy(flux, loaded)(x), trained) <= REL


class HostLinear(nn.Module):
    """A host's own Linear op that is no nn.Linear, as ComfyUI 0.8's per-layer quantized Linear: an int8 weight of
    shape (out, in) and a scale; it computes x·(q·s)ᵀ + b."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        scale = lin.weight.detach().abs().max() / 127
        self.weight = nn.Parameter((lin.weight.detach() / scale).round().to(torch.int8), requires_grad=False)
        self.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        self.register_buffer("scale", scale)

    def value(self) -> torch.Tensor:
        return self.weight.float() * self.scale

    def forward(self, x):
        return F.linear(x, self.value(), self.bias)


def test_a_hosts_linear_op_that_is_no_nn_linear_trains_as_one():
    """A Linear-shaped layer of the host's own class (`in_features`, `out_features`, an (out, in) weight) is selected
    and trained through the weight its `weight_fn` gives: the same losses and adapter as nn.Linear layers holding
    those weights, its stored weight untouched; a layer whose weight is not (out, in) is no Linear."""
    host, plain = FluxLike(seed=3).requires_grad_(False), FluxLike(seed=3).requires_grad_(False)
    for (name, m), (_, p) in zip(list(host.named_modules()), list(plain.named_modules())):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.Linear):
                op = HostLinear(child)
                setattr(m, child_name, op)
                getattr(p, child_name).weight.copy_(op.value())
    stored = snapshot(host)

    def weight_fn(module, x):
        return (module.value(), module.bias) if isinstance(module, HostLinear) else (module.weight, module.bias)

    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(6, 5, 8, generator=g), torch.randn(6, 5, 8, generator=g)
    got, got_losses = train_toy(host, x, target, steps=8, preset="all-linear", family="flux", num_blocks=2,
                                alpha=0, weight_fn=weight_fn, recompute_weight=lambda m: isinstance(m, HostLinear))
    want, want_losses = train_toy(plain, x, target, steps=8, preset="all-linear", family="flux", num_blocks=2,
                                  alpha=0)
    assert [tl.path for tl in got.layers] == [tl.path for tl in want.layers] and len(got.layers) == 5
    assert all(type(tl.module) is HostLinear for tl in got.layers)
    assert want_losses[-1] < want_losses[0]
    assert torch.allclose(torch.tensor(got_losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    for a, b in zip(got.parameters(), want.parameters()):
        assert rel_err(a.detach(), b.detach()) <= 1e-4
    assert_same_weights(host, stored)
    # an (in, out) weight, an Embedding: not Linears
    odd = HostLinear(nn.Linear(8, 4))
    odd.weight = nn.Parameter(odd.weight.detach().t().contiguous(), requires_grad=False)
    host.double_blocks[0].img_attn.proj = odd
    assert "double_blocks.0.img_attn.proj" not in [p for p, _ in select_targets(host, "all-linear", "flux")]


def test_cayley_neumann_trains_and_exports_as_the_nearest_cayley_rotation(tmp_path):
    model, x, target = toy_problem()
    start = fixed_loss(model, x, target)
    trainer, _ = train_toy(model, x, target, steps=15, num_blocks=2, alpha=0, neumann_terms=5)
    assert trainer.layers[0].layer.parameterization == "neumann"
    assert fixed_loss(model, x, target, trainer) < start
    adapter = trainer.to_adapter()
    assert all(layer.parameterization == "cayley" for layer in adapter)
    err = adapter.info["neumann_export_error"]
    assert 0 < err < 5e-2
    with torch.no_grad(), trainer.attach():
        trained = model(x)
    loaded = load_adapter(write_adapter(adapter, tmp_path / "n.safetensors", "kohya"))
    with torch.no_grad():
        assert rel_err(merged_copy(model, loaded)(x), trained) < 50 * err + REL


@pytest.mark.parametrize("updates", [1, 2])
def test_gradient_checkpointing_and_inplace_safe_give_the_same_gradients(updates):
    """Blocks that normalise their input and add to it in place, as ComfyUI's FLUX blocks do: once (0.3.64's
    single blocks, `x += …`) or twice, normalising again in between (ComfyUI 0.8's double blocks: `img += attn`,
    then `img += mlp(norm2(img))`). Both wrappers give the gradients of the same math written out of place. Twice
    used to give wrong gradients under checkpointing, silently: the recomputation kept the first norm's input by
    reference and the second update overwrote it before backward read it."""

    class InplaceBlock(nn.Module):
        def __init__(self, inplace=True):
            super().__init__()
            self.inplace = inplace
            self.norms = nn.ModuleList([nn.LayerNorm(8, elementwise_affine=False) for _ in range(updates)])
            self.lins = nn.ModuleList([nn.Linear(8, 8) for _ in range(updates)])

        def forward(self, x):
            for norm, lin in zip(self.norms, self.lins):
                if self.inplace:
                    x += lin(norm(x))
                else:
                    x = x + lin(norm(x))
            return x

    class Net(nn.Module):
        def __init__(self, inplace=True):
            super().__init__()
            self.lin_in = nn.Linear(8, 8)
            self.blocks = nn.ModuleList([InplaceBlock(inplace), InplaceBlock(inplace)])

        def forward(self, x):
            x = self.lin_in(x)
            for b in self.blocks:
                x = b(x)
            return x

    torch.manual_seed(0)
    net = Net().requires_grad_(False)
    plain = Net(inplace=False).requires_grad_(False)
    plain.load_state_dict(net.state_dict())
    x = torch.randn(3, 8)

    def trainer_of(model):
        trainer = OFTTrainer(select_targets(model, "all-linear", "generic"), num_blocks=2, alpha=0)
        with torch.no_grad():
            for i, p in enumerate(trainer.parameters()):
                p.copy_(torch.linspace(-0.3, 0.3, p.numel()).reshape(p.shape) * (i + 1))  # every gradient non-trivial
        return trainer

    reference = trainer_of(plain)
    with reference.attach():
        plain(x).square().sum().backward()
    trainer = trainer_of(net)
    for wrap in (gradient_checkpointing, inplace_safe):
        with trainer.attach(), wrap(checkpoint_blocks(net)):
            for p in trainer.parameters():
                p.grad = None
            net(x).square().sum().backward()
        assert all("forward" not in m.__dict__ for m in net.modules())
        for a, b in zip(trainer.parameters(), reference.parameters()):
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), (wrap.__name__, a.grad, b.grad)
    with trainer.attach(), pytest.raises(RuntimeError, match="inplace"):
        net(x).square().sum().backward()  # the failure both wrappers avoid


def test_checkpointing_reaches_layers_of_sequential_blocks_the_host_iterates():
    """ComfyUI's UNet never calls its TimestepEmbedSequential blocks: `forward_timestep_embed` iterates them and calls
    their layers. Checkpointing must still happen there (fewer tensors kept for backward), with bit-identical
    gradients, and a layer that writes into its input must be refused rather than give wrong gradients."""

    class Layer(nn.Module):
        def __init__(self, inplace=False):
            super().__init__()
            self.lin, self.inplace = nn.Linear(8, 8), inplace

        def forward(self, x):
            if self.inplace:
                x.mul_(1.0)
            return x + F.gelu(self.lin(x))

    class Net(nn.Module):
        def __init__(self, inplace=False):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(Layer(), Layer(inplace)), nn.Sequential(Layer())])
            self.middle = nn.Sequential(Layer())

        def forward(self, x):
            for block in list(self.blocks) + [self.middle]:
                for layer in block:  # as forward_timestep_embed does: the Sequential's own forward never runs
                    x = layer(x)
            return x

    torch.manual_seed(0)
    net = Net().requires_grad_(False)
    x = torch.randn(4, 8)
    trainer = OFTTrainer(select_targets(net, "all-linear", "generic"), num_blocks=2, alpha=0)
    with torch.no_grad():
        trainer.parameters()[0].add_(0.1)
    grads, kept = [], []
    for wrap in (contextlib.nullcontext, lambda: gradient_checkpointing(checkpoint_blocks(net))):
        count = [0]

        def pack(t, count=count):
            count[0] += t.shape == x.shape  # activations (the blocks and parameters are kept either way)
            return t

        with trainer.attach(), wrap(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for p in trainer.parameters():
                p.grad = None
            net(x).square().sum().backward()
        grads.append([p.grad.clone() for p in trainer.parameters()])
        kept.append(count[0])
        assert all("forward" not in m.__dict__ for m in net.modules())
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    # the layers' internal activations are recomputed, not kept: with checkpointing only each of the four layers'
    # input is kept (and the loss's); without, their internals too
    assert kept[1] == 4 + 1 < kept[0]
    bad = Net(inplace=True).requires_grad_(False)
    with gradient_checkpointing(checkpoint_blocks(bad)), pytest.raises(OFTError, match="in place"):
        bad(x.requires_grad_())


def test_bad_block_counts_raise_naming_the_layer():
    model = _ToyModel()
    targets = select_targets(model, "all-linear+conv", "generic")
    with pytest.raises(OFTError, match=r"layer 'conv_in'.*num_blocks.*expected a divisor of 8, found 3"):
        OFTTrainer(targets, num_blocks=3)
    with pytest.raises(OFTError, match=r"layer 'proj'.*block_size.*divisor of 16, found 5"):
        OFTTrainer(targets, block_size=5)
    with pytest.raises(OFTError, match="exactly one of num_blocks or block_size"):
        OFTTrainer(targets, num_blocks=2, block_size=4)
    with pytest.raises(OFTError, match="exactly one of num_blocks or block_size"):
        OFTTrainer(targets)
    with pytest.raises(OFTError, match="block size .* expected ≥ 2, found 1"):
        OFTTrainer(targets, num_blocks=8)
    flux = FluxLike()
    with pytest.raises(OFTError, match="single_blocks.0.linear1.*one block count for every split"):
        OFTTrainer(select_targets(flux, "attention+single"), block_size=4)
    with pytest.raises(OFTError, match="target preset for a flux model"):
        select_targets(flux, "all-linear+conv")
    with pytest.raises(OFTError, match="learning rate"):
        run_training(OFTTrainer(targets, num_blocks=2).parameters(), lambda s, m: None, steps=1, lr=0)
    with pytest.raises(OFTError, match="steps: expected ≥ 1, found 0"):
        run_training([], lambda s, m: None, steps=0, lr=1e-3)


def test_block_size_mode_and_conv_layers():
    model, x, target = toy_problem()
    trainer, losses = train_toy(model, x, target, steps=5, block_size=4, alpha=0)
    by_path = {tl.path: tl.layer for tl in trainer.layers}
    assert by_path["conv_in"].num_blocks == (2,) and by_path["conv_in"].block_sizes == (4,)
    assert by_path["proj"].num_blocks == (4,)
    assert losses[-1] < losses[0]


def test_saved_tensor_hooks_are_found_on_a_torch_without_the_tracing_argument(monkeypatch):
    """`_outer_saved_tensors_hooks` (what `_on_own_copies` chains to) on a torch whose accessor takes no argument."""
    import oft_core.train as ot

    real = torch._C._autograd._top_saved_tensors_default_hooks

    def older(*args):
        if args:
            raise TypeError("_top_saved_tensors_default_hooks() takes no arguments (1 given)")
        return real(False)

    assert ot._outer_saved_tensors_hooks() is None
    with torch.autograd.graph.saved_tensors_hooks(ot._identity, ot._identity):
        assert ot._outer_saved_tensors_hooks() == (ot._identity, ot._identity)
        monkeypatch.setattr(torch._C._autograd, "_top_saved_tensors_default_hooks", older)
        assert ot._outer_saved_tensors_hooks() == (ot._identity, ot._identity)
