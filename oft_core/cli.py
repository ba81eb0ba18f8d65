"""`python -m oft_core …`: inspect and bake OFT adapters without ComfyUI.

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

    d = describe(load_adapter(args.file))
    print(json.dumps(d, indent=2) if args.json else format_text(d))
    return 0


def _cmd_bake(args) -> int:
    from .bake import bake

    adapters = [_adapter_arg(a) for a in args.adapter]
    result = bake(args.base, adapters, args.out, overwrite=args.overwrite, allow_unmatched=args.allow_unmatched)
    for (path, strength), report in zip(adapters, result.reports):
        print(f"{path} (strength {strength:g}): {len(report.matched)} of {report.total} adapter layers matched "
              "base keys")
        for name in report.unmatched:
            print(f"  not matched: {name}")
    print(f"wrote {result.out} ({result.tensors_changed} weights changed)")
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
    i.set_defaults(func=_cmd_inspect)
    b = sub.add_parser("bake", help="write a base model with adapters applied")
    b.add_argument("--base", required=True, help="base model .safetensors (checkpoint, UNet or FLUX transformer)")
    b.add_argument("--adapter", required=True, action="append", metavar="FILE[:STRENGTH]",
                   help="adapter file (PEFT: its directory or adapter_model.safetensors); repeat to apply in order")
    b.add_argument("--out", required=True, help="output .safetensors (never overwritten without --overwrite)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    b.add_argument("--allow-unmatched", action="store_true",
                   help="bake even when some adapter layers have no weight in the base (they are listed)")
    b.set_defaults(func=_cmd_bake)
    _add_ops_commands(sub)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
