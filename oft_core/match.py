"""Matching an adapter's layers to the weights of a base model, with a report a user can read.

The same function serves the baker (base = a safetensors header) and the ComfyUI nodes (base = the loaded model's
state-dict keys): `names.build_key_map` maps names, then every matched layer is checked against its weight's shape
(`spec.resolve_for_weight`), so a file for another model fails here with the numbers, before anything is written or
patched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .errors import OFTError
from .names import KeyMap, Target, bias_key, build_key_map
from .spec import OFTAdapter, OFTLayer, resolve_for_weight


@dataclass(frozen=True)
class Match:
    layer: OFTLayer  # resolved for its weight (block_share counts filled in)
    target: Target


@dataclass
class MatchReport:
    adapter: str
    total: int
    matched: list[Match] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # "component:name"

    def summary(self) -> str:
        line = f"{len(self.matched)} of {self.total} adapter layers applied"
        if self.unmatched:
            shown = ", ".join(self.unmatched[:8]) + (" …" if len(self.unmatched) > 8 else "")
            line += f"; not found in the model: {len(self.unmatched)} ({shown})"
        return line


def _target_shape(target: Target, shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
    shape = list(shapes[target.key])
    if target.offset is not None:
        dim, start, length = target.offset
        if start + length > shape[dim]:
            raise OFTError(f"slice {target.offset} is outside weight {target.key} of shape {tuple(shape)}")
        shape[dim] = length
    return tuple(shape)


def _check_bias(layer, target: Target, shapes: Mapping[str, Sequence[int]], path: str, base_name: str) -> None:
    """A layer with a trained bias needs a base bias of that many rows beside its weight (the slice's rows of a
    fused one): without it the trained model cannot be made, so the layer is refused, never applied without it."""
    shape = shapes.get(bias_key(target.key))
    rows = None if shape is None or len(shape) != 1 else int(shape[0])
    if rows is not None and target.offset is not None:
        dim, start, length = target.offset
        rows = length if dim == 0 and start + length <= rows else None
    if rows != layer.bias.numel():
        found = "no bias" if shape is None else f"a bias of shape {tuple(shape)}"
        raise OFTError(f"the adapter trains a bias of {layer.bias.numel()} values for {target.key}, and "
                       f"{base_name} has {found} there{'' if target.offset is None else f' (slice {target.offset})'}",
                       path=path, layer=layer.key)


def match_adapter(
    adapter: OFTAdapter,
    shapes: Mapping[str, Sequence[int]],
    keymap: KeyMap | None = None,
    *,
    components: Sequence[str] | None = None,
    base_name: str = "the base model",
) -> MatchReport:
    """Match every layer of `adapter` (optionally only those of `components`) onto `shapes`' weights.

    Raises `OFTError` when a matched layer does not fit its weight, or two layers land on the same weight slice.
    """
    keymap = keymap or build_key_map(shapes)
    layers = [layer for layer in adapter if components is None or layer.component in components]
    report = MatchReport(adapter.path or adapter.format, len(layers))
    seen: dict[tuple, str] = {}
    for layer in layers:
        target = keymap.lookup(layer.name, layer.component)
        if target is None:
            ambiguous = layer.name.replace(".", "_") in keymap.ambiguous()
            report.unmatched.append(f"{layer.component}:{layer.key}" + (" (name fits several weights)" if ambiguous
                                                                        else ""))
            continue
        where = (target.key, target.offset)
        if where in seen:
            raise OFTError(f"two adapter layers ({seen[where]!r} and {layer.key!r}) map onto the same weight "
                           f"{target.key}{'' if target.offset is None else f' slice {target.offset}'}",
                           path=adapter.path)
        seen[where] = layer.key
        shape = _target_shape(target, shapes)
        resolved = resolve_for_weight(layer, shape, path=adapter.path, weight_name=f"{base_name}'s {target.key}")
        if resolved.bias is not None:
            _check_bias(resolved, target, shapes, adapter.path, base_name)
        report.matched.append(Match(resolved, target))
    return report
