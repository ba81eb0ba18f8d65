"""The demo: a tiny attention + conv model (`_ToyModel`, also the tests' model) and `run_demo`, the main job end to end
(train, save as kohya, reload, bake, check), run by `python -m oft_core demo`. Needs no download and no ComfyUI."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ToyAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x):
        a = F.scaled_dot_product_attention(self.to_q(x), self.to_k(x), self.to_v(x))
        return x + self.to_out(a)


class _ToyModel(nn.Module):
    """A tiny attention + conv model for tests and the demo (generic family)."""

    def __init__(self, dim: int = 16, channels: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.proj = nn.Linear(channels, dim)
        self.attn = _ToyAttention(dim)
        self.head = nn.Linear(dim, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, img):
        h = self.conv_in(img)  # (B, C, H, W)
        t = self.proj(h.flatten(2).transpose(1, 2))
        return self.head(self.attn(t))


def run_demo(out_dir: str, *, steps: int = 60, seed: int = 0, say=print) -> int:
    """The main job end to end on a tiny model: train (oft_core.train, activation side), save as kohya, reload, bake
    at strengths 1 and 0, and check the baked model against the trained one. Returns 0 when every check passes."""
    import torch

    torch.manual_seed(seed)
    problem = _problem(out_dir, seed, say)
    trained = _train(problem, steps, say)
    adapter_path, n_layers = _save(out_dir, trained, steps, seed, say)
    baked = _bake(out_dir, problem["base_path"], adapter_path, say)
    checks = _checks(problem, trained, baked, n_layers, seed)
    say("5. checks:")
    for text, ok in checks:
        say(f"   [{'ok' if ok else 'FAILED'}] {text}")
    return 0 if all(ok for _, ok in checks) else 1


def _problem(out_dir: str, seed: int, say) -> dict:
    """A frozen tiny model, a teacher's outputs to fit, the model saved as the base file."""
    import os

    import torch
    from safetensors.torch import save_file

    model = _ToyModel(dim=32, channels=16, seed=seed).requires_grad_(False)
    teacher = _ToyModel(dim=32, channels=16, seed=seed + 1)
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        target = teacher(x)
    base_path = os.path.join(out_dir, "demo_base.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base_path, metadata={"demo": "oft_core"})
    say(f"1. built a tiny attention + conv model ({sum(p.numel() for p in model.parameters()):,} parameters), "
        f"saved as {base_path}")
    return {"model": model, "x": x, "target": target, "base_path": base_path}


def _train(problem: dict, steps: int, say) -> dict:
    """OFT trained on the activation side; the model's outputs with it attached and without."""
    import torch
    import torch.nn.functional as F

    from .train import OFTTrainer, run_training, select_targets

    model, x, target = problem["model"], problem["x"], problem["target"]
    trainer = OFTTrainer(select_targets(model, "all-linear+conv", "generic"), num_blocks=4, alpha=0.0)
    with trainer.attach():
        losses = run_training(trainer.parameters(), lambda s, m: F.mse_loss(model(x), target), steps=steps, lr=2e-2)
        with torch.no_grad():
            trained_out = model(x)
    with torch.no_grad():
        base_out = model(x)
    say(f"2. trained OFT on {len(trainer.layers)} layers ({trainer.num_params():,} parameters, 4 blocks each) for "
        f"{steps} steps with the activation-side trainer: loss {losses[0]:.5f} -> {losses[-1]:.5f}")
    return {"trainer": trainer, "losses": losses, "trained_out": trained_out, "base_out": base_out}


def _save(out_dir: str, trained: dict, steps: int, seed: int, say) -> tuple[str, int]:
    """The adapter written as kohya and read back; (its path, its layer count)."""
    import os

    from .formats import load_adapter, write_adapter
    from .train import training_metadata

    adapter_path = os.path.join(out_dir, "demo_oft.safetensors")
    meta = training_metadata(steps=steps, lr=2e-2, optimizer="AdamW", seed=seed, batch_size=16, grad_accum=1)
    write_adapter(trained["trainer"].to_adapter(meta), adapter_path, "kohya", overwrite=True)
    adapter = load_adapter(adapter_path)
    say(f"3. saved as kohya {adapter_path} and reloaded: format {adapter.format}, {len(adapter)} layers")
    return adapter_path, len(adapter)


def _bake(out_dir: str, base_path: str, adapter_path: str, say) -> dict[float, str]:
    """The base baked with the saved adapter at strengths 1 and 0: {strength: output file}."""
    import os

    from .bake import bake

    outs = {}
    for strength in (1.0, 0.0):
        out = os.path.join(out_dir, f"demo_baked_s{strength:g}.safetensors")
        result = bake(base_path, [(adapter_path, strength)], out, overwrite=True, show_progress=False)
        outs[strength] = out
        say(f"4. baked at strength {strength:g}: {out} ({result.tensors_changed} weights changed)")
    return outs


def _checks(problem: dict, trained: dict, outs: dict[float, str], n_layers: int, seed: int) -> list[tuple[str, bool]]:
    """What the demo proves, each as (text, passed)."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    model, x, target = problem["model"], problem["x"], problem["target"]
    trained_out, losses = trained["trained_out"], trained["losses"]
    baked = _ToyModel(dim=32, channels=16, seed=seed)
    baked.load_state_dict(load_file(outs[1.0]))
    with torch.no_grad():
        merged_out = baked(x)
        now_out = model(x)
    diff = float((merged_out - trained_out).abs().max())
    scale = float(trained_out.abs().max())
    merged_loss = float(F.mse_loss(merged_out, target))
    trained_loss = float(F.mse_loss(trained_out, target))
    base_sd, zero_sd = load_file(problem["base_path"]), load_file(outs[0.0])
    exact = all(torch.equal(base_sd[k], zero_sd[k]) for k in base_sd) and base_sd.keys() == zero_sd.keys()
    changed = sum(not torch.equal(base_sd[k], v) for k, v in load_file(outs[1.0]).items())
    return [
        (f"max |baked forward − trained forward| = {diff:.2e} (outputs up to {scale:.2f}; fp32)",
         diff <= 1e-4 * max(scale, 1.0)),
        (f"loss of the baked model {merged_loss:.5f} = the trained model's {trained_loss:.5f}",
         abs(merged_loss - trained_loss) <= 1e-5 * trained_loss),
        (f"training lowered the loss: {trained_loss:.5f} < start {losses[0]:.5f}", trained_loss < losses[0]),
        ("strength 0 bake is the base bit for bit", exact),
        (f"strength 1 bake changed {changed} weights = the {n_layers} adapted layers", changed == n_layers),
        (f"base model forward unchanged by training (max |Δ| {float((trained['base_out'] - now_out).abs().max()):.1e})",
         torch.equal(trained["base_out"], now_out)),
    ]
