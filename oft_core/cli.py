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

from .choices import FORMATS, MERGE_MODES, STRENGTH_MODES
from .errors import OFTError, check_strength


def _adapter_arg(text: str, what: str = "strength") -> tuple[str, float]:
    """FILE[:STRENGTH]; a colon that is not followed by a number belongs to the path. A number that is not finite
    (nan, inf) or out of range is refused here, naming the file."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            value = float(tail)
        except ValueError:
            return text, 1.0
        return path, check_strength(value, f"{what} given after the file name", path=path)
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
    from .combine import merge
    from .formats import format_family, load_adapter, write_adapter

    args_ = [_adapter_arg(a, "weight") for a in args.adapter]
    items = [(load_adapter(path), weight) for path, weight in args_]
    merged = merge(items, mode=args.mode)
    to = args.format or format_family(items[0][0].format)
    out = write_adapter(merged, args.out, to, overwrite=args.overwrite, inputs=_read_paths(items))
    print(f"wrote {out} ({to}, {len(merged)} layers, {args.mode} of {len(items)} adapters)")
    _print_tool_notes(out)
    return 0


def _print_tool_notes(out) -> None:
    """What the tool that defines the written format will do differently with it (read back from the file)."""
    from .formats import load_adapter
    from .summary import tool_notes

    for note in tool_notes(load_adapter(out)):
        print(f"  note: {note}")


def _read_paths(items) -> list[str]:
    """Every file the adapters were read from (and a PEFT adapter_config.json beside one): never an output."""
    import os

    paths = []
    for adapter, _ in items:
        if adapter.path:
            paths.append(adapter.path)
            config = os.path.join(os.path.dirname(os.path.abspath(adapter.path)), "adapter_config.json")
            if os.path.isfile(config):
                paths.append(config)
    return paths


def _cmd_convert(args) -> int:
    from .formats import load_adapter, write_adapter

    source = load_adapter(args.file)
    adapter = source
    if args.blocks is not None:  # the layers at 0 dropped, the others scaled (refused when the mode cannot)
        from .blocks import scale_layers, with_block_strength

        adapter = scale_layers(with_block_strength(source, args.blocks), args.block_mode,
                               hint="Pass --block-mode orthogonal to store R(m·Q) (exact for strength mode "
                                    "orthogonal), use only 0 and 1, or bake the model instead (bake --blocks)")
        if len(adapter) == 0:
            raise OFTError(f"nothing to write: block strength {args.blocks!r} switched every layer off",
                           path=args.file)
    out = write_adapter(adapter, args.out, args.to, overwrite=args.overwrite,
                        inputs=[args.file] + _read_paths([(source, 1.0)]))
    print(f"wrote {out} ({args.to}, {len(adapter)} layers, from {adapter.format})")
    _print_tool_notes(out)
    return 0


def _cmd_demo(args) -> int:
    import os
    import tempfile

    from .demo import run_demo

    if args.out_dir is None:
        with tempfile.TemporaryDirectory(prefix="oft-demo-") as tmp:
            return run_demo(tmp, steps=args.steps, seed=args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    return run_demo(args.out_dir, steps=args.steps, seed=args.seed)


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
    e.add_argument("--strength-mode", choices=STRENGTH_MODES, default="kohya")
    e.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="LoRA tensor dtype")
    e.add_argument("--out", required=True, help="output LoRA .safetensors (never overwritten without --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    e.set_defaults(func=_cmd_extract_lora)


def _add_ops_commands(sub) -> None:
    m = sub.add_parser("merge", help="merge adapters into one (compose rotations or average generators)")
    m.add_argument("adapter", nargs="+", metavar="FILE[:WEIGHT]",
                   help="adapter file or PEFT directory; WEIGHT (default 1): compose R^w, average weight")
    m.add_argument("--mode", choices=MERGE_MODES, default="compose",
                   help="compose: apply in order; average: weighted mean of generators (same layers required)")
    m.add_argument("--out", required=True, help="output file (PEFT: directory); never overwritten without --overwrite")
    m.add_argument("--format", choices=FORMATS, default=None,
                   help="output format (default: the first adapter's)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output")
    m.set_defaults(func=_cmd_merge)
    c = sub.add_parser("convert", help="rewrite an adapter in another format (refused when not exact)")
    c.add_argument("file", help="adapter .safetensors file or PEFT adapter directory")
    c.add_argument("--to", required=True, choices=FORMATS, help="output format")
    c.add_argument("--out", required=True, help="output file (PEFT: directory); never overwritten without --overwrite")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output")
    c.add_argument("--blocks", default=None, metavar="SPEC",
                   help="per-block strength multipliers written into the file, e.g. 'double=1, single=0' (see "
                        "oft_core/blocks.py); layers at 0 are left out")
    c.add_argument("--block-mode", choices=("kohya", "orthogonal"), default="kohya",
                   help="kohya (default): only multipliers 0 and 1 (I + s(R − I) is no rotation, a file cannot hold "
                        "it); orthogonal: other multipliers m stored as R(m·Q)")
    c.set_defaults(func=_cmd_convert)


def _build_parser() -> argparse.ArgumentParser:
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
    b.add_argument("--strength-mode", choices=STRENGTH_MODES, default="kohya",
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
    args = _build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OFTError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug, keep the traceback
            raise
        # An OS error about a path the user gave (not found, permission denied, a folder given for a file) is an
        # input error, not a bug: one line, no traceback.
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2


def _one_line(text: str) -> str:
    """The CLI contract is one line per error: a file name or a header value with a line break would break it."""
    return " ".join(text.splitlines())
