"""Per-block strength: a short text that sets a multiplier for groups of layers, like LoRA block-weight presets.

Grammar (spaces are ignored, case does not matter)::

    spec     := [ item { "," item } ]
    item     := selector "=" number
    selector := "default" | group | group ":" N | group ":" N "-" M
    group    := input | middle | output | double | single | te | te1 | te2 | unet

A layer's multiplier is the value of the LAST item whose selector covers it; `default` (1 unless given) covers every
layer that no other item covers. The effective strength of a layer is strength × multiplier
(`_effective_strengths`), so 0 switches a layer off (its weight stays bit for bit) and 1 leaves it as the file says.

Examples::

    "input=0.5, output:3-5=0"                     SD: input blocks at half strength, output blocks 3, 4, 5 off
    "default=0, middle=1"                         only the middle block
    "double:0-9=0.8, single=0"                    FLUX: double blocks 0–9 at 0.8, single blocks off
    "unet=1, te=0"                                UNet only, no text encoder
    "default=1, input=0.5, middle=1, output:3-5=0, double:0-9=0.8, single=0"

Groups and how layer names map to block indices (dotted or underscored names, as any reader gives them):

| group    | LDM names (SD1/2/SDXL kohya SDXL)  | diffusers names (kohya SD1/2, LyCORIS, PEFT), L = 2 layers per block |
|---|---|---|
| input N | `input_blocks.N` | `conv_in` → 0; `down_blocks.x.{resnets,attentions}.j` → 3x + j + 1; |
| | | `down_blocks.x.downsamplers.0` → 3x + 3 |
| middle | `middle_block` | `mid_block` |
| output N | `output_blocks.N` | `up_blocks.x.{resnets,attentions}.i` → 3x + i; `up_blocks.x.upsamplers.0` → 3x + 2 |
| double N | BFL `double_blocks.N` | `transformer_blocks.N` (at the start of the name) |
| single N | BFL `single_blocks.N` | `single_transformer_blocks.N` |
| te, te1, te2 | text-encoder layers (`te` covers all three components)                                     |
| unet     | every layer of the UNet / transformer (also those in no numbered block, e.g. `time_embed`)   |

SD1/2 and SDXL all use 2 layers per down level (3 blocks per level in LDM numbering), which is what the diffusers
mapping assumes; it matches names.py's diffusers → LDM table for those models. These are the indices of
sd-webui-lora-block-weight's IN/M/OUT labels (IN00–IN11, M00, OUT00–OUT11); its positional 17/26-number lists are
not accepted: every value here names its block.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from .combine import _scale_layer, provenance
from .errors import OFTError, check_strength
from .spec import OFTAdapter

_GROUPS = ("input", "middle", "output", "double", "single", "te", "te1", "te2", "unet")
_INDEXED = ("input", "output", "double", "single")
_MAX_INDEX_DIGITS = 6  # no model has a million blocks; int() of thousands of digits fails (or takes seconds)
_ITEM = re.compile(r"^(?P<group>[a-z0-9_]+)(?::(?P<lo>\d+)(?:-(?P<hi>\d+))?)?=(?P<value>.+)$")
_SEP = r"[._]"
_PATTERNS = (
    (re.compile(rf"^input_blocks{_SEP}(\d+)(?:{_SEP}|$)"), "input", lambda m: int(m.group(1))),
    (re.compile(rf"^middle_block(?:{_SEP}|$)"), "middle", lambda m: None),
    (re.compile(rf"^output_blocks{_SEP}(\d+)(?:{_SEP}|$)"), "output", lambda m: int(m.group(1))),
    (re.compile(rf"^conv_in(?:{_SEP}|$)"), "input", lambda m: 0),
    (re.compile(rf"^down_blocks{_SEP}(\d+){_SEP}(resnets|attentions){_SEP}(\d+)(?:{_SEP}|$)"), "input",
     lambda m: 3 * int(m.group(1)) + int(m.group(3)) + 1),
    (re.compile(rf"^down_blocks{_SEP}(\d+){_SEP}downsamplers(?:{_SEP}|$)"), "input", lambda m: 3 * int(m.group(1)) + 3),
    (re.compile(rf"^mid_block(?:{_SEP}|$)"), "middle", lambda m: None),
    (re.compile(rf"^up_blocks{_SEP}(\d+){_SEP}(resnets|attentions){_SEP}(\d+)(?:{_SEP}|$)"), "output",
     lambda m: 3 * int(m.group(1)) + int(m.group(3))),
    (re.compile(rf"^up_blocks{_SEP}(\d+){_SEP}upsamplers(?:{_SEP}|$)"), "output", lambda m: 3 * int(m.group(1)) + 2),
    (re.compile(rf"^double_blocks{_SEP}(\d+)(?:{_SEP}|$)"), "double", lambda m: int(m.group(1))),
    (re.compile(rf"^single_blocks{_SEP}(\d+)(?:{_SEP}|$)"), "single", lambda m: int(m.group(1))),
    (re.compile(rf"^single_transformer_blocks{_SEP}(\d+)(?:{_SEP}|$)"), "single", lambda m: int(m.group(1))),
    (re.compile(rf"^transformer_blocks{_SEP}(\d+)(?:{_SEP}|$)"), "double", lambda m: int(m.group(1))),
)


@dataclass(frozen=True)
class _Rule:
    group: str
    lo: int | None  # None: the whole group
    hi: int | None
    value: float

    def covers(self, component: str, block: tuple[str, int | None] | None) -> bool:
        if self.group == "unet":
            return component == "unet"
        if self.group == "te":
            return component in ("te", "te1", "te2")
        if self.group in ("te1", "te2"):
            return component == self.group
        if component != "unet" or block is None or block[0] != self.group:
            return False
        return self.lo is None or (block[1] is not None and self.lo <= block[1] <= self.hi)


@dataclass(frozen=True)
class _BlockSpec:
    default: float = 1.0
    rules: tuple[_Rule, ...] = ()
    text: str = ""

    def multiplier(self, component: str, name: str) -> float:
        block = layer_block(component, name)
        value = self.default
        for rule in self.rules:
            if rule.covers(component, block):
                value = rule.value
        return value


def layer_block(component: str, name: str) -> tuple[str, int | None] | None:
    """(group, index) of a layer: ("input", 4), ("middle", None), ("double", 3), ("te", None); None if in no block."""
    if component != "unet":
        return (component, None)
    for pattern, group, index in _PATTERNS:
        m = pattern.match(name)
        if m:
            return group, index(m)
    return None


def parse_block_spec(text: str) -> _BlockSpec:
    """Parse the per-block strength text (grammar in the module docstring); `OFTError` names the bad item."""
    if not isinstance(text, str):
        raise OFTError(f"block strength spec: expected text, found {type(text).__name__}")
    default = 1.0
    rules = []
    body = "".join(text.split()).lower()
    if not body:
        return _BlockSpec(text=text)
    for token in body.split(","):
        if not token:
            raise OFTError(f"block strength spec {text!r}: empty item (two commas in a row, or a trailing comma)")
        group, lo, hi, value = _parse_item(token)
        if group == "default":
            default = value
        else:
            rules.append(_Rule(group, lo, hi, value))
    return _BlockSpec(default, tuple(rules), text)


def _parse_item(token: str) -> tuple[str, int | None, int | None, float]:
    """(group, first block, last block, multiplier) of one item ("default" for the default); `OFTError` naming it."""
    m = _ITEM.match(token)
    if not m:
        raise OFTError(f"block strength spec: cannot read item {token!r}: expected GROUP=NUMBER, "
                       "GROUP:N=NUMBER or GROUP:N-M=NUMBER")
    group, lo, hi = m.group("group"), m.group("lo"), m.group("hi")
    shown = token if len(token) <= 60 else token[:40] + f"… ({len(token)} characters)"
    for index in (lo, hi):
        if index is not None and len(index) > _MAX_INDEX_DIGITS:
            raise OFTError(f"block strength spec: item {shown!r}: block index of {len(index)} digits, expected a "
                           f"block number (at most {_MAX_INDEX_DIGITS} digits)")
    value = check_strength(m.group("value"), f"block strength spec: item {shown!r}: multiplier") \
        if len(m.group("value")) <= 64 else math.nan
    if not math.isfinite(value):
        raise OFTError(f"block strength spec: item {shown!r}: multiplier: expected a finite number, found "
                       f"{len(m.group('value'))} characters")
    if group == "default":
        if lo is not None:
            raise OFTError(f"block strength spec: item {token!r}: 'default' takes no block index")
        return group, None, None, value
    if group not in _GROUPS:
        raise OFTError(f"block strength spec: item {token!r}: unknown group {group!r}; expected default or one "
                       f"of {', '.join(_GROUPS)}")
    if lo is not None and group not in _INDEXED:
        raise OFTError(f"block strength spec: item {token!r}: {group!r} has no numbered blocks (numbered: "
                       f"{', '.join(_INDEXED)})")
    lo_i = None if lo is None else int(lo)
    hi_i = lo_i if hi is None else int(hi)
    if lo_i is not None and hi_i < lo_i:
        raise OFTError(f"block strength spec: item {token!r}: range {lo_i}-{hi_i} runs backwards")
    return group, lo_i, hi_i, value


def _spec(spec: _BlockSpec | str) -> _BlockSpec:
    return parse_block_spec(spec) if isinstance(spec, str) else spec


def _layer_strengths(adapter: OFTAdapter, spec: _BlockSpec | str) -> dict[tuple[str, str], float]:
    """The multiplier of every layer of `adapter`, keyed like `adapter.layers`."""
    spec = _spec(spec)
    return {k: spec.multiplier(layer.component, layer.name) for k, layer in adapter.layers.items()}


def _effective_strengths(adapter: OFTAdapter, spec: _BlockSpec | str, strength: float = 1.0) -> dict[tuple[str, str],
                                                                                                   float]:
    """strength × multiplier per layer: what to pass as each layer's strength to `rotate_weight` (or the patch)."""
    strength = check_strength(strength, path=adapter.path or None)
    out = {}
    for k, m in _layer_strengths(adapter, spec).items():
        out[k] = check_strength(strength * m, f"strength {strength:g} × block multiplier {m:g} of layer {k[1]!r}",
                                path=adapter.path or None)
    return out


def _apply_block_strength(adapter: OFTAdapter, spec: _BlockSpec | str, strength: float = 1.0
                         ) -> tuple[OFTAdapter, dict[tuple[str, str], float]]:
    """(the adapter without its layers at effective strength 0, the effective strength of each remaining layer).

    Dropping the zero layers guarantees that their weights stay bit for bit even where a consumer ignores the map.
    """
    strengths = _effective_strengths(adapter, spec, strength)
    kept = {k: layer for k, layer in adapter.layers.items() if strengths[k] != 0}
    out = _derived(adapter, layers=kept, block_spec=_spec(spec).text)
    return out, {k: strengths[k] for k in kept}


# ------------------------------------------------------------------------------------------------ carried strengths
# An adapter carries per-layer multipliers in its typed fields (`OFTAdapter.layer_strengths`, `block_spec`,
# `layers_off`): the layers at 0 are dropped, the others keep their file values and the multiplier is applied with the
# strength wherever the adapter goes (patch, bypass, hooks, extraction), or written into the layers by `scale_layers`.
_SCALE_MODES = ("kohya", "orthogonal")


def _derived(adapter: OFTAdapter, **changes) -> OFTAdapter:
    """A new adapter with `changes` (adapters are shared, e.g. by a file cache: never modify one in place)."""
    fields = {"layers": dict(adapter.layers), "metadata": dict(adapter.metadata), "info": dict(adapter.info),
              "layer_strengths": dict(adapter.layer_strengths)}
    fields.update(changes)
    return replace(adapter, **fields)


def layer_multiplier(adapter: OFTAdapter, layer) -> float:
    """The per-layer strength multiplier `adapter` carries for `layer` (1 when none)."""
    return float(adapter.layer_strengths.get((layer.component, layer.name), 1.0))


def _has_layer_strengths(adapter: OFTAdapter) -> bool:
    """True when a block spec switched some layer off or carries a multiplier other than 1."""
    return bool(adapter.layers_off) or any(v != 1 for v in adapter.layer_strengths.values())


def refuse_layer_strengths(adapter: OFTAdapter, what: str) -> None:
    """Operations on generators (blend, merge) would silently drop carried strengths: refuse instead."""
    if _has_layer_strengths(adapter):
        raise OFTError(f"cannot {what} an adapter that carries per-block strengths ({adapter.block_spec!r}): {what} "
                       "first, then connect OFT Block Strength", path=adapter.path or None)


def with_block_strength(adapter: OFTAdapter, spec: _BlockSpec | str) -> OFTAdapter:
    """`adapter` without the layers `spec` switches off, carrying the multipliers of the others (multiplied into any
    it already carries); `block_spec` records the spec(s) ("A then B"), `made_from` the step."""
    parsed = _spec(spec)
    kept, strengths = _apply_block_strength(adapter, parsed, 1.0)
    strengths = {k: float(adapter.layer_strengths.get(k, 1.0)) * v for k, v in strengths.items()}
    text = parsed.text if adapter.block_spec is None else f"{adapter.block_spec} then {parsed.text}"
    return _derived(kept, layer_strengths=strengths, block_spec=text,
                    layers_off=adapter.layers_off + len(adapter) - len(kept),
                    made_from={"block_strength": parsed.text, "of": provenance(adapter)})


_FRACTIONAL_HINT = ("Scale in orthogonal mode to store R(m·Q) (exact for strength_mode orthogonal), use only 0 and 1, "
                    "or bake the model instead")


def scale_layers(adapter: OFTAdapter, mode: str = "kohya", *, hint: str = _FRACTIONAL_HINT) -> OFTAdapter:
    """The adapter with its carried per-layer multipliers written into its layers, as a file needs (a file has no
    per-layer strength). Returns `adapter` itself when every multiplier is 1 (0s were already dropped).

    mode "kohya": kohya strength I + s(R − I) is not a rotation, so a multiplier other than 0 or 1 is refused (with
    `hint` saying what to do). mode "orthogonal": every layer becomes its composition at weight m, R(m·Q) with the
    constraint applied first (`combine._scale_layer`), exact for strength_mode orthogonal.
    """
    if mode not in _SCALE_MODES:
        raise OFTError(f"block strength mode: expected {' or '.join(_SCALE_MODES)}, found {mode!r}",
                       path=adapter.path or None)
    partial = {k: float(v) for k, v in adapter.layer_strengths.items() if v != 1 and k in adapter.layers}
    if not partial:
        return adapter
    if mode != "orthogonal":
        shown = ", ".join(f"{k[1]}={v:g}" for k, v in list(partial.items())[:4])
        raise OFTError(
            f"{len(partial)} layers have a block-strength multiplier other than 0 or 1 ({shown}"
            f"{' …' if len(partial) > 4 else ''}); an OFT file has no per-layer strength, and kohya strength "
            f"I + s(R − I) is not a rotation, so no file holds it exactly. {hint}", path=adapter.path or None)
    layers = {k: _scale_layer(layer, partial.get(k, 1.0)) for k, layer in adapter.layers.items()}
    return _derived(adapter, layers=layers, layer_strengths={})
