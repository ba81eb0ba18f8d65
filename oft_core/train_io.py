"""An `OFTTrainer`'s work as an `OFTAdapter` and back: export (`_trained_adapter`) and resume (`_resume_trainer`).

Pure torch, never imports ComfyUI. `OFTTrainer.to_adapter` / `.load_adapter` call these; they read the trainer's
layers (`_TrainedLayer`: path, module, validated `OFTLayer`, live packed parameters) and its `alpha`, and change
nothing but the parameters (resume, after every layer is checked).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch

from .errors import OFTError, _mismatch
from .formats.kohya import _PREFIX as KOHYA_PREFIX
from .formats.kohya import _UNCONSTRAINED_METADATA, _fits
from .rotation import _cayley, _generator_of, _skew, rotation_blocks
from .spec import Constraint, OFTAdapter, OFTLayer, make_layer

if TYPE_CHECKING:  # (train imports this module)
    from .train import OFTTrainer, _TrainedLayer


# ------------------------------------------------------------------------------------------------ export
def _trained_adapter(trainer: OFTTrainer, metadata: dict | None = None,
                   names: Mapping[str, str | tuple[str, ...]] | None = None, *, prefix: str = KOHYA_PREFIX,
                   fmt: str | None = None) -> OFTAdapter:
    """`OFTTrainer.to_adapter` (its docstring says what the arguments mean)."""
    if names is not None:
        _check_export_names(trainer.layers, names)
    layers = {}
    worst = 0.0
    for tl in trainer.layers:
        name = tl.path if names is None else names[tl.path]
        layer, gens = tl.layer, trainer.stored_generators(tl)
        if layer.parameterization == "neumann":
            layer, gens, err = _as_cayley(layer, gens)
            worst = max(worst, err)
        parts = list(zip(name, ([g] for g in gens))) if isinstance(name, tuple) else [(name, gens)]
        for part_name, part_gens in parts:
            layers[("unet", part_name)] = make_layer(
                path="", name=part_name, side="out", blocks=part_gens, transpose=True,
                constraint=layer.constraint, source=layer.source, key=prefix + part_name.replace(".", "_"))
    flux = any(len(layer.blocks) > 1 for layer in layers.values())
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    info = {"alpha": [trainer.alpha], "trained": True}
    if trainer.neumann_terms:
        info["neumann_export_error"] = worst
    return OFTAdapter(layers, fmt or ("kohya_flux" if flux else "kohya"), "", meta, info)


def _check_export_names(layers: list[_TrainedLayer], names: Mapping[str, str | tuple[str, ...]]) -> None:
    """Every trained layer named, one name per split for a tuple, no two layers under one name."""
    missing = [tl.path for tl in layers if tl.path not in names]
    if missing:
        raise OFTError(f"no export name for {len(missing)} trained layers (first: {missing[0]!r})")
    exported = []
    for tl in layers:
        n = names[tl.path]
        if isinstance(n, tuple):
            if len(n) != len(tl.params):
                raise OFTError(f"{len(n)} export names for a layer with {len(tl.params)} splits", layer=tl.path)
            exported += list(n)
        else:
            exported.append(n)
    if len(set(exported)) != len(exported):
        raise OFTError("export names are not unique: two trained layers would get the same name")


def _as_cayley(layer: OFTLayer, gens: list[torch.Tensor]) -> tuple[OFTLayer, list[torch.Tensor], float]:
    """A Cayley–Neumann layer's trained blocks N as Cayley(Q') (Q' the skew part of N's inverse Cayley), the
    unconstrained Cayley layer they belong to, and the largest element error of that (the series' truncation)."""
    worst = 0.0
    with torch.no_grad():
        trained = [b.cpu() for b in rotation_blocks(layer, blocks=gens)]  # (Rᵀ per block)
        new = []
        for r in trained:
            q = _skew(_generator_of(r.transpose(-1, -2), layer=layer.key)) / 2  # R = Cayley(Q'), Q' skew part
            new.append(q)
            worst = max(worst, float((_cayley(q).transpose(-1, -2) - r).abs().max()))
    return layer.with_(parameterization="cayley", neumann_coeffs=(), constraint=Constraint()), new, worst


# ------------------------------------------------------------------------------------------------ resume
def _resume_trainer(trainer: OFTTrainer, adapter: OFTAdapter, names: Mapping[str, str] | None = None) -> None:
    """`OFTTrainer.load_adapter` (its docstring says what is checked): every layer is checked before any parameter
    is written."""
    path = adapter.path or None
    pairs = _resume_pairs(trainer, adapter, names, path)
    new = []
    encoded_none = adapter.metadata.get(_UNCONSTRAINED_METADATA) == "true"
    for tl, layer in pairs:
        _check_resumable(tl, layer, trainer.alpha, path, encoded_none)
        new.append([_packed(q) for q in layer.blocks])
    with torch.no_grad():
        for tl, vals in zip(trainer.layers, new):
            for p, v in zip(tl.params, vals):
                p.copy_(v.to(p.device))


def _key(name: str) -> str:
    """Files name layers with "_" (kohya keys), adapters made in memory with ".": compared as keys."""
    return name.replace(".", "_")


def _resume_pairs(trainer: OFTTrainer, adapter: OFTAdapter, names: Mapping[str, str] | None,
                  path: str | None) -> list[tuple[_TrainedLayer, OFTLayer]]:
    """(trained layer, the adapter's layer for it) for every trained layer; OFTError when the adapter has a layer
    this training does not adapt or lacks one it does."""
    theirs = {(c, _key(n)): layer for (c, n), layer in adapter.layers.items()}
    want = {tl.path: (names[tl.path] if names is not None and tl.path in names else tl.path)
            for tl in trainer.layers}
    wanted_keys = {_key(n) for n in want.values()}
    for (component, name), layer in theirs.items():
        if component != "unet" or name not in wanted_keys:
            what = f"{component} layer {layer.name!r}" if component != "unet" else f"layer {layer.name!r}"
            raise OFTError(f"resume: the adapter has {what}, which this training does not adapt (check the "
                           "target preset and the model)", path=path)
    for tl in trainer.layers:
        if ("unet", _key(want[tl.path])) not in theirs:
            raise OFTError(f"resume: the adapter has no layer {want[tl.path]!r}, which this training adapts "
                           f"({len(theirs)} layers in the adapter, {len(trainer.layers)} trained; check the target "
                           "preset)", path=path)
    return [(tl, theirs[("unet", _key(want[tl.path]))]) for tl in trainer.layers]


def _check_resumable(tl: _TrainedLayer, layer: OFTLayer, alpha: float, path: str | None,
                     encoded_none: bool = False) -> None:
    """The adapter's `layer` is what `tl` trains: kohya convention, Cayley, no rescale, the same splits, blocks
    and constraint (alpha compared in fp32, as kohya stores it). `encoded_none`: the file says its clamps encode "no
    constraint" (`kohya._UNCONSTRAINED_METADATA`, our kohya writer): for an unconstrained trainer (alpha 0) a layer
    whose clamp leaves its generators as they are is unconstrained (an alpha-0 run resumes its own kohya file)."""

    def fail(msg):
        raise OFTError("resume: " + msg, path=path, layer=layer.name)

    if layer.kind != "diag" or layer.side != "out" or not layer.transpose or layer.block_share:
        fail("not a kohya-convention OFT layer (rows rotated by Rᵀ per block); resume from a kohya or "
             "LyCORIS diag-oft file")
    if layer.parameterization != "cayley":
        fail(_mismatch("parameterization", "cayley", layer.parameterization))
    if layer.row_scale is not None and not bool((layer.row_scale == 1).all()):
        fail("has a per-row rescale, which this trainer does not train")
    mine = (tuple(int(p.shape[0]) for p in tl.params), tl.layer.block_sizes)
    found = (layer.num_blocks, layer.block_sizes)
    if len(found[0]) != len(mine[0]):
        fail(_mismatch("splits", len(mine[0]), len(found[0])))
    if found != mine:
        fail(_mismatch("blocks per split × block size", " ".join(f"{n}×{b}" for n, b in zip(*mine)),
                      " ".join(f"{n}×{b}" for n, b in zip(*found))))
    # kohya's encoding of "no constraint": a clamp that never bites on these generators (`kohya._fits`)
    unconstrained = encoded_none and layer.constraint.kind == "norm_clamp" and _fits(
        layer, list(layer.blocks), layer.constraint.value)
    if alpha == 0 and unconstrained:
        return
    theirs_alpha = layer.constraint.value if layer.constraint.kind == "norm_clamp" else 0.0
    if layer.constraint.kind not in ("none", "norm_clamp"):
        fail(_mismatch("constraint (alpha)", f"{alpha:g}", layer.constraint.describe()))
    if float(torch.tensor(theirs_alpha, dtype=torch.float32)) != alpha:
        theirs = "0 (it was trained without one, which kohya stores as an alpha that never clamps)" if \
            unconstrained else f"{theirs_alpha:g}"
        fail(_mismatch("constraint (alpha)", f"{alpha:g}", layer.constraint.describe())
             + f"; to continue it, train with constraint (alpha) {theirs}")


def _packed(q: torch.Tensor) -> torch.Tensor:
    """The strict upper triangle of each block of Q = U − Uᵀ, fp32: the trainer's parameter (exact)."""
    b = q.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1)
    return q.detach().to(torch.float32)[:, rows, cols]
