"""What an adapter holds: format, layers, blocks, constraint and which layers hit it, parameter count."""

from __future__ import annotations

from collections import Counter

from .rotation import generator_norms
from .spec import OFTAdapter


def describe(adapter: OFTAdapter) -> dict:
    """A JSON-ready summary of `adapter` (the CLI's `inspect --json` and the nodes' OFTInspect use it)."""
    layers = []
    for layer in adapter:
        norms = generator_norms(layer)
        clamped = [bound is not None and norm > bound for norm, bound in norms]
        layers.append(
            {
                "name": layer.key,
                "component": layer.component,
                "side": layer.side,
                "kind": layer.kind,
                "num_blocks": list(layer.num_blocks) if not layer.shared else "shared",
                "block_size": list(layer.block_sizes),
                "stages": int(layer.generators[0].shape[0]) if layer.kind == "butterfly" else None,
                "parameterization": layer.parameterization,
                "constraint": layer.constraint.describe(),
                "norm": [round(n, 6) for n, _ in norms],
                "bound": [None if b is None else round(b, 6) for _, b in norms],
                "clamped": any(clamped),
                "rescaled": layer.row_scale is not None,
                "params": layer.num_params(),
            }
        )
    shapes = Counter(
        (tuple(x["num_blocks"]) if isinstance(x["num_blocks"], list) else "shared", tuple(x["block_size"]))
        for x in layers
    )
    return {
        "path": adapter.path,
        "format": adapter.format,
        "layers": len(layers),
        "components": dict(Counter(x["component"] for x in layers)),
        "parameters": adapter.num_params(),
        "block_layouts": [{"num_blocks": list(n) if n != "shared" else n, "block_size": list(b), "layers": c}
                          for (n, b), c in shapes.most_common()],
        "clamped_layers": [x["name"] for x in layers if x["clamped"]],
        "info": {k: v for k, v in adapter.info.items() if k != "ignored_keys"},
        "ignored_keys": len(adapter.info.get("ignored_keys", [])),
        "per_layer": layers,
    }


def format_text(d: dict, *, max_layers: int = 12) -> str:
    lines = [
        f"file:       {d['path']}",
        f"format:     {d['format']}",
        f"layers:     {d['layers']} ({', '.join(f'{k} {v}' for k, v in d['components'].items())})",
        f"parameters: {d['parameters']:,}",
        "blocks:     " + "; ".join(
            f"{'shared' if lay['num_blocks'] == 'shared' else '+'.join(map(str, lay['num_blocks']))} × "
            f"{'+'.join(map(str, lay['block_size']))} ({lay['layers']} layers)" for lay in d["block_layouts"]),
    ]
    constraints = Counter(x["constraint"] for x in d["per_layer"])
    lines.append("constraint: " + "; ".join(f"{c} ({n} layers)" for c, n in constraints.items()))
    lines.append(f"clamped:    {len(d['clamped_layers'])} of {d['layers']} layers hit the constraint")
    for name in d["clamped_layers"][:max_layers]:
        lines.append(f"  - {name}")
    if len(d["clamped_layers"]) > max_layers:
        lines.append(f"  … and {len(d['clamped_layers']) - max_layers} more (--json lists all)")
    if d["ignored_keys"]:
        lines.append(f"ignored:    {d['ignored_keys']} non-OFT keys in the file")
    return "\n".join(lines)
