"""The training step never reads a value back from the device but once (the loss), so a GPU step never waits.

Pinned on the CPU by counting the Python-level reads (`Tensor.item`, `__float__`, `__bool__`, `__int__`, `tolist`)
during steps 2…N of real training runs: Cayley by solve, by series (bounded by the constraint), by block elimination
(blocks > 96), the Cayley–Neumann series, gradient accumulation, and each optimizer. The sync-free Cayley gives the
same rotation as the default one (which chooses its method from ‖Q‖, a device read). The OFTTrainer node's own loop
(ComfyUI objective, noise on the device, several latent sizes, schedule, progress) is counted the same way.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oft_core.demo import _ToyModel
from oft_core.rotation import _cayley, _skew, rotation_blocks
from oft_core.spec import Constraint, make_layer
from oft_core.train import OFTTrainer, run_training, select_targets

READS = ("item", "__float__", "__bool__", "__int__", "tolist")


@contextlib.contextmanager
def count_reads():
    """Counts calls of the Tensor methods that copy a value to the host, made while the block runs."""
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        orig = originals[name]

        def f(self, *a, **k):
            counts[name] += 1
            return orig(self, *a, **k)

        return f

    try:
        for name in READS:
            setattr(torch.Tensor, name, counting(name))
        yield counts
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)


def random_skew(n: int, b: int, norm: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = _skew(torch.randn(n, b, b, generator=g))
    return q * (norm / torch.linalg.matrix_norm(q, keepdim=True))


@pytest.mark.parametrize("b", [8, 24, 40, 96, 128, 200])
@pytest.mark.parametrize("norm", [0.05, 0.4, 3.0])
def test_sync_free_cayley_is_the_same_rotation(b, norm):
    q = random_skew(3, b, norm, seed=b)
    ref = _cayley(q.double()).float()  # fp64: the exact rotation to compare both fp32 routes with
    default = _cayley(q)
    for bound in (None, norm * 1.01):  # no constraint (solve / elimination); a bound that allows the series
        r = _cayley(q, norm_bound=bound, sync_free=True)
        assert (r - ref).abs().max() <= max(4 * float((default - ref).abs().max()), 2e-6), (b, norm, bound)
        eye = torch.eye(b).expand_as(r)
        assert (r.transpose(-1, -2) @ r - eye).abs().max() < 1e-5


def test_sync_free_rotation_blocks_read_nothing_from_the_device():
    for b, constraint in ((24, Constraint("norm_clamp", 1e-3)), (40, Constraint()), (128, Constraint())):
        layer = make_layer(path="", name="x", side="out", blocks=[random_skew(4, b, 0.2)], transpose=True,
                           constraint=constraint, source="kohya", key="oft_unet_x")
        with count_reads() as reads:
            blocks = rotation_blocks(layer, blocks=[random_skew(4, b, 0.2)], sync_free=True)
        assert blocks[0].shape == (4, b, b)
        assert sum(reads.values()) == 0, (b, dict(reads))
        with count_reads() as reads:  # the default route does read ‖Q‖ (the count above is not vacuous)
            rotation_blocks(layer, blocks=[random_skew(4, b, 0.2)])
        assert sum(reads.values()) >= (1 if b > 16 else 0)


class Wide(nn.Module):
    """Two 256-wide Linears: 2 blocks of 128 exercise the block-elimination inverse of large blocks."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a, self.b = nn.Linear(256, 256), nn.Linear(256, 256, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


CASES = {
    # name: (model, input shape, trainer keywords, optimizer, grad_accum)
    "toy-solve": (_ToyModel, (4, 3, 4, 4), dict(num_blocks=2, alpha=0.0), "AdamW", 1),
    "toy-series-by-constraint": (lambda seed: _ToyModel(dim=48, seed=seed), (4, 3, 4, 4),  # 48-wide blocks
                                 dict(num_blocks=1, alpha=1e-3), "AdamW", 2),
    "toy-neumann": (_ToyModel, (4, 3, 4, 4), dict(num_blocks=2, alpha=0.0, neumann_terms=5), "Adam", 1),
    "wide-elimination": (Wide, (8, 256), dict(num_blocks=2, alpha=0.0), "AdamW", 1),
    "wide-sgd-constrained": (Wide, (8, 256), dict(num_blocks=2, alpha=1e-3), "SGD", 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_training_step_reads_the_device_once(case):
    make, shape, kw, optimizer, accum = CASES[case]
    model = make(seed=0).requires_grad_(False)
    teacher = make(seed=1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = teacher(x)
    trainer = OFTTrainer(select_targets(model, "all-linear" if make is Wide else "all-linear+conv", "generic"), **kw)
    steps = 5
    reads_cm = count_reads()
    reads = None

    def before_step(step):
        nonlocal reads
        if step == 1:  # steps 2…N: the first step may set things up (optimizer state)
            reads = reads_cm.__enter__()

    try:
        with trainer.attach():
            losses = run_training(trainer.parameters(), lambda s, m: F.mse_loss(model(x), target), steps=steps,
                                  lr=1e-2, grad_accum=accum, optimizer=optimizer, before_step=before_step)
    finally:
        if reads is not None:
            reads_cm.__exit__(None, None, None)
    total = sum(reads.values())
    assert total <= steps - 1, f"{case}: {dict(reads)} reads in {steps - 1} steps (at most one per step)"
    assert total >= 1  # the loss read-out is seen: the counter works inside the loop
    assert losses[-1] < losses[0]  # and it trained


@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
def test_an_fp16_step_with_loss_scaling_reads_the_device_once(optimizer):
    """fp16 autocast with dynamic loss scaling (the node's fp16): the scale, the overflow check and the skipped or
    taken update stay on the device (the fused optimizers take the scaler's tensors); the loss is the one read."""
    model = _ToyModel(seed=0).requires_grad_(False)
    teacher = _ToyModel(seed=1)
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = teacher(x)
    trainer = OFTTrainer(select_targets(model, "all-linear+conv", "generic"), num_blocks=2, alpha=0.0)
    steps = 5
    reads_cm = count_reads()
    reads = None

    def before_step(step):
        nonlocal reads
        if step == 1:
            reads = reads_cm.__enter__()

    def loss(s, m):
        with torch.autocast("cpu", dtype=torch.float16):
            return F.mse_loss(model(x).float(), target)

    try:
        with trainer.attach():
            losses = run_training(trainer.parameters(), loss, steps=steps, lr=1e-2, optimizer=optimizer,
                                  loss_scaling=True, before_step=before_step)
    finally:
        if reads is not None:
            reads_cm.__exit__(None, None, None)
    total = sum(reads.values())
    assert 1 <= total <= steps - 1, f"{dict(reads)} reads in {steps - 1} steps (at most one per step)"
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------ the node's loop
NODE_CASES = {
    # name: (model, trainer keywords)
    "sd-fp32-checkpointing": ("sd", dict(training_dtype="fp32", gradient_checkpointing_on=True, grad_accumulation=2,
                                         targets="all-linear+conv")),
    "sd-bf16-two-sizes-cosine-l1": ("sd2", dict(training_dtype="bf16", gradient_checkpointing_on=False,
                                                 lr_schedule="cosine", warmup_steps=2, loss_function="L1")),
    "flux-fp32-huber": ("flux", dict(training_dtype="fp32", gradient_checkpointing_on=True, loss_function="Huber",
                                     alpha=1e-3)),
    "sd-fp16-loss-scaling": ("sd", dict(training_dtype="fp16", gradient_checkpointing_on=True)),
}


@pytest.mark.comfyui
@pytest.mark.parametrize("case", sorted(NODE_CASES))
def test_the_nodes_training_loop_reads_the_device_once_per_step(comfy, comfyui_oft, case, monkeypatch):
    """The OFTTrainer node's own loop (objective, noise and noise levels, conditioning batches, several latent
    sizes, schedule, progress bar and loss text) reads one value per optimizer step over steps 2…N: the loss."""
    import comfy.model_management as mm
    import comfy_models
    from comfyui_oft.nodes import train_node as tn
    from test_train_node import flux_data, sd_data

    kind, kw = NODE_CASES[case]
    if kind == "flux":
        mp, (latents, positive) = comfy_models.flux_tiny(), flux_data()
    else:
        mp, (latents, positive) = comfy_models.sd15_tiny(), sd_data()
    if kind == "sd2":  # two latent sizes, one conditioning per batch
        g = torch.Generator().manual_seed(1)
        latents = [latents, {"samples": torch.randn(2, 4, 8, 16, generator=g)}]
        positive = [positive, positive[:1]]
    steps = 5
    reads_cm = count_reads()
    state = {"reads": None, "step": 0}

    node_before_step = tn._before_step

    def before_step(step):
        state["step"] += 1
        if state["step"] == 2:  # steps 2…N: the first step may set things up (optimizer state)
            state["reads"] = reads_cm.__enter__()
        node_before_step(step)

    # the node's own hook (ComfyUI's interrupt check is not one call per step: newer ComfyUI makes it in every op)
    monkeypatch.setattr(tn, "_before_step", before_step)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():  # as ComfyUI runs nodes
            _, losses, _ = tn.train(mp, latents, positive, steps=steps, learning_rate=2e-2, batch_size=2,
                                    **dict(dict(alpha=0.0, targets="attention"), **kw))
    finally:
        if state["reads"] is not None:
            reads_cm.__exit__(None, None, None)
        torch.set_num_threads(n)
        mm.unload_all_models()
    reads = state["reads"]
    total = sum(reads.values())
    assert total <= steps - 1, f"{case}: {dict(reads)} reads in {steps - 1} steps (at most one per step)"
    assert total >= 1 and len(losses) == steps
