"""`python -m oft_core …`: inspect, bake, merge, convert OFT adapters without ComfyUI, and `demo` (train, save,
reload, bake and check a tiny model end to end, no download).

This is the command line; it talks to a terminal, so it prints. Errors in the user's input end with one line
`error: …` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import OFTError


def _adapter_arg(text: str) -> tuple[str, float]:
    """FILE[:STRENGTH]; a colon that is not followed by a number belongs to the path."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _cmd_inspect(args) -> int:
    from .formats import load_adapter
    from .summary import describe, format_text

    d = describe(load_adapter(args.file), base=args.base, he_max_rows=args.he_rows)
    print(json.dumps(d, indent=2) if args.json else format_text(d))
    return 0


def _cmd_bake(args) -> int:
    from .bake import bake

    adapters = [_adapter_arg(a) for a in args.adapter]
    result = bake(args.base, adapters, args.out, mode=args.strength_mode, block_spec=args.blocks,
                  overwrite=args.overwrite, allow_unmatched=args.allow_unmatched,
                  show_progress=False if args.no_progress else None)
    for (path, strength), report in zip(adapters, result.reports):
        print(f"{path} (strength {strength:g}): {len(report.matched)} of {report.total} adapter layers matched "
              "base keys")
        for name in report.unmatched:
            print(f"  not matched: {name}")
    skipped = f", {result.layers_skipped} layers at strength 0 left untouched" if result.layers_skipped else ""
    print(f"wrote {result.out} ({result.tensors_changed} weights changed{skipped}, {args.strength_mode} strength, "
          f"{result.seconds:.1f}s)")
    return 0


def _cmd_merge(args) -> int:
    from .formats import load_adapter
    from .ops import merge
    from .writers import format_family, write_adapter

    items = [(load_adapter(path), weight) for path, weight in map(_adapter_arg, args.adapter)]
    merged = merge(items, mode=args.mode)
    to = args.format or format_family(items[0][0].format)
    out = write_adapter(merged, args.out, to, overwrite=args.overwrite)
    print(f"wrote {out} ({to}, {len(merged)} layers, {args.mode} of {len(items)} adapters)")
    return 0


def _cmd_convert(args) -> int:
    from .formats import load_adapter
    from .writers import write_adapter

    adapter = load_adapter(args.file)
    out = write_adapter(adapter, args.out, args.to, overwrite=args.overwrite)
    print(f"wrote {out} ({args.to}, {len(adapter)} layers, from {adapter.format})")
    return 0


def _cmd_demo(args) -> int:
    import os
    import tempfile

    if args.out_dir is None:
        with tempfile.TemporaryDirectory(prefix="oft-demo-") as tmp:
            return run_demo(tmp, steps=args.steps, seed=args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    return run_demo(args.out_dir, steps=args.steps, seed=args.seed)


def run_demo(out_dir: str, *, steps: int = 60, seed: int = 0, say=print) -> int:
    """The main job end to end on a tiny model: train (oft_core.train, activation side), save as kohya, reload, bake
    at strengths 1 and 0, and check the baked model against the trained one. Returns 0 when every check passes."""
    import os

    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file

    from .bake import bake
    from .formats import load_adapter
    from .train import OFTTrainer, ToyModel, run_training, select_targets, training_metadata
    from .writers import write_adapter

    torch.manual_seed(seed)
    model = ToyModel(dim=32, channels=16, seed=seed).requires_grad_(False)
    teacher = ToyModel(dim=32, channels=16, seed=seed + 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, 6, 6, generator=g)
    with torch.no_grad():
        target = teacher(x)
    base_path = os.path.join(out_dir, "demo_base.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base_path, metadata={"demo": "oft_core"})
    say(f"1. built a tiny attention + conv model ({sum(p.numel() for p in model.parameters()):,} parameters), "
        f"saved as {base_path}")

    trainer = OFTTrainer(select_targets(model, "all-linear+conv", "generic"), num_blocks=4, alpha=0.0)
    with trainer.attach():
        losses = run_training(trainer.parameters(), lambda s, m: F.mse_loss(model(x), target), steps=steps, lr=2e-2)
        with torch.no_grad():
            trained_out = model(x)
    with torch.no_grad():
        base_out = model(x)
    say(f"2. trained OFT on {len(trainer.layers)} layers ({trainer.num_params():,} parameters, 4 blocks each) for "
        f"{steps} steps with the activation-side trainer: loss {losses[0]:.5f} -> {losses[-1]:.5f}")

    adapter_path = os.path.join(out_dir, "demo_oft.safetensors")
    meta = training_metadata(steps=steps, lr=2e-2, optimizer="AdamW", seed=seed, batch_size=16, grad_accum=1)
    write_adapter(trainer.to_adapter(meta), adapter_path, "kohya", overwrite=True)
    adapter = load_adapter(adapter_path)
    say(f"3. saved as kohya {adapter_path} and reloaded: format {adapter.format}, {len(adapter)} layers")

    checks = []
    outs = {}
    for strength in (1.0, 0.0):
        out = os.path.join(out_dir, f"demo_baked_s{strength:g}.safetensors")
        result = bake(base_path, [(adapter_path, strength)], out, overwrite=True, show_progress=False)
        outs[strength] = out
        say(f"4. baked at strength {strength:g}: {out} ({result.tensors_changed} weights changed)")
    baked = ToyModel(dim=32, channels=16, seed=seed)
    baked.load_state_dict(load_file(outs[1.0]))
    with torch.no_grad():
        merged_out = baked(x)
    diff = float((merged_out - trained_out).abs().max())
    scale = float(trained_out.abs().max())
    merged_loss = float(F.mse_loss(merged_out, target))
    checks.append((f"max |baked forward − trained forward| = {diff:.2e} (outputs up to {scale:.2f}; fp32)",
                   diff <= 1e-4 * max(scale, 1.0)))
    trained_loss = float(F.mse_loss(trained_out, target))
    checks.append((f"loss of the baked model {merged_loss:.5f} = the trained model's {trained_loss:.5f} (start "
                   f"{losses[0]:.5f})", abs(merged_loss - trained_loss) <= 1e-5 * trained_loss < losses[0]))
    base_sd, zero_sd = load_file(base_path), load_file(outs[0.0])
    exact = all(torch.equal(base_sd[k], zero_sd[k]) for k in base_sd) and base_sd.keys() == zero_sd.keys()
    checks.append(("strength 0 bake is the base bit for bit", exact))
    changed = sum(not torch.equal(base_sd[k], v) for k, v in load_file(outs[1.0]).items())
    checks.append((f"strength 1 bake changed {changed} weights = the {len(adapter)} adapted layers",
                   changed == len(adapter)))
    checks.append((f"base model forward unchanged by training (max |Δ| {float((base_out - model(x)).abs().max()):.1e}"
                   ")", torch.equal(base_out, model(x))))
    say("5. checks:")
    for text, ok in checks:
        say(f"   [{'ok' if ok else 'FAILED'}] {text}")
    return 0 if all(ok for _, ok in checks) else 1


def _cmd_extract_lora(args) -> int:
    from .extract import extract_lora

    if (args.rank is None) == (args.rel_error is None):
        print("error: give exactly one of --rank and --rel-error", file=sys.stderr)
        return 2
    result = extract_lora(args.file, args.base, args.out, rank=args.rank, rel_error=args.rel_error,
                          strength=args.strength, mode=args.strength_mode, dtype=args.dtype,
                          overwrite=args.overwrite)
    print(result.text())
    return 0


def _add_extract_command(sub) -> None:
    e = sub.add_parser("extract-lora", help="approximate an OFT adapter by a LoRA (truncated SVD of R·W − W)")
    e.add_argument("file", help="adapter .safetensors file or PEFT adapter directory")
    e.add_argument("--base", required=True, help="the base model .safetensors the adapter is applied to")
    e.add_argument("--rank", type=int, default=None, help="LoRA rank of every layer")
    e.add_argument("--rel-error", type=float, default=None, metavar="E",
                   help="instead of --rank: per layer, the smallest rank whose relative Frobenius error is ≤ E")
    e.add_argument("--strength", type=float, default=1.0, help="adapter strength the LoRA reproduces (default 1)")
    e.add_argument("--strength-mode", choices=("kohya", "orthogonal"), default="kohya")
    e.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="LoRA tensor dtype")
    e.add_argument("--out", required=True, help="output LoRA .safetensors (never overwritten without --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    e.set_defaults(func=_cmd_extract_lora)


def _add_ops_commands(sub) -> None:
    m = sub.add_parser("merge", help="merge adapters into one (compose rotations or average generators)")
    m.add_argument("adapter", nargs="+", metavar="FILE[:WEIGHT]",
                   help="adapter file or PEFT directory; WEIGHT (default 1): compose R^w, average weight")
    m.add_argument("--mode", choices=("compose", "average"), default="compose",
                   help="compose: apply in order; average: weighted mean of generators (same layers required)")
    m.add_argument("--out", required=True, help="output file (PEFT: directory); never overwritten without --overwrite")
    m.add_argument("--format", choices=("kohya", "lycoris", "peft"), default=None,
                   help="output format (default: the first adapter's)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output")
    m.set_defaults(func=_cmd_merge)
    c = sub.add_parser("convert", help="rewrite an adapter in another format (refused when not exact)")
    c.add_argument("file", help="adapter .safetensors file or PEFT adapter directory")
    c.add_argument("--to", required=True, choices=("kohya", "lycoris", "peft"), help="output format")
    c.add_argument("--out", required=True, help="output file (PEFT: directory); never overwritten without --overwrite")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output")
    c.set_defaults(func=_cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m oft_core", description="Inspect and bake OFT adapters.")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="show what an adapter file holds")
    i.add_argument("file", help="adapter .safetensors file or PEFT adapter directory")
    i.add_argument("--json", action="store_true", help="machine-readable output, every layer")
    i.add_argument("--base", default=None, metavar="BASE.safetensors",
                   help="also report, per layer, the hyperspherical-energy change the adapter causes on this base")
    i.add_argument("--he-rows", type=int, default=1024, metavar="N",
                   help="at most N rows per weight for the energy (an evenly spaced subset; default 1024)")
    i.set_defaults(func=_cmd_inspect)
    b = sub.add_parser("bake", help="write a base model with adapters applied")
    b.add_argument("--base", required=True, help="base model .safetensors (checkpoint, UNet or FLUX transformer)")
    b.add_argument("--adapter", required=True, action="append", metavar="FILE[:STRENGTH]",
                   help="adapter file (PEFT: its directory or adapter_model.safetensors); repeat to apply in order")
    b.add_argument("--out", required=True, help="output .safetensors (never overwritten without --overwrite)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    b.add_argument("--allow-unmatched", action="store_true",
                   help="bake even when some adapter layers have no weight in the base (they are listed)")
    b.add_argument("--strength-mode", choices=("kohya", "orthogonal"), default="kohya",
                   help="kohya: R_s = I + s(R − I), what the trainer does (default); orthogonal: R_s = Cayley(s·Q)")
    b.add_argument("--blocks", default=None, metavar="SPEC",
                   help="per-block strength multipliers, e.g. 'input=0.5, output:3-5=0' or 'double=1, single=0' "
                        "(see oft_core/blocks.py); layers at 0 stay bit for bit")
    b.add_argument("--no-progress", action="store_true", help="never show the progress bar on stderr")
    b.set_defaults(func=_cmd_bake)
    d = sub.add_parser("demo", help="train a tiny OFT adapter, save, reload, bake and check it (no download)")
    d.add_argument("--out-dir", default=None, help="where to write the demo files (default: a temporary directory, "
                                                   "removed afterwards)")
    d.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)
    _add_ops_commands(sub)
    _add_extract_command(sub)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
