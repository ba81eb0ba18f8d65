"""Combining whole adapters: blend two, average several, compose several into one (layer implementations, what
`ops.py` means in this ecosystem (`comfy.ops`), are not here).

Strength of a single adapter (or per layer) is not an operation here: pass it to `rotate_weight` / `bake`.

Decisions (each pinned by tests/test_combine.py):

- Constraints are applied first. Every operation works on the generators the rotation actually uses (each file's
  own constraint applied), and its result has constraint "none": mixing two files' clamps would have no meaning.
- `blend(a, b, t)` interpolates generators, Q = lerp(Q_a, Q_b, t): the result is still a rotation for every t, and
  `torch.lerp` is exact at t = 0, t = 1 and when Q_a = Q_b, so blend(a, a, t) is a bit for bit.
- `merge(..., mode="average")`: Q = Σ wᵢ Qᵢ / Σ wᵢ (weights normalised first, so the average of one is itself).
- `merge(..., mode="compose")`: the rotations applied one after another, first listed first:
  side "out" M = M_k ⋯ M_1 (W' = M·W), side "in" M = M_1 ⋯ M_k (W' = W·M). Weight w means R^w in the orthogonal
  sense, R(w·Q) (`rotation_blocks(..., mode="orthogonal")`). The product is turned back into a generator by the
  inverse Cayley transform Q = (B − I)(B + I)⁻¹; a block with an eigenvalue −1 (a half turn) has none and is refused.
  Different block sizes compose into block-diagonal blocks of their least common multiple (the product of
  blockdiag_4 and blockdiag_6 is blockdiag_12, not block-diagonal at 4 or 6): both sizes divide the split width, so
  their lcm does too; at worst it is the whole width, one dense rotation. Layers in only one adapter pass through.
  Cayley–Neumann and stored-matrix layers are only approximately orthogonal: their products are refused.
- Layers are keyed by (component, name), names compared with "." read as "_" (kohya and PEFT spell paths
  differently); the first adapter's spelling is kept.
- PEFT block_share layers (one block repeated along a width only the base weight fixes) meeting an unshared layer
  are expanded to that layer's width first; composed with each other they stay shared (blocks of the lcm size).
- Provenance is typed: the result's `made_from` records the operation and, for each input, its own `made_from`
  or its file (`provenance`), a JSON-able tree that OFT Save writes into the file's metadata.
- Row scales (LyCORIS `rescale`): blended and averaged like generators; in a composition, output-side scales only
  survive when the scaled layer is the last one applied (diag(s)·M_b·diag(s_a)·M_a is not diag(s)·M otherwise);
  input-side (PEFT 0.14–0.15) scales multiply, since row scaling commutes with rotating columns.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from .choices import MERGE_MODES
from .errors import OFTError, check_strength
from .rotation import _constrain, _generator_of, rotation_blocks
from .spec import Constraint, OFTAdapter, OFTLayer, make_layer

_HALF_TURN_TOL = 1e-4  # max |Cayley(Q) − B| accepted from the inverse Cayley (fp32); larger means B + I is singular


def _key(component: str, name: str) -> tuple[str, str]:
    return component, name.replace(".", "_")


def _rebuild(layer: OFTLayer, **changes) -> OFTLayer:
    fields = dict(path="", name=layer.name, component=layer.component, side=layer.side, blocks=layer.blocks,
                  transpose=layer.transpose, kind=layer.kind, num_blocks=layer.num_blocks,
                  parameterization=layer.parameterization, neumann_coeffs=layer.neumann_coeffs,
                  constraint=Constraint(), row_scale=layer.row_scale, source=layer.source, key=layer.key,
                  block_share=layer.block_share, conv_transposed=layer.conv_transposed,
                  butterfly=layer.butterfly, bias=layer.bias)
    fields.update(changes)
    for i, g in enumerate(fields["blocks"]):
        if not bool(torch.isfinite(g).all()):  # the inputs were finite (checked when read): the arithmetic overflowed
            what = fields["source"] or "combined"
            raise OFTError(f"the {what} generators of split {i} overflow float32: the inputs' generators (largest "
                           f"|Q| {max(float(q.abs().max()) for q in layer.blocks):.3g} in the first) times the "
                           "weights are too large for this operation", layer=layer.key)
    return make_layer(**fields)


def _constrained(layer: OFTLayer, transpose: bool) -> list[torch.Tensor]:
    """Constrained generators expressed for `transpose` (Cayley(Q)ᵀ = Cayley(−Q), Neumann(Q)ᵀ = Neumann(−Q))."""
    gens = [_constrain(layer, q, i) for i, q in enumerate(layer.blocks)]
    return gens if layer.transpose == transpose else [-q for q in gens]


def _same_structure(a: OFTLayer, b: OFTLayer, what: str) -> None:
    checks = [
        ("rotated side", a.side, b.side),
        ("kind", a.kind, b.kind),
        ("block sizes", a.block_sizes, b.block_sizes),
        ("block counts", a.num_blocks, b.num_blocks),
        ("stored blocks", tuple(g.shape for g in a.blocks), tuple(g.shape for g in b.blocks)),
        ("parameterization", (a.parameterization, a.neumann_coeffs), (b.parameterization, b.neumann_coeffs)),
        ("block_share", a.block_share, b.block_share),
    ]
    for name, x, y in checks:
        if x != y:
            raise OFTError(f"cannot {what} layers of different structure: {name} {x} vs {y}", layer=a.key)
    if a.parameterization == "matrix":
        raise OFTError(f"cannot {what} stored rotation matrices (LyCORIS oft_diag): interpolating matrices is not a "
                       "rotation", layer=a.key)


def _keyed(adapter: OFTAdapter) -> dict[tuple[str, str], OFTLayer]:
    out = {}
    for layer in adapter:
        k = _key(layer.component, layer.name)
        if k in out:
            raise OFTError(f"two layers are both {k[0]}:{k[1]} once '.' is read as '_'", path=adapter.path or None)
        out[k] = layer
    return out


def _same_layers(adapters: Sequence[OFTAdapter], what: str) -> list[dict[tuple[str, str], OFTLayer]]:
    keyed = [_keyed(a) for a in adapters]
    first = set(keyed[0])
    for a, k in zip(adapters[1:], keyed[1:]):
        if set(k) != first:
            missing = sorted(first - set(k))[:3]
            extra = sorted(set(k) - first)[:3]
            raise OFTError(f"cannot {what}: the adapters have different layers (only in the first: {missing}, only "
                           f"in this one: {extra}); use merge(mode='compose') for different layer sets",
                           path=a.path or None)
    return keyed


_APPLY_IN_ORDER = ("apply the adapters one after another instead, which gives the same weights: chain OFT "
                   "loader nodes in ComfyUI, or `bake --adapter A --adapter B` on the command line")


def _settled(adapters: Sequence[OFTAdapter], what: str) -> None:
    """Refuse to combine layers whose convention only a model settles (OneTrainer's: a Linear's rotation, or its
    transpose for a convolution): composed, blended or averaged before that is known, a convolution would get the
    other order or sign; and layers that train their bias (applied in order, each replaces the base bias in turn)."""
    for a in adapters:
        for layer in a:
            if layer.conv_transposed:
                raise OFTError(f"cannot {what} a OneTrainer adapter: each of its layers rotates as a Linear, or "
                               f"transposed as a convolution, which only the model says; {_APPLY_IN_ORDER}",
                               path=a.path or None, layer=layer.key)
            if layer.bias is not None:  # a trained bias replaces the base's: no blend of it is either trainer's
                raise OFTError(f"cannot {what} a layer that trains its bias (PEFT bias 'oft_only' / 'boft_only'); "
                               f"{_APPLY_IN_ORDER}", path=a.path or None, layer=layer.key)


def _unshare(layer: OFTLayer, width: int, src: str | None = None) -> OFTLayer:
    """A PEFT block_share layer (one stored block repeated along the axis) written out over `width` as an ordinary
    layer of width/b equal blocks, its constraint applied first (COFT bounds the one stored block, as it is used)."""
    b = layer.block_sizes[0]
    if width % b:
        raise OFTError(f"a PEFT block_share layer (one {b}×{b} block repeated) meets a layer of width {width}, which "
                       f"is not a multiple of {b}: they were made for different models; otherwise "
                       + _APPLY_IN_ORDER, path=src, layer=layer.key)
    n = width // b
    gens = [_constrain(layer, q, i).expand(n, -1, -1).clone() for i, q in enumerate(layer.blocks)]
    return _rebuild(layer, blocks=gens, num_blocks=[n], block_share=False)


def _unshare_mixed(layers: Sequence[OFTLayer], sources: Sequence[str | None]) -> list[OFTLayer]:
    """Layers of one key where some are PEFT block_share and some are not: the shared ones expanded to the width
    of the first unshared one (the only width they can meet). Unchanged when all or none are shared."""
    plain = [layer for layer in layers if not layer.block_share]
    if not plain or len(plain) == len(layers):
        return list(layers)
    width = sum(plain[0].split_sizes)
    return [_unshare(layer, width, src) if layer.block_share else layer for layer, src in zip(layers, sources)]


def _weighted_layer(layers: Sequence[OFTLayer], weights: Sequence[float], what: str,
                    sources: Sequence[str | None] | None = None) -> OFTLayer:
    """Σ wᵢ Qᵢ (weights already normalised), in the first layer's transpose convention, constraint none."""
    layers = _unshare_mixed(layers, sources or [None] * len(layers))
    ref = layers[0]
    for other in layers[1:]:
        _same_structure(ref, other, what)
    gens = None
    scale = None
    any_scale = any(layer.row_scale is not None for layer in layers)
    for layer, w in zip(layers, weights):
        g = _constrained(layer, ref.transpose)
        gens = [w * q for q in g] if gens is None else [acc + w * q for acc, q in zip(gens, g)]
        if any_scale:
            s = layer.row_scale if layer.row_scale is not None else torch.ones(ref.dim)
            scale = w * s if scale is None else scale + w * s
    return _rebuild(ref, blocks=gens, row_scale=scale, source=what)


def provenance(adapter: OFTAdapter) -> dict:
    """What `adapter` was made from: the operation tree recorded in `made_from`, else its file (JSON-able)."""
    if adapter.made_from is not None:
        return adapter.made_from
    return {"file": os.path.basename(adapter.path) if adapter.path else None, "format": adapter.format}


def blend(a: OFTAdapter, b: OFTAdapter, t: float) -> OFTAdapter:
    """Interpolate two adapters of the same structure: Q = (1 − t)·Q_a + t·Q_b per layer (constraints applied first).

    t = 0 gives a's rotations, t = 1 b's; any t gives a rotation. The result has constraint none.
    """
    t = check_strength(t, "blend factor")  # the one check of user numbers (NaN, Inf, huge: Q = t·(Q_b − Q_a))
    _settled([a, b], "blend")
    ka, kb = _same_layers([a, b], "blend")
    layers = {}
    for k, la in ka.items():
        la, lb = _unshare_mixed([la, kb[k]], [a.path or None, b.path or None])
        _same_structure(la, lb, "blend")
        ga, gb = _constrained(la, la.transpose), _constrained(lb, la.transpose)
        # torch.lerp: exact at t = 0, 1 and for equal inputs, so blend(a, a, t) is a bit for bit
        gens = [_lerp(qa, qb, t) for qa, qb in zip(ga, gb)]
        scale = None
        if la.row_scale is not None or lb.row_scale is not None:
            sa = la.row_scale if la.row_scale is not None else torch.ones(la.dim)
            sb = lb.row_scale if lb.row_scale is not None else torch.ones(la.dim)
            scale = _lerp(sa, sb, t)
        layers[(la.component, la.name)] = _rebuild(la, blocks=gens, row_scale=scale, source="blend")
    made_from = {"blend": {"ratio": t, "a": provenance(a), "b": provenance(b)}}
    return OFTAdapter(layers, a.format, "", dict(a.metadata), made_from=made_from,
                      refused_formats=_refused([a, b]))


def _lerp(qa: torch.Tensor, qb: torch.Tensor, t: float) -> torch.Tensor:
    """torch.lerp(qa, qb, t); when its fp32 difference qb − qa overflows (inputs near float32's limit, e.g. Q and
    −Q) the same in float64, rounded once: a blend inside [0, 1] is then finite, as its value is."""
    out = torch.lerp(qa, qb, t)
    if bool(torch.isfinite(out).all()) or not (bool(torch.isfinite(qa).all()) and bool(torch.isfinite(qb).all())):
        return out
    return torch.lerp(qa.double(), qb.double(), t).to(qa.dtype)


def _normalised(weights: Sequence[float]) -> list[float]:
    """The weights divided by their sum, each (before and after) held to the one range of user numbers
    (`check_strength`): weights that nearly cancel (1 and −0.999999) would otherwise scale the generators by 10⁶."""
    weights = [check_strength(w, "average weight") for w in weights]
    total = math.fsum(weights)
    if total == 0:
        raise OFTError(f"average weights: expected finite numbers with a non-zero sum, found {list(weights)}")
    return [check_strength(w / total, f"average weight {w:g} / the weights' sum {total:g}") for w in weights]


def merge(adapters_with_weights: Sequence[tuple[OFTAdapter, float]], mode: str = "compose") -> OFTAdapter:
    """One adapter from several: `mode` "average" (weighted mean of generators, same layers required) or
    "compose" (the rotations applied in order, weight w = R^w in the orthogonal sense). See the module docstring."""
    items = [(a, float(w)) for a, w in adapters_with_weights]
    if not items:
        raise OFTError("merge: no adapters given")
    if mode not in MERGE_MODES:
        raise OFTError(f"merge mode: expected one of {', '.join(MERGE_MODES)}, found {mode!r}")
    _settled([a for a, _ in items], "merge")
    made_from = {"merge": {"mode": mode, "adapters": [{"weight": w, "adapter": provenance(a)} for a, w in items]}}
    layers = _averaged_layers(items) if mode == "average" else _composed_layers(items)
    return OFTAdapter(layers, items[0][0].format, "", dict(items[0][0].metadata), made_from=made_from,
                      refused_formats=_refused([a for a, _ in items]))


def _refused(adapters: Sequence[OFTAdapter]) -> dict[str, str]:
    """The formats a combination must refuse: every format any input refuses (its layers are in the result), with
    the first input's reason."""
    refused: dict[str, str] = {}
    for a in adapters:
        for fmt, why in a.refused_formats.items():
            refused.setdefault(fmt, why)
    return refused


def _averaged_layers(items: list[tuple[OFTAdapter, float]]) -> dict[tuple[str, str], OFTLayer]:
    """Every layer as the weighted mean of its generators over the adapters (weights normalised; same layers)."""
    adapters = [a for a, _ in items]
    weights = _normalised([w for _, w in items])
    keyed = _same_layers(adapters, "average")
    layers = {}
    for k, first in keyed[0].items():
        layer = _weighted_layer([kd[k] for kd in keyed], weights, "average", [a.path or None for a in adapters])
        layers[(first.component, first.name)] = layer
    return layers


def _composed_layers(items: list[tuple[OFTAdapter, float]]) -> dict[tuple[str, str], OFTLayer]:
    """Every layer of any adapter, its rotations composed in the adapters' order (one adapter's only: as it is)."""
    for a, w in items:
        check_strength(w, "compose weight", path=a.path or None)
    order: list[tuple[str, str]] = []
    groups: dict[tuple[str, str], list[tuple[OFTLayer, float, str]]] = {}
    for a, w in items:
        for k, layer in _keyed(a).items():
            if k not in groups:
                order.append(k)
            groups.setdefault(k, []).append((layer, w, a.path or a.format))
    layers = {}
    for k in order:
        layer = _compose_layer(groups[k])
        if layer is not None:
            layers[(layer.component, layer.name)] = layer
    return layers


def _is_identity(layer: OFTLayer, w: float) -> bool:
    if w == 0:
        return True  # R^0 = I, and strength 0 means "adapter off" (its rescale too)
    if layer.row_scale is not None or layer.parameterization == "matrix":
        return False
    return all(not bool(torch.any(_constrain(layer, q, i) != 0)) for i, q in enumerate(layer.blocks))


def _scaled(layer: OFTLayer, w: float, src: str | None = None) -> OFTLayer:
    """The layer at weight w, orthogonal sense: R(w·Q) with the constraint applied first (w = 1: unchanged)."""
    if w == 1:
        return layer
    if layer.parameterization == "matrix":
        return _rebuild(layer, blocks=[w * _rotation_generator(layer, r, src) for r in layer.blocks],
                        parameterization="cayley")
    return _rebuild(layer, blocks=[w * q for q in _constrained(layer, layer.transpose)])


def _rotation_generator(layer: OFTLayer, r: torch.Tensor, src: str | None) -> torch.Tensor:
    """The skew Q with Cayley(Q) = R for a stored matrix R that is a rotation; refused when it is not one (LyCORIS
    2.0 trained R as a free matrix: the skew part of its inverse Cayley would silently give another rotation, e.g.
    the identity for R = 3I) or has no generator (a half turn)."""
    try:
        q = _generator_of(r, layer=layer.key)
    except OFTError as e:
        raise OFTError(e.detail, path=src, layer=layer.key) from None
    q = 0.5 * (q - q.transpose(-1, -2))
    back = rotation_blocks(make_layer(path="", name=layer.name, side=layer.side, blocks=[q], transpose=False))[0]
    err = float((back - r).abs().max())
    if not err <= _HALF_TURN_TOL:
        raise OFTError(f"the stored matrix (LyCORIS oft_diag) is not a rotation (max |Cayley(Q) − R| {err:.2g} for "
                       "the nearest generator Q): R to a power other than 1 has no exact Cayley generator",
                       path=src, layer=layer.key)
    return q


def _scale_layer(layer: OFTLayer, w: float) -> OFTLayer:
    """The layer at weight w in the orthogonal sense, as `merge(..., "compose")` of it alone gives: R(w·Q), the
    constraint applied first; an identity layer (or w = 0) becomes all-zero Cayley generators."""
    return _compose_layer([(layer, check_strength(w, "layer weight"), "")])


def _lcm_blocks(r: torch.Tensor, size: int) -> torch.Tensor:
    """(n, b, b) blocks regrouped as (n·b/size, size, size) block-diagonal blocks (size a multiple of b)."""
    n, b, _ = r.shape
    per = size // b
    out = torch.zeros(n // per, size, size, dtype=r.dtype)
    for j in range(per):
        out[:, j * b:(j + 1) * b, j * b:(j + 1) * b] = r[j::per]
    return out


def _compose_layer(entries: list[tuple[OFTLayer, float, str]]) -> OFTLayer | None:
    """The layers of one (component, name) across the adapters, composed in order into one Cayley layer."""
    active = [(layer, w, src) for layer, w, src in entries if not _is_identity(layer, w)]
    if not active:
        first = entries[0][0]
        return _rebuild(first, blocks=[torch.zeros_like(q) for q in first.blocks], row_scale=None,
                        parameterization="cayley", neumann_coeffs=(), source="compose")
    if len(active) == 1:
        layer, w, src = active[0]
        return _scaled(layer, w, src or None)
    keep_shared = all(layer.block_share for layer, _, _ in active)
    active = _unshared(active)
    ref = active[0][0]
    _check_composable(active, ref)
    scale = _composed_row_scale(active, ref)
    gens = [_composed_generator(active, ref, split, width) for split, width in enumerate(ref.split_sizes)]
    return _rebuild(ref, blocks=gens, num_blocks=[w // q.shape[-1] for w, q in zip(ref.split_sizes, gens)],
                    parameterization="cayley", neumann_coeffs=(), row_scale=scale, source="compose",
                    block_share=keep_shared)


def _unshared(active: list[tuple[OFTLayer, float, str]]) -> list[tuple[OFTLayer, float, str]]:
    """PEFT block_share: one block repeated along a width only the base weight fixes. Met with an unshared layer, that
    layer's width is the one; all shared, the product repeats blocks of the lcm of their sizes (exact for every
    width they fit: a width divisible by each block size is divisible by their lcm), so the result stays shared."""
    if not any(layer.block_share for layer, _, _ in active):
        return active
    plain = [layer for layer, _, _ in active if not layer.block_share]
    width = sum(plain[0].split_sizes) if plain else math.lcm(*(layer.block_sizes[0] for layer, _, _ in active))
    return [(_unshare(layer, width, src) if layer.block_share else layer, w, src) for layer, w, src in active]


def _check_composable(active: list[tuple[OFTLayer, float, str]], ref: OFTLayer) -> None:
    """Refuse what has no exact composition: mixed sides, butterfly or non-Cayley layers, different split widths."""
    for layer, _, src in active:
        if layer.side != ref.side:
            raise OFTError("one adapter rotates this layer's input features and another its output features: "
                           "W ↦ M_b·W·M_a is not an OFT layer", path=src, layer=layer.key)
        if layer.kind != "diag":
            raise OFTError("BOFT (butterfly) layers cannot be composed into one OFT layer", path=src, layer=layer.key)
        if layer.parameterization != "cayley":
            raise OFTError(f"{layer.parameterization} layers are not exactly orthogonal: their product has no exact "
                           "Cayley generator", path=src, layer=layer.key)
        if layer.split_sizes != ref.split_sizes:
            raise OFTError(f"split sizes differ ({ref.split_sizes} vs {layer.split_sizes}): the layers rotate "
                           "different widths", path=src, layer=layer.key)


def _composed_row_scale(active: list[tuple[OFTLayer, float, str]], ref: OFTLayer):
    """The composition's row scale (see the module docstring): input side, the product of all; output side, only a
    scale on the last layer applied."""
    if ref.side == "in":
        scale = None
        for layer, _, _ in active:
            if layer.row_scale is not None:
                scale = layer.row_scale if scale is None else scale * layer.row_scale
        return scale
    for i, (layer, _, src) in enumerate(active):
        if layer.row_scale is not None and i != len(active) - 1:
            raise OFTError("a rescaled layer followed by another rotation: diag(s)·M_b ≠ M_b·diag(s), the "
                           "product is not an OFT layer", path=src, layer=layer.key)
    return active[-1][0].row_scale


def _composed_generator(active: list[tuple[OFTLayer, float, str]], ref: OFTLayer, split: int, width: int):
    """Q of split `split`: the product of every layer's blocks (at the lcm block size), back through inverse Cayley,
    refused near a half turn."""
    sizes = [layer.block_sizes[split] for layer, _, _ in active]
    size = math.lcm(*sizes)
    if width % size:
        raise OFTError(f"block sizes {sorted(set(sizes))} compose into blocks of {size}, which do not tile the "
                       f"split of width {width}: the product is not a block-diagonal OFT layer",
                       path=active[0][2], layer=ref.key)
    total = None
    for layer, w, _ in active:
        blocks = rotation_blocks(layer, w, "orthogonal")[split]
        blocks = _lcm_blocks(blocks, size) if blocks.shape[-1] != size else blocks
        if total is None:
            total = blocks
        elif ref.side == "out":
            total = blocks @ total  # applied later = multiplied on the left
        else:
            total = total @ blocks
    target = total.transpose(-1, -2) if ref.transpose else total
    try:
        q = _generator_of(target)  # Q = (B − I)(B + I)⁻¹
    except OFTError:  # B + I singular
        raise OFTError("the composed rotation turns some block by half a turn (eigenvalue −1): it has no Cayley "
                       "generator", layer=ref.key) from None
    q = 0.5 * (q - q.transpose(-1, -2))  # exactly skew (it is skew up to rounding)
    back = rotation_blocks(make_layer(path="", name=ref.name, side=ref.side, blocks=[q], transpose=False), 1.0)[0]
    err = float((back - target).abs().max())
    if not err <= _HALF_TURN_TOL:
        raise OFTError(f"the composed rotation is too close to a half turn for the inverse Cayley transform "
                       f"(round-trip error {err:.2g})", layer=ref.key)
    return q
