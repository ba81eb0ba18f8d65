"""OFT → LoRA extraction: ΔW = R_s·W − W per adapted weight, truncated SVD, written as a kohya-style LoRA.

For each base weight the adapter touches, W' is what the merge path gives (`rotate_weight`, every layer on the weight
in order, fused slices included) and ΔW = W' − W (fp32, conv kernels flattened to (out, in·kh·kw)). Its best rank-r
approximation in Frobenius norm is the truncated SVD (Eckart–Young): ΔW ≈ U_r S_r V_rᵀ, with relative error
‖ΔW − U_r S_r V_rᵀ‖_F / ‖ΔW‖_F = √(Σ_{i>r} s_i²) / √(Σ s_i²). The rank is fixed (`rank`) or the smallest meeting
a relative-error target (`rel_error`, which needs the whole spectrum: exact SVD). With a fixed rank, wide layers
(min side ≥ 1024, r ≤ min side / 8) use randomized SVD (`torch.svd_lowrank`, q = 4r + 16, 8 power iterations,
seeded), which reaches the optimum to ~1e-5 relative on OFT deltas (tests/test_extract.py pins ≤ 1e-4); the error
reported is always measured on the factors actually written, never estimated.

Written as kohya sd-scripts `networks.lora` / `lora_flux` keys: `lora_unet_<layer>` (`lora_te_`, `lora_te1_`,
`lora_te2_` for text encoders) with `.lora_up.weight` (out, r[, 1, 1]), `.lora_down.weight` (r, in[, kh, kw]) and
`.alpha` = r (so the LoRA scale alpha/r is 1 and ΔW_r = up·down). Layer names are the adapter's own (kohya and
LyCORIS files already use sd-scripts' names; PEFT's dotted diffusers paths are underscored); several adapter layers on
slices of one fused weight (FLUX q/k/v by diffusers names) become one LoRA on the fused weight, named by its BFL path.
Both ComfyUI's LoraLoader and sd-scripts map these names. S is split evenly (up = U√S, down = √S·Vᵀ).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from .errors import OFTError, check_strength
from .match import Match, match_adapter
from .names import build_key_map
from .rotation import STRENGTH_MODES, rotate_weight
from .spec import OFTAdapter

_TE_PREFIX = {"te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}
# base-key prefixes stripped when a LoRA is named after its base key (fused slices): checkpoint, ComfyUI runtime
_KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")
_RANDOMIZED_MIN_SIDE = 1024
_RANDOMIZED_MAX_FRACTION = 8
# OFT deltas have flat spectra (R − I is full rank), where randomized SVD converges slowly: measured on a 1536×1024
# delta at r = 32, the error over the optimum was 1.4e-3 with q = r + 16 and 6 iterations, 7.7e-6 with q = 4r + 16, 8.
_OVERSAMPLE_FACTOR = 4
_OVERSAMPLE = 16
_POWER_ITERATIONS = 8


@dataclass
class _LayerExtract:
    name: str  # the LoRA module name (lora_unet_…)
    base_key: str
    shape: tuple[int, ...]
    rank: int
    rel_error: float  # ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F, measured on the written factors
    rel_change: float  # ‖ΔW‖_F / ‖W‖_F: how much the adapter changes this weight
    method: str  # "svd" | "randomized" | "zero" (ΔW = 0: nothing written)


@dataclass
class ExtractResult:
    out: str | None
    layers: list[_LayerExtract] = field(default_factory=list)
    seconds: float = 0.0

    def text(self) -> str:
        written = [x for x in self.layers if x.method != "zero"]
        lines = [f"{len(written)} LoRA layers from {len(self.layers)} adapted weights"
                 + (f", written to {self.out}" if self.out else "")
                 + f" ({self.seconds:.1f}s); relative Frobenius error of ΔW per layer:"]
        if written:
            errs = [x.rel_error for x in written]
            lines[0] += f" max {max(errs):.3g}, median {sorted(errs)[len(errs) // 2]:.3g}"
        for x in self.layers:
            what = "ΔW = 0, skipped" if x.method == "zero" else (
                f"rank {x.rank}, error {x.rel_error:.3g} ({x.method}), ‖ΔW‖/‖W‖ {x.rel_change:.3g}")
            lines.append(f"  {x.name}: {what}")
        return "\n".join(lines)


def _lora_name(component: str, path: str) -> str:
    return _TE_PREFIX.get(component, "lora_unet_") + path.replace(".", "_")


def low_rank(dw: torch.Tensor, rank: int | None = None, rel_error: float | None = None, *,
             randomized: bool | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """(up, down, relative error, method) with up·down the best rank-r approximation of the 2-D fp32 `dw`.

    Exactly one of `rank` (clamped to min(dw.shape)) and `rel_error` (smallest rank whose error ≤ it). `randomized`
    None: randomized SVD for wide layers at a fixed rank (see the module docstring), else as given.
    """
    if (rank is None) == (rel_error is None):
        raise OFTError("give exactly one of rank and rel_error")
    m, n = dw.shape
    total = float(torch.linalg.matrix_norm(dw.double()))
    if total == 0:
        return dw.new_zeros(m, 0), dw.new_zeros(0, n), 0.0, "zero"
    r, randomized = _rank_and_method(rank, rel_error, randomized, min(m, n))
    if randomized:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(dw, q=min(_OVERSAMPLE_FACTOR * r + _OVERSAMPLE, min(m, n)),
                                        niter=_POWER_ITERATIONS)
        method = "randomized"
    else:
        u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
        v = vh.transpose(0, 1)
        method = "svd"
        if rank is None:
            r = _rank_for_error(s, total, rel_error)
    root = torch.sqrt(s[:r])
    up = (u[:, :r] * root).to(torch.float32)
    down = (root[:, None] * v[:, :r].transpose(0, 1)).to(torch.float32)
    err = float(torch.linalg.matrix_norm((dw.double() - up.double() @ down.double()))) / total
    return up, down, err, method


def _rank_and_method(rank: int | None, rel_error: float | None, randomized: bool | None,
                     full: int) -> tuple[int | None, bool]:
    """(rank, randomized) checked: a fixed rank clamped to `full` (randomized by default for wide layers at a small
    rank), or None when the rank follows from `rel_error` (always an exact SVD)."""
    if rank is not None:
        if rank < 1:
            raise OFTError(f"rank: expected an integer ≥ 1, found {rank}")
        r = min(int(rank), full)
        if randomized is None:
            randomized = full >= _RANDOMIZED_MIN_SIDE and r * _RANDOMIZED_MAX_FRACTION <= full
        return r, randomized
    if not (math.isfinite(rel_error) and 0 <= rel_error < 1):
        raise OFTError(f"relative error target: expected a number in [0, 1), found {rel_error}")
    return None, False


def _rank_for_error(s: torch.Tensor, total: float, rel_error: float) -> int:
    """The smallest rank (≥ 1) whose dropped singular values `s` leave a relative error ≤ `rel_error`."""
    tail = torch.sqrt(torch.flip(torch.cumsum(torch.flip(s * s, [0]), 0), [0]))  # tail[i] = √Σ_{j≥i} s_j²
    ok = (tail / total <= rel_error).nonzero()
    return max(int(ok[0]) if len(ok) else len(s), 1)


def _group_by_key(matches: Iterable[Match]) -> dict[str, list[Match]]:
    groups: dict[str, list[Match]] = {}
    for m in matches:
        groups.setdefault(m.target.key, []).append(m)
    return groups


def _name_for(key: str, group: list[Match]) -> str:
    first = group[0]
    if len(group) == 1 and first.target.offset is None:
        return _lora_name(first.layer.component, first.layer.name)
    path = key[: -len(".weight")] if key.endswith(".weight") else key
    for p in _KEY_PREFIXES:
        if path.startswith(p):
            path = path[len(p):]
            break
    return _lora_name(first.layer.component, path)


def _delta_weight(group: list[Match], w: torch.Tensor, strength_of: Callable, mode: str) -> torch.Tensor:
    """W' − W in fp32 for one base weight and the adapter layers on it (slices included), 2-D (out, in·k)."""
    w32 = w.to(torch.float32)
    new = w32.clone()
    for m in group:
        s = float(strength_of(m.layer))
        if s == 0:
            continue
        if m.target.offset is None:
            new = rotate_weight(m.layer, new, s, mode)
        else:
            dim, start, length = m.target.offset
            part = new.narrow(dim, start, length)
            part.copy_(rotate_weight(m.layer, part.clone(), s, mode))
    return (new - w32).reshape(w.shape[0], -1)


def extract(adapter: OFTAdapter, weights: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
            shapes: Mapping[str, tuple[int, ...]], *, rank: int | None = None, rel_error: float | None = None,
            strength: float = 1.0, mode: str = "kohya", strength_of: Callable | None = None,
            components=None, base_name: str = "the base model", progress: Callable[[int, int], None] | None = None,
            ) -> tuple[dict[str, torch.Tensor], list[_LayerExtract]]:
    """The LoRA tensors (kohya names, fp32) and per-layer reports for `adapter` on a base given by `shapes` and
    `weights` (a mapping or a key → tensor function, read one weight at a time)."""
    if mode not in STRENGTH_MODES:
        raise OFTError(f"strength mode: expected {' | '.join(STRENGTH_MODES)}, found {mode!r}", path=adapter.path)
    strength = check_strength(strength, path=adapter.path or None)
    report = match_adapter(adapter, shapes, build_key_map(shapes), components=components, base_name=base_name)
    if not report.matched:
        raise OFTError(f"none of its {report.total} layers matches {base_name}: {report.summary()}",
                       path=adapter.path)
    biased = [m.layer.key for m in report.matched if m.layer.bias is not None]
    if biased:  # a LoRA file (kohya) holds a weight change only: without the bias it would not be the trained model
        raise OFTError(f"{len(biased)} of its layers train their bias (PEFT bias 'oft_only' / 'boft_only'), which a "
                       "LoRA holds no change of: apply the adapter (or bake it) instead", path=adapter.path,
                       layer=biased[0])
    strength_of = strength_of or (lambda layer: strength)
    get = weights if callable(weights) else weights.__getitem__
    tensors: dict[str, torch.Tensor] = {}
    layers: list[_LayerExtract] = []
    groups = _group_by_key(report.matched)
    for i, (key, group) in enumerate(groups.items()):
        w = get(key)
        dw = _delta_weight(group, w, strength_of, mode)
        if not bool(torch.isfinite(dw).all()) and bool(torch.isfinite(w).all()):
            raise OFTError(f"ΔW = W' − W of {key} overflows float32 (the adapted weight and the base are both near "
                           "float32's largest value): no LoRA can hold it", path=adapter.path or None)
        name = _name_for(key, group)
        if name in {x.name for x in layers}:
            raise OFTError(f"two base weights would get the same LoRA name {name!r}", path=adapter.path)
        up, down, err, method = low_rank(dw, rank, rel_error)
        change = float(torch.linalg.matrix_norm(dw.double())) / max(float(torch.linalg.matrix_norm(
            w.to(torch.float64).reshape(w.shape[0], -1))), 1e-30)
        layers.append(_LayerExtract(name, key, tuple(w.shape), up.shape[1], err, change, method))
        if method != "zero":
            r = up.shape[1]
            if w.ndim > 2:  # kohya conv LoRA: down (r, in, kh, kw), up (out, r, 1, 1)
                down = down.reshape(r, *w.shape[1:])
                up = up.reshape(w.shape[0], r, *([1] * (w.ndim - 2)))
            tensors[f"{name}.lora_up.weight"] = up.contiguous()
            tensors[f"{name}.lora_down.weight"] = down.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(r))
        if progress is not None:
            progress(i + 1, len(groups))
    return tensors, layers


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cast(tensors: dict[str, torch.Tensor], dtype: str, path: str | None) -> dict[str, torch.Tensor]:
    """The LoRA factors in `dtype` (alphas stay fp32), or `OFTError` naming the first factor that the cast would
    turn into Inf (|value| beyond fp16's 65504: a strong adapter on a large weight), before anything is written."""
    out = {}
    for k, v in tensors.items():
        out[k] = v if k.endswith(".alpha") else v.to(_DTYPES[dtype])
        if not bool(torch.isfinite(out[k]).all()):
            limit = torch.finfo(_DTYPES[dtype]).max
            raise OFTError(f"the LoRA factor {k} holds values up to {float(v.abs().max()):.3g}, beyond {dtype}'s "
                           f"largest ({limit:.5g}): it would be written as Inf; extract with dtype fp32 or bf16",
                           path=path)
    return out


def lora_metadata(adapter: OFTAdapter, layers: list[_LayerExtract], *, rank, rel_error, strength, mode,
                  dtype: str) -> dict[str, str]:
    ranks = sorted({x.rank for x in layers if x.method != "zero"})
    dim = ranks[-1] if ranks else 0
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(dim),
        "ss_network_args": json.dumps({"per_layer_rank": len(ranks) > 1}),
        "comfyui_oft.extracted_from": json.dumps({
            "adapter": os.path.basename(adapter.path) or adapter.format, "format": adapter.format,
            "strength": strength, "strength_mode": mode, "rank": rank, "rel_error_target": rel_error,
            "dtype": dtype,
            "layers": {x.name: {"rank": x.rank, "rel_error": x.rel_error, "method": x.method} for x in layers},
        }),
    }


def extract_lora(adapter: OFTAdapter | str, base: str, out: str, *, rank: int | None = None,
                 rel_error: float | None = None, strength: float = 1.0, mode: str = "kohya", dtype: str = "fp32",
                 overwrite: bool = False) -> ExtractResult:
    """Extract a LoRA from `adapter` (an OFTAdapter or a file) on the base safetensors file `base`, write it to `out`
    (atomically; never over an existing file unless `overwrite`)."""
    from .formats import load_adapter
    from .publish import publish_safetensors
    from .safetensors_io import read_header

    t0 = time.perf_counter()
    if dtype not in _DTYPES:
        raise OFTError(f"dtype: expected {' | '.join(_DTYPES)}, found {dtype!r}")
    if isinstance(adapter, (str, os.PathLike)):
        adapter = load_adapter(adapter)
    header = read_header(base)
    if os.path.exists(out) and not overwrite:
        raise OFTError("output exists; choose another name or pass --overwrite", path=out)
    if os.path.abspath(out) in (os.path.abspath(base), os.path.abspath(adapter.path or "")):
        raise OFTError("the output would overwrite an input", path=out)
    from safetensors import safe_open

    try:
        with safe_open(header.path, framework="pt", device="cpu") as f:
            tensors, layers = extract(adapter, f.get_tensor, header.shapes, rank=rank, rel_error=rel_error,
                                      strength=strength, mode=mode, base_name=os.path.basename(base))
    except OFTError:
        raise
    except Exception as e:  # safetensors' own read errors: name the file
        raise OFTError(f"could not read the base ({type(e).__name__}: {e})", path=base) from e
    if not tensors:
        raise OFTError("the adapter changes no weight at this strength (ΔW = 0 everywhere): nothing to extract",
                       path=adapter.path)
    tensors = _cast(tensors, dtype, adapter.path or None)
    meta = lora_metadata(adapter, layers, rank=rank, rel_error=rel_error, strength=strength, mode=mode, dtype=dtype)
    publish_safetensors(out, tensors, meta, inputs=(base, adapter.path or None), overwrite=overwrite,
                        what="LoRA file")
    return ExtractResult(out, layers, time.perf_counter() - t0)
