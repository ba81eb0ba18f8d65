"""What an adapter holds: format, layers, blocks, constraint and which layers hit it, parameter count; per layer the
orthogonality error of its blocks and, given a base model, the hyperspherical-energy change it causes.

Hyperspherical energy (Liu et al. 2018; the quantity OFT is designed to preserve, Qiu et al. 2023 §3):
HE(W) = Σ_{i≠j} 1/‖ŵ_i − ŵ_j‖ over the unit-normalised rows ŵ_i (output neurons) of a weight, ‖ŵ_i − ŵ_j‖ =
√(2 − 2 ŵ_i·ŵ_j). An input-side rotation (PEFT ≥ 0.14, W·M) turns every row by the same orthogonal M, so every
pairwise angle and HE are unchanged (up to rounding); an output-side rotation (kohya, LyCORIS: M·W) mixes rows
within a block, which preserves the angles between the block's *columns*, not between its rows, so HE changes in
general. Cheap by design: at most `_he_rows` rows per weight (an evenly spaced subset, the same rows before and after),
Gram matrix in float64 in chunks of 256 rows.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from itertools import repeat
from operator import attrgetter, is_not, itemgetter

import torch

from .errors import OFTError, _bulk
from .rotation import _NORM_EPS, _cayley, _norm_of, _orthogonality_error, _stored_norms, _StrengthMode, rotate_weight
from .spec import OFTAdapter

log = logging.getLogger(__name__)
_HE_ROWS = 1024
_HE_CHUNK = 256


def _hyperspherical_energy(weight: torch.Tensor, rows: torch.Tensor | None = None) -> float:
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


def _he_rows(n: int, limit: int = _HE_ROWS) -> torch.Tensor | None:
    """An evenly spaced subset of `limit` of `n` row indices (None: all rows)."""
    if n <= limit:
        return None
    return torch.linspace(0, n - 1, limit).round().long().unique()


def _energy_changes(adapter: OFTAdapter, base: str | os.PathLike, *, strength: float = 1.0,
                   mode: _StrengthMode = "kohya", max_rows: int = _HE_ROWS) -> tuple[dict[tuple[str, str], dict], dict]:
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
            rows = _he_rows(w.shape[0], max_rows)
            before = _hyperspherical_energy(w, rows)
            after = _hyperspherical_energy(rotate_weight(m.layer, w, strength, mode), rows)
            out[(m.layer.component, m.layer.name)] = {
                "he_before": before, "he_after": after,
                "he_rel_change": (after - before) / before if before else 0.0,
                "rows": w.shape[0] if rows is None else int(rows.numel()),
                "base_key": m.target.key,
            }
    return out, {"base": header.path, "summary": report.summary(), "unmatched": list(report.unmatched)}


# ------------------------------------------------------------------------------------------------ tool limits
# What the reference tools themselves do with a file (sd-scripts 48d368fa networks/oft.py + oft_flux.py,
# lycoris-lora 4.1.3), emulated from the file's key names exactly as their loaders decide (checked against the tools
# in tests/test_tools.py). Each note names the tool, what it does, and the layers concerned.
_FLUX1_SPLITS = {"qkv": (3072, 3072, 3072), "linear1": (3072, 3072, 3072, 12288)}
# (name endings, tested with str.endswith: a regex search per name scanned every name from each of its characters,
# a tenth of a second for 100,000 layers; kohya layer names hold no newline, the one place `$` differs)
_KOHYA_ATTN = tuple(f"_attn{i}_{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out_0"))
_KOHYA_TF = ("_proj_in", "_proj_out", "_ff_net_0_proj", "_ff_net_2")
_KOHYA_FLUX_ATTN = re.compile(r"^double_blocks_\d+_(img|txt)_attn_(qkv|proj)$")


def _examples(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" … ({len(names)} in all)" if len(names) > n else "")


def tool_notes(adapter: OFTAdapter) -> list[str]:
    """Where the tool that defines `adapter`'s format will not do what this pack does with it (one line each)."""
    names = [layer.key.split(".")[0] for layer in adapter]
    fmt = adapter.format
    if fmt == "kohya_flux":
        return _kohya_flux_notes(adapter, names)
    if fmt == "kohya":
        return _kohya_notes(adapter, names)
    if fmt.startswith("lycoris"):
        return _lycoris_notes(adapter, names)
    return []


def _kohya_flux_notes(adapter: OFTAdapter, names: list[str]) -> list[str]:
    notes = []
    bare = [k.removeprefix("oft_unet_") for k in names]
    if not any("_mlp" in k for k in names):  # sd-scripts' all-linear switch (create_network_from_weights)
        dropped = [k for k, b in zip(names, bare) if not _KOHYA_FLUX_ATTN.match(b)]
        if dropped:
            notes.append(f"sd-scripts networks.oft_flux will ignore {len(dropped)} of {len(names)} layers "
                         f"({_examples(dropped)}): without a key containing '_mlp' it adapts only the double "
                         "blocks' attention qkv / proj, and its load is not strict (no warning)")
    odd = [layer.key for layer in adapter for part, sizes in _FLUX1_SPLITS.items()
           if layer.name.endswith(part) and len(layer.split_sizes) > 1 and layer.split_sizes != sizes]
    if odd:
        notes.append(f"sd-scripts networks.oft_flux hard-codes FLUX.1's split widths (q|k|v 3×3072, linear1 "
                     f"3×3072 + 12288): it cannot load {len(odd)} layers of this file ({_examples(odd)})")
    notes.append("sd-scripts networks.oft_flux cannot merge this file into a model (its merge_to crashes); it "
                 "applies it only as a forward patch at inference")
    return notes


def _kohya_notes(adapter: OFTAdapter, names: list[str]) -> list[str]:
    notes = []
    diffusers = any(k.startswith("oft_unet_" + p) for k in names for p in ("down_blocks", "up_blocks", "mid_block"))
    conv_on = any("in_layers_2" in k for k in names)  # sd-scripts' enable_conv switch
    linear_on = any("_ff_" in k for k in names)  # and its enable_all_linear switch
    kinds = {"attn": [], "tf": [], "conv": []}
    for k in names:
        kinds["attn" if k.endswith(_KOHYA_ATTN) else "tf" if k.endswith(_KOHYA_TF) else "conv"].append(k)
    if kinds["conv"] and not conv_on:
        why = "(SD1.x/SD2.x files name layers after diffusers modules, so they never have one)" if diffusers else ""
        notes.append(f"sd-scripts networks.oft will ignore {len(kinds['conv'])} ResBlock / down / up-sample "
                     f"layers ({_examples(kinds['conv'])}): it enables conv layers only when a key contains "
                     f"'in_layers_2' {why}".rstrip() + "; ComfyUI and this pack apply them")
    if kinds["tf"] and not linear_on:
        notes.append(f"sd-scripts networks.oft will ignore {len(kinds['tf'])} transformer layers "
                     f"({_examples(kinds['tf'])}): it enables them only when a key contains '_ff_'")
    if len({n for layer in adapter for n in layer.num_blocks}) > 1:
        notes.append("sd-scripts networks.oft builds every layer with the block count of the file's first key: "
                     "it cannot load this file, whose layers have different block counts")
    notes.append("sd-scripts: OFTInfModule.merge_to(multiplier) ignores its argument; merge at a strength "
                 "through the network multiplier (create_network_from_weights(multiplier, …))")
    return notes


def _lycoris_notes(adapter: OFTAdapter, names: list[str]) -> list[str]:
    from .formats.lycoris import _layout_problem

    notes = []
    bad = [layer.key for layer in adapter if layer.kind == "diag" and layer.parameterization != "matrix"
           and _layout_problem(layer)]
    if bad:
        notes.append(f"LyCORIS diag-oft cannot load {len(bad)} layers ({_examples(bad)}): it rebuilds a layer's "
                     "layout from the block size alone and only holds a block size ≤ the block count")
    stored = [layer.key for layer in adapter if layer.parameterization == "matrix"]
    if stored:
        notes.append(f"LyCORIS 4.1.3 cannot load {len(stored)} layers ({_examples(stored)}): they are LyCORIS 2.0 "
                     "'oft_diag' layers (the rotation R itself), which it no longer reads, nor does ComfyUI's own "
                     "loader; this pack applies them")
    if any(k.startswith("lora_unet_") for k in names):
        notes.append("LyCORIS 4.1.3: its kohya-style loader (lycoris.kohya.create_network_from_weights) stops "
                     "with an assertion on SD UNets (duplicated lora name: lora_unet_time_embedding_linear_1); "
                     "lycoris.wrapper.create_lycoris_from_weights with LORA_PREFIX 'lora_unet' loads this file")
    notes.append("LyCORIS: the kohya-style network's merge_to always merges at strength 1 (its multiplier is "
                 "ignored); LycorisNetwork.merge_to(weight) honours the weight")
    return notes


# Layers checked together (stacked) at most this many generator elements at a time: an adapter of 100,000 small
# layers is summarised in a few batched solves instead of 100,000 small ones, without stacking a large adapter whole.
_BATCH_ELEMENTS = 1 << 22


_PLAIN_FIELDS = attrgetter("component", "side", "kind", "num_blocks", "block_share", "parameterization",
                           "neumann_coeffs", "transpose")
_TENSOR_FIELDS = attrgetter("shape", "dtype", "device")


def _layouts(layers: list) -> list[tuple]:
    """Per layer, everything `describe` reports of it besides its name and its generators' values: layers of one
    layout share every such figure (block counts, sizes, constraint, bound, parameter count), computed once per
    layout. Column by column (no Python step per layer for the usual layer of one split). The constraint is taken by
    identity (a reader gives the layers of one alpha one object; equal objects apart only cost a group more)."""
    plain = list(map(_PLAIN_FIELDS, layers))
    constraints = list(map(id, map(attrgetter("constraint"), layers)))
    row_scales = list(map(attrgetter("row_scale"), layers))
    if any(map(is_not, row_scales, repeat(None))):
        row_scales = [None if r is None else int(r.numel()) for r in row_scales]
    generators = list(map(attrgetter("blocks"), layers))
    if set(map(len, generators)) == {1}:
        tensors = list(map(_TENSOR_FIELDS, map(itemgetter(0), generators)))
    else:
        tensors = [tuple(map(_TENSOR_FIELDS, gens)) for gens in generators]
    return list(zip(plain, constraints, row_scales, tensors))


def _plain(layer) -> bool:
    """A layer whose figures `_batched_figures` computes (diag, one split, exact Cayley, no constraint or kohya's
    clamp, values present); others are left to `_stored_norms` and `_orthogonality_error`."""
    return (layer.kind == "diag" and len(layer.blocks) == 1 and layer.parameterization == "cayley"
            and layer.constraint.kind in ("none", "norm_clamp") and not layer.block_share
            and layer.blocks[0].device.type != "meta")


def _bound(layer) -> float | None:
    """The bound of a plain layer's ‖Q‖_F (`_stored_norms`), None when unconstrained."""
    return layer.constraint.value * layer.split_sizes[0] if layer.constraint.kind == "norm_clamp" else None


def _batched_figures(generators: list[torch.Tensor], bounds: list[float | None], transpose: bool
                     ) -> tuple[list[float], list[float]]:
    """(‖Q‖_F, orthogonality error) of plain layers of one block shape and side (their one generator each and its
    bound), computed for all of them at once: the numbers `_stored_norms` and `_orthogonality_error` give, up to
    the rounding of a batched reduction."""
    shape = tuple(generators[0].shape)
    step = max(1, _BATCH_ELEMENTS // max(1, math.prod(shape)))
    norms_out, errors_out = [], []
    for start in range(0, len(generators), step):
        q = torch.stack(generators[start:start + step]).to(torch.float32)
        norms = torch.linalg.vector_norm(q.flatten(1), dim=1)
        bound_t = torch.tensor([math.inf if b is None else b for b in bounds[start:start + step]],
                               dtype=torch.float32)
        # rotation.constrain's clamp, per layer: Q·(min(‖Q‖, c) + ε)/(‖Q‖ + ε); unconstrained layers untouched
        scale = torch.where(torch.isinf(bound_t), torch.ones_like(norms),
                            (torch.minimum(norms, bound_t) + _NORM_EPS) / (norms + _NORM_EPS))
        r = _cayley((q * scale.view(-1, 1, 1, 1)).flatten(0, 1)).view(q.shape)
        if transpose:
            r = r.transpose(-1, -2)
        eye = torch.eye(shape[-1], dtype=r.dtype)
        errors_out += (r.transpose(-1, -2) @ r - eye).abs().flatten(1).amax(dim=1).tolist()
        norms_out += norms.tolist()
    return norms_out, errors_out


def describe(adapter: OFTAdapter, base: str | os.PathLike | None = None, *, he_max_rows: int = _HE_ROWS) -> dict:
    """A JSON-ready summary of `adapter` (the CLI's `inspect --json` and the nodes' OFTInspect use it).

    With `base` (a .safetensors model), every matched layer also gets its hyperspherical-energy change on that base.
    """
    with _bulk():
        try:
            return _describe(adapter, base, he_max_rows)
        except OFTError as e:  # (a damaged file's rotation that float32 cannot build: the file named)
            if e.path is not None or not adapter.path:
                raise
            raise OFTError(e.detail, path=adapter.path, layer=e.layer) from e


def _template(layer) -> dict:
    """The per-layer entry of `describe` with every field a layout fixes filled in (in the order of the entry). Its
    lists are shared by the entries of one layout (the result is read-only: JSON, text)."""
    return {
        "name": None,
        "component": layer.component,
        "side": layer.side,
        "kind": layer.kind,
        "num_blocks": list(layer.num_blocks) if not layer.block_share else "shared",
        "block_size": list(layer.block_sizes),
        "stages": int(layer.blocks[0].shape[0]) if layer.kind == "butterfly" else None,
        "parameterization": layer.parameterization,
        # OneTrainer projected a Linear's generators only (its Conv2d path builds R from them as stored)
        "constraint": layer.constraint.describe() + (
            " (Linear layers only)" if layer.conv_transposed and layer.constraint.kind != "none" else ""),
        "norm_of": _norm_of(layer),  # "norm" is ‖Q‖_F, or ‖R − I‖_F for a stored rotation
        "norm": None,
        "bound": None,
        "clamped": None,
        "rescaled": layer.row_scale is not None,
        "params": layer.num_params(),
        "orthogonality_error": None,
    }


def _describe(adapter: OFTAdapter, base, he_max_rows: int) -> dict:
    energies, base_info = _energy_changes(adapter, base, max_rows=he_max_rows) if base is not None else ({}, None)
    items = list(adapter.layers.items())
    groups = _groups(_layouts([layer for _, layer in items]))
    layers = _layer_entries(items, groups, *_plain_figures(items, groups))
    if energies:
        for (_, layer), x in zip(items, layers):
            x.update(energies.get((layer.component, layer.name), {}))
    shapes, components = Counter(), Counter()
    for positions in groups.values():
        x = layers[positions[0]]
        key = (tuple(x["num_blocks"]) if isinstance(x["num_blocks"], list) else "shared", tuple(x["block_size"]))
        shapes[key] += len(positions)
        components[x["component"]] += len(positions)
    result = {
        "path": adapter.path,
        "format": adapter.format,
        "layers": len(layers),
        "components": dict(components),
        "parameters": sum(layers[p[0]]["params"] * len(p) for p in groups.values()),  # = adapter.num_params()
        "block_layouts": [{"num_blocks": list(n) if n != "shared" else n, "block_size": list(b), "layers": c}
                          for (n, b), c in shapes.most_common()],
        "clamped_layers": [x["name"] for x in layers if x["clamped"]],
        "trained_biases": sum(1 for layer in adapter if layer.bias is not None),
        "info": {k: v for k, v in adapter.info.items() if k != "ignored_keys"},
        "ignored_keys": len(adapter.info.get("ignored_keys", [])),
        "made_from": adapter.made_from,  # None: read from its file as it is
        "refused_formats": dict(adapter.refused_formats),
        "per_layer": layers,
        "orthogonality_error_max": max((x["orthogonality_error"] for x in layers), default=0.0),
        "tool_notes": tool_notes(adapter),
    }
    if base_info is not None:
        result["energy"] = _energy_summary(base_info, layers)
    return result


def _groups(layouts: list[tuple]) -> dict[tuple, list[int]]:
    """layout -> the positions of its layers, in layer order (one step when every layer has one layout)."""
    if layouts and layouts.count(layouts[0]) == len(layouts):
        return {layouts[0]: list(range(len(layouts)))}
    groups: dict[tuple, list[int]] = {}
    for i, layout in enumerate(layouts):
        groups.setdefault(layout, []).append(i)
    return groups


def _plain_figures(items: list, groups: dict[tuple, list[int]]) -> tuple[list, list]:
    """Norms and orthogonality errors of the plain layers, one batched computation per block shape and side
    (None at the other layers' positions)."""
    batches: dict[tuple, list[list[int]]] = {}
    for positions in groups.values():
        first = items[positions[0]][1]
        if _plain(first):
            g = first.blocks[0]
            batches.setdefault((g.shape, g.dtype, g.device, first.transpose), []).append(positions)
    norm_at: list = [None] * len(items)
    error_at: list = [None] * len(items)
    for (_, _, _, transpose), group_list in batches.items():
        positions = [i for p in group_list for i in p]
        bounds = [b for p in group_list for b in [_bound(items[p[0]][1])] * len(p)]
        norms, errors = _batched_figures([items[i][1].blocks[0] for i in positions], bounds, transpose)
        for i, n, e in zip(positions, norms, errors):
            norm_at[i] = n
            error_at[i] = e
    return norm_at, error_at


def _layer_entries(items: list, groups: dict[tuple, list[int]], norm_at: list, error_at: list) -> list[dict]:
    """One entry per layer, in layer order: its layout's template plus its own name, norms and error."""
    layers: list = [None] * len(items)
    for positions in groups.values():
        first = items[positions[0]][1]
        template = _template(first)
        if norm_at[positions[0]] is not None:  # plain: one split, the layout's bound
            bound = _bound(first)
            template["bound"] = [None if bound is None else round(bound, 6)]
            for i in positions:
                x = template.copy()
                x["name"] = items[i][1].key
                n = norm_at[i]
                x["norm"] = [round(n, 6)]
                x["clamped"] = bound is not None and n > bound
                x["orthogonality_error"] = error_at[i]
                layers[i] = x
            continue
        for i in positions:
            layers[i] = _layer_entry(items[i][1], template)
    return layers


def _layer_entry(layer, template: dict) -> dict:
    """A layer that is not plain (splits, butterfly, shared blocks, row scale): its figures one by one."""
    norm_bound = _stored_norms(layer)
    x = template.copy()
    x["name"] = layer.key
    x["norm"] = [round(n, 6) for n, _ in norm_bound]
    x["bound"] = [None if b is None else round(b, 6) for _, b in norm_bound]
    x["clamped"] = any(b is not None and n > b for n, b in norm_bound)
    x["orthogonality_error"] = _orthogonality_error(layer)
    return x


def _energy_summary(base_info: dict, layers: list[dict]) -> dict:
    changes = [x["he_rel_change"] for x in layers if "he_rel_change" in x]
    base_info["layers_measured"] = len(changes)
    base_info["he_rel_change_max_abs"] = max((abs(c) for c in changes), default=0.0)
    base_info["he_rel_change_mean"] = sum(changes) / len(changes) if changes else 0.0
    return base_info


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
    if d.get("trained_biases"):
        lines.append(f"biases:     {d['trained_biases']} layers train their bias (it replaces the base's, PEFT's merge "
                     "as well)")
    if d["ignored_keys"]:
        lines.append(f"ignored:    {d['ignored_keys']} non-OFT keys in the file")
    for note in d.get("tool_notes", ()):
        lines.append(f"tools:      {note}")
    return "\n".join(lines)
