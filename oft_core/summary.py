"""What an adapter holds: format, layers, blocks, constraint and which layers hit it, parameter count; per layer the
orthogonality error of its blocks and, given a base model, the hyperspherical-energy change it causes.

Hyperspherical energy (Liu et al. 2018; the quantity OFT is designed to preserve, Qiu et al. 2023 §3):
HE(W) = Σ_{i≠j} 1/‖ŵ_i − ŵ_j‖ over the unit-normalised rows ŵ_i (output neurons) of a weight, ‖ŵ_i − ŵ_j‖ =
√(2 − 2 ŵ_i·ŵ_j). An input-side rotation (PEFT ≥ 0.14, W·M) turns every row by the same orthogonal M, so every
pairwise angle and HE are unchanged (up to rounding); an output-side rotation (kohya, LyCORIS: M·W) mixes rows
within a block, which preserves the angles between the block's *columns*, not between its rows, so HE changes in
general. Cheap by design: at most `he_rows` rows per weight (an evenly spaced subset, the same rows before and after),
Gram matrix in float64 in chunks of 256 rows.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter

import torch

from .rotation import StrengthMode, generator_norms, orthogonality_error, rotate_weight
from .spec import OFTAdapter

log = logging.getLogger(__name__)
HE_ROWS = 1024
_HE_CHUNK = 256


def hyperspherical_energy(weight: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    """HE of the rows of `weight` (flattened to 2-D), over the row subset `rows` (all when None), in float64."""
    w = weight.reshape(weight.shape[0], -1)
    if rows is not None:
        w = w[rows]
    w = w.to(torch.float64)
    norms = w.norm(dim=1, keepdim=True)
    w = w / torch.where(norms > 0, norms, torch.ones_like(norms))
    total = 0.0
    n = w.shape[0]
    for start in range(0, n, _HE_CHUNK):
        g = w[start:start + _HE_CHUNK] @ w.T  # (chunk, n) cosines
        d2 = (2.0 - 2.0 * g).clamp_min_(0.0)
        idx = torch.arange(start, min(start + _HE_CHUNK, n))
        d2[idx - start, idx] = math.inf  # i == j excluded
        total += float(d2.clamp_min_(1e-24).rsqrt().sum())
    return total


def he_rows(n: int, limit: int = HE_ROWS) -> torch.Tensor | None:
    """An evenly spaced subset of `limit` of `n` row indices (None: all rows)."""
    if n <= limit:
        return None
    return torch.linspace(0, n - 1, limit).round().long().unique()


def energy_changes(adapter: OFTAdapter, base: str | os.PathLike, *, strength: float = 1.0,
                   mode: StrengthMode = "kohya", max_rows: int = HE_ROWS) -> tuple[dict[tuple[str, str], dict], dict]:
    """Per matched layer {he_before, he_after, he_rel_change, rows, base_key}, and the match summary.

    Reads one base weight at a time."""
    from safetensors import safe_open

    from .match import match_adapter
    from .names import build_key_map
    from .safetensors_io import read_header

    header = read_header(base)
    report = match_adapter(adapter, header.shapes, build_key_map(header.shapes), base_name=os.path.basename(base))
    out: dict[tuple[str, str], dict] = {}
    with safe_open(header.path, "pt") as f:
        for m in report.matched:
            w = f.get_tensor(m.target.key)
            if m.target.offset is not None:
                w = w.narrow(*m.target.offset)
            w = w.to(torch.float32)
            rows = he_rows(w.shape[0], max_rows)
            before = hyperspherical_energy(w, rows)
            after = hyperspherical_energy(rotate_weight(m.layer, w, strength, mode), rows)
            out[(m.layer.component, m.layer.name)] = {
                "he_before": before, "he_after": after,
                "he_rel_change": (after - before) / before if before else 0.0,
                "rows": w.shape[0] if rows is None else int(rows.numel()),
                "base_key": m.target.key,
            }
    return out, {"base": header.path, "summary": report.summary(), "unmatched": list(report.unmatched)}


def describe(adapter: OFTAdapter, base: str | os.PathLike | None = None, *, he_max_rows: int = HE_ROWS) -> dict:
    """A JSON-ready summary of `adapter` (the CLI's `inspect --json` and the nodes' OFTInspect use it).

    With `base` (a .safetensors model), every matched layer also gets its hyperspherical-energy change on that base.
    """
    energies, base_info = energy_changes(adapter, base, max_rows=he_max_rows) if base is not None else ({}, None)
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
                "num_blocks": list(layer.num_blocks) if not layer.block_share else "shared",
                "block_size": list(layer.block_sizes),
                "stages": int(layer.generators[0].shape[0]) if layer.kind == "butterfly" else None,
                "parameterization": layer.parameterization,
                "constraint": layer.constraint.describe(),
                "norm": [round(n, 6) for n, _ in norms],
                "bound": [None if b is None else round(b, 6) for _, b in norms],
                "clamped": any(clamped),
                "rescaled": layer.row_scale is not None,
                "params": layer.num_params(),
                "orthogonality_error": orthogonality_error(layer),
                **energies.get((layer.component, layer.name), {}),
            }
        )
    shapes = Counter(
        (tuple(x["num_blocks"]) if isinstance(x["num_blocks"], list) else "shared", tuple(x["block_size"]))
        for x in layers
    )
    result = {
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
        "orthogonality_error_max": max((x["orthogonality_error"] for x in layers), default=0.0),
    }
    if base_info is not None:
        changes = [x["he_rel_change"] for x in layers if "he_rel_change" in x]
        base_info["layers_measured"] = len(changes)
        base_info["he_rel_change_max_abs"] = max((abs(c) for c in changes), default=0.0)
        base_info["he_rel_change_mean"] = sum(changes) / len(changes) if changes else 0.0
        result["energy"] = base_info
    return result


def format_text(d: dict, *, max_layers: int = 12, more_hint: str = " (--json lists all)") -> str:
    """`describe`'s result as text; lists longer than `max_layers` end with "… and N more" + `more_hint` (the command
    line's hint; the nodes pass "": text shown in ComfyUI names no command-line flag)."""
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
        lines.append(f"  … and {len(d['clamped_layers']) - max_layers} more{more_hint}")
    lines.append(f"orthogonality: max |BᵀB − I| = {d['orthogonality_error_max']:.2e} over all blocks")
    if "energy" in d:
        e = d["energy"]
        lines.append(f"energy:     hyperspherical energy on {e['base']} ({e['summary']}): relative change mean "
                     f"{e['he_rel_change_mean']:+.3e}, max |{e['he_rel_change_max_abs']:.3e}| over "
                     f"{e['layers_measured']} layers")
        measured = [x for x in d["per_layer"] if "he_rel_change" in x]
        for x in sorted(measured, key=lambda x: -abs(x["he_rel_change"]))[:max_layers]:
            lines.append(f"  {x['name']}: HE {x['he_before']:.6g} -> {x['he_after']:.6g} "
                         f"({x['he_rel_change']:+.3e}, {x['rows']} rows), orthogonality error "
                         f"{x['orthogonality_error']:.1e}")
        if len(measured) > max_layers:
            lines.append(f"  … and {len(measured) - max_layers} more{more_hint}")
    if d["ignored_keys"]:
        lines.append(f"ignored:    {d['ignored_keys']} non-OFT keys in the file")
    return "\n".join(lines)
