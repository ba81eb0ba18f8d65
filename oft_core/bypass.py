"""The bypass apply mode: OFT applied to activations in the forward, no weight ever rewritten.

For an adapted Linear / Conv layer y = W·x + b (side "out": kohya, LyCORIS, PEFT ≤ 0.13; side "in": PEFT ≥ 0.14):

    side "out":  y' = s ⊙ M·(y − b) + b        = (s ⊙ M·W)·x + b   (the merge path's weight, `rotate_weight`)
    side "in":   y' = s ⊙ (W·(M·x)) + b          = (s ⊙ W·M)·x + b     (the input rotated before the layer)

with M = blockdiag(B) from `rotation.rotation_blocks` (one definition of strength and of the constraint) and s the
row scale (LyCORIS `rescale`, PEFT 0.14–0.15 `oft_s`) when the layer has one. The layer's own forward runs untouched
(whatever casts, dequantises or patches its weight: fp8, GGUF, ComfyUI's low-VRAM path), so the result is the exact
rotated forward of the weight the layer really uses, with no rounding of a rotated weight to the storage dtype.
Rounding: the output side rounds y once more (to its own dtype) after the fp32 rotation; the input side rounds the
rotated input to the input's dtype.

Realised as torch forward hooks (`ModuleBypass.attach`): a pre-hook for the input side, a post-hook for the output
side and row scales; removing them (`handle.remove()`) restores the module exactly, in any order. Stacking: hooks of
adapters attached later run after (output side: M₂·M₁·W) or before (input side, prepended: W·M₁·M₂) those attached
earlier, the order the merge path gives when adapters are patched in that order. A weight patch (LoRA merged into W)
is inside the layer's forward, so bypass always realises "LoRA first, then OFT": M·(W + ΔW).

Cost: no work at attach time; the rotation blocks are built on a layer's first forward on a device and cached
(per strength, mode, device); each forward then costs one block product over the output (or input) features,
about b/in of the layer's own matmul (b = block size), plus a few elementwise passes.

`attach(model, adapter, ...)` is the Python API for a plain torch model (state-dict names matched like the baker's);
ComfyUI's seam (nodes/bypass.py) builds `ModuleBypass` objects from its own key map and attaches them through
ModelPatcher injections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from .errors import OFTError
from .match import match_adapter
from .names import build_key_map
from .rotation import STRENGTH_MODES, _apply_last, rotation_blocks
from .spec import OFTAdapter, OFTLayer

_BiasGetter = Callable[[torch.nn.Module, torch.dtype, torch.device], "torch.Tensor | None"]


@dataclass(frozen=True)
class _BypassTarget:
    """One adapter layer on one module: the layer (resolved for its weight), its effective strength, and the span
    (start, length) of output features it covers when it adapts a slice of a fused weight (None: all of them)."""

    layer: OFTLayer
    strength: float
    mode: str = "kohya"
    span: tuple[int, int] | None = None
    # `names.Target.perm`: base output feature i is the adapter's row perm[i] (a weight ComfyUI stores with its
    # halves swapped, e.g. SD3 / FLUX `norm_out.linear`); the output-side rotation acts in the adapter's order.
    perm: tuple[int, ...] | None = None


def _plain_bias(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The bias a plain torch Linear / Conv adds, as the forward used it (in the output's dtype), in fp32."""
    b = getattr(module, "bias", None)
    return None if b is None else b.to(device=device, dtype=dtype).to(torch.float32)


def _is_identity(layer: OFTLayer) -> bool:
    """All generators zero and no row scale: R = I exactly (Cayley, Neumann and both strength modes)."""
    return (layer.parameterization != "matrix" and layer.row_scale is None
            and all(g.device.type != "meta" and not bool(g.any()) for g in layer.blocks))


class ModuleBypass:
    """The OFT rotations one adapter applies to one Linear / Conv module, as forward hooks.

    `conv`: the module is a convolution (features on axis 1) rather than a Linear (features on the last axis).
    `bias_of(module, dtype, device)`: the bias the module's forward adds, cast as the forward cast it, in fp32.
    """

    def __init__(self, targets: Sequence[_BypassTarget], *, conv: bool, kernel_numel: int = 1,
                 bias_of: _BiasGetter = _plain_bias, name: str = ""):
        self.name = name
        self.conv = conv
        self.bias_of = bias_of
        self.out_targets: list[_BypassTarget] = []
        self.in_targets: list[_BypassTarget] = []
        for t in targets:
            if t.mode not in STRENGTH_MODES:
                raise OFTError(f"strength mode: expected {' | '.join(STRENGTH_MODES)}, found {t.mode!r}",
                               layer=t.layer.key)
            if t.strength == 0:
                continue  # strength 0 is "off" in both modes: the module stays exactly as it is
            if t.layer.side == "out":
                if t.perm is not None and conv:
                    raise OFTError("bypass cannot rotate a convolution whose rows the host stores permuted: use "
                                   "apply mode merge for this adapter", layer=t.layer.key)
                self.out_targets.append(t)
                continue
            # input side: a row permutation of the weight permutes its outputs only; the input rotation is the same
            if t.span is not None:
                raise OFTError("bypass cannot rotate the input features of a slice of a fused weight (the other "
                               "slices share that input): use apply mode merge for this adapter", layer=t.layer.key)
            if conv and kernel_numel != 1:
                raise OFTError("bypass cannot rotate the input side of a convolution with a kernel larger than 1×1 "
                               "(the rotation mixes kernel positions): use apply mode merge for this adapter",
                               layer=t.layer.key)
            self.in_targets.append(t)
        self._blocks: dict[tuple[int, str], list[torch.Tensor]] = {}
        self._delta_cache: dict[tuple, list[torch.Tensor]] = {}
        self._identity: dict[int, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.out_targets or self.in_targets)

    def _active(self, targets: list[_BypassTarget]) -> list[_BypassTarget]:
        """`targets` without identity layers (all-zero generators), found on first use: reading the generators is
        adapter-sized work, kept out of attach time."""
        out = []
        for t in targets:
            identity = self._identity.get(id(t))
            if identity is None:
                identity = self._identity[id(t)] = _is_identity(t.layer)
            if not identity:
                out.append(t)
        return out

    # -------------------------------------------------------------------------------------------------- math
    def blocks(self, target: _BypassTarget, device: torch.device) -> list[torch.Tensor]:
        """`rotation_blocks(layer, strength, mode)` on `device`, built on first use and cached."""
        key = (id(target), str(device))
        blocks = self._blocks.get(key)
        if blocks is None:
            blocks = [b.to(device) for b in rotation_blocks(target.layer, target.strength, target.mode)]
            self._blocks[key] = blocks
        return blocks

    def _rotate(self, target: _BypassTarget, t: torch.Tensor) -> torch.Tensor:
        """M·v on the feature axis of fp32 `t` (last axis for Linear, axis 1 for Conv)."""
        blocks = self.blocks(target, t.device)
        if not self.conv:
            return _apply_last(target.layer, blocks, t)
        if target.layer.kind == "diag" and len(blocks) == 1:
            n, b = target.layer.num_blocks[0], target.layer.block_sizes[0]
            lead = t.shape[0]
            out = torch.matmul(blocks[0], t.reshape(lead, n, b, -1))  # (lead, n, b, spatial)
            return out.reshape(t.shape)
        return _apply_last(target.layer, blocks, t.movedim(1, -1)).movedim(-1, 1)

    def _features(self, t: torch.Tensor, span) -> torch.Tensor:
        if span is None:
            return t
        if self.conv and t.ndim > 1:
            return t[:, span[0]: span[0] + span[1]]
        return t[..., span[0]: span[0] + span[1]]

    def _bias_view(self, bias: torch.Tensor, ndim: int) -> torch.Tensor:
        return bias if not self.conv else bias.reshape(-1, *([1] * (ndim - 2)))

    def pre_hook(self, module, args):
        """Input side: x ← M·x (fp32 math, rounded back to x's dtype), last attached applied first."""
        x = args[0]
        targets = self._active(self.in_targets)
        if not targets:
            return None
        if all(t.layer.kind == "diag" for t in targets):  # x + (M − I)·x, 16-bit kept (see _post_delta)
            work = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
            for target in reversed(targets):
                src = x.to(work)
                x = x.to(work, copy=True)
                self._add_delta(target, src, x, work)
            return (x.to(args[0].dtype), *args[1:])
        x32 = x.to(torch.float32)
        for target in reversed(targets):
            x32 = self._rotate(target, x32)
        return (x32.to(x.dtype), *args[1:])

    def _deltas(self, target: _BypassTarget, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """B − I per split in `dtype`, cached like the blocks."""
        key = (id(target), str(device), dtype)
        d = self._delta_cache.get(key)
        if d is None:
            d = [(b - torch.eye(b.shape[-1], device=device)).to(dtype) for b in self.blocks(target, device)]
            self._delta_cache[key] = d
        return d

    def _post_delta(self, y: torch.Tensor, bias: torch.Tensor | None, targets: list[_BypassTarget]) -> torch.Tensor:
        """y + (B − I)·(y − b) per split of every output target: the plain case (diagonal blocks, no row scale).

        16-bit activations keep their dtype: the block product of the small change B − I (its entries ~ the adapter's
        effect) in bf16 / fp16 has an error of ~2⁻⁸ / 2⁻¹¹ of that change, far under the one rounding of the sum to the
        activation dtype (which the fp32 path pays too), and runs at the 16-bit matmul rate the layer itself used."""
        work = y.dtype if y.dtype in (torch.float16, torch.bfloat16) else torch.float32
        if not self.conv and len(targets) == 1 and targets[0].span is None and len(targets[0].layer.blocks) == 1:
            return self._post_delta_whole(targets[0], y, bias, work)
        out = y.to(work, copy=True)
        src = y.to(work)
        for target in targets:
            part_in = self._features(src, target.span)
            part_out = self._features(out, target.span)
            if bias is not None:
                part_in = part_in - self._bias_view(self._features(bias, target.span).to(work), part_in.ndim)
            self._add_delta(target, part_in, part_out, work)
        return out.to(y.dtype)

    def _post_delta_whole(self, target: _BypassTarget, y: torch.Tensor, bias: torch.Tensor | None,
                          work: torch.dtype) -> torch.Tensor:
        """The common Linear case, one split over all outputs, in two passes over y: δ − (B − I)·b from one baddbmm
        (the bias never subtracted from y), then y + δ into a new tensor."""
        d = self._deltas(target, y.device, work)[0]
        n, b = target.layer.num_blocks[0], target.layer.block_sizes[0]
        src = y.to(work)
        z = src.reshape(-1, n, b).transpose(0, 1)  # (n, N, b)
        dt = d.transpose(-1, -2)
        if bias is None:
            delta = torch.bmm(z, dt)
        else:
            # (B − I)·b per block, (n, 1, b), in fp32: a 16-bit bmm with one row runs 100× under the matmul rate
            d32 = self._deltas(target, y.device, torch.float32)[0]
            c = torch.bmm(bias.view(n, 1, b), d32.transpose(-1, -2)).to(work)
            delta = torch.baddbmm(c, z, dt, beta=-1)
        out = src.reshape(-1, n, b) + delta.transpose(0, 1)
        return out.reshape(y.shape).to(y.dtype)

    def _add_delta(self, target: _BypassTarget, src: torch.Tensor, out: torch.Tensor, work: torch.dtype) -> None:
        """out += (M − I)·src on the feature axis (diagonal blocks), in `work` dtype."""
        start = 0
        for d, n, b in zip(self._deltas(target, src.device, work), target.layer.num_blocks, target.layer.block_sizes):
            if self.conv:
                z = src[:, start: start + n * b]
                out[:, start: start + n * b] += torch.matmul(d, z.reshape(z.shape[0], n, b, -1)).reshape(z.shape)
            else:
                z = src[..., start: start + n * b].reshape(-1, n, b)
                delta = torch.bmm(z.transpose(0, 1), d.transpose(-1, -2))  # (n, N, b): v ↦ (B − I)·v
                out[..., start: start + n * b] += delta.transpose(0, 1).reshape(*out.shape[:-1], n * b)
            start += n * b

    def post_hook(self, module, args, y):
        """Output side: y ← s ⊙ M·(y − b) + b per target, in attach order; input-side row scales: s ⊙ (y − b) + b."""
        scales = [t for t in self.in_targets if t.layer.row_scale is not None]
        targets = self._active(self.out_targets)
        if not targets and not scales:
            return None
        bias = self.bias_of(module, y.dtype, y.device)
        if not scales and all(t.layer.kind == "diag" and t.layer.row_scale is None and t.perm is None
                              for t in targets):
            return self._post_delta(y, bias, targets)
        y32 = y.to(torch.float32, copy=True)
        for target in targets:
            if target.perm is not None:
                y32 = self._rotate_permuted(target, y32, bias)
                continue
            part = self._features(y32, target.span)
            b = None if bias is None else self._bias_view(self._features(bias, target.span), part.ndim)
            rotated = self._rotate(target, part if b is None else part - b)
            if target.layer.row_scale is not None:
                rotated.mul_(self._bias_view(target.layer.row_scale.to(y.device), rotated.ndim))
            part.copy_(rotated if b is None else rotated.add_(b))
        for target in scales:
            s = self._bias_view(target.layer.row_scale.to(y.device), y32.ndim)
            y32 = y32.mul_(s) if bias is None else y32.sub_(self._bias_view(bias, y32.ndim)).mul_(s).add_(
                self._bias_view(bias, y32.ndim))
        return y32.to(y.dtype)

    def _rotate_permuted(self, target: _BypassTarget, y32: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Output side of a layer whose base rows are the adapter's rows in `perm` order (a Linear): y taken into the
        adapter's order, s ⊙ M·(y − b) + b there, and put back in the base order."""
        perm = torch.tensor(target.perm, dtype=torch.long, device=y32.device)
        inv = torch.argsort(perm)  # the adapter's row j is base row inv[j]
        part = y32[..., inv]
        b = None if bias is None else bias[inv]
        rotated = self._rotate(target, part if b is None else part - b)
        if target.layer.row_scale is not None:
            rotated.mul_(target.layer.row_scale.to(y32.device))
        if b is not None:
            rotated.add_(b)
        return rotated[..., perm]

    def attach(self, module: torch.nn.Module) -> list:
        """Register the hooks on `module`; returns the handles (`.remove()` each to detach)."""
        handles = []
        if self.in_targets:
            handles.append(module.register_forward_pre_hook(self.pre_hook, prepend=True))
        if self.out_targets or any(t.layer.row_scale is not None for t in self.in_targets):
            handles.append(module.register_forward_hook(self.post_hook))
        return handles


def module_bypasses(matches: Iterable, strength_of: Callable[[OFTLayer], float], mode: str,
                    module_info: Callable[[str], tuple[bool, int]], bias_of: _BiasGetter = _plain_bias,
                    ) -> dict[str, ModuleBypass]:
    """Group matched layers (`match.Match`) by module and build one `ModuleBypass` per module.

    `module_info(module_path)` -> (is_conv, kernel numel). Weight keys must end in ".weight"; a fused-slice offset
    must be on axis 0 (output features).
    """
    grouped: dict[str, list[_BypassTarget]] = {}
    for m in matches:
        key = m.target.key
        if not key.endswith(".weight"):
            raise OFTError(f"bypass needs a module weight, found key {key!r}", layer=m.layer.key)
        span = None
        if m.target.offset is not None:
            dim, start, length = m.target.offset
            if dim != 0:
                raise OFTError(f"bypass cannot adapt a slice on axis {dim} of {key}: use apply mode merge",
                               layer=m.layer.key)
            span = (int(start), int(length))
        grouped.setdefault(key[: -len(".weight")], []).append(
            _BypassTarget(m.layer, float(strength_of(m.layer)), mode, span, getattr(m.target, "perm", None)))
    out = {}
    for path, targets in grouped.items():
        conv, kernel = module_info(path)
        mb = ModuleBypass(targets, conv=conv, kernel_numel=kernel, bias_of=bias_of, name=path)
        if mb:
            out[path] = mb
    return out


class _BypassHandle:
    """What `attach` returns: the hooks it registered; `remove()` takes them all off again."""

    def __init__(self, handles: list, modules: dict[str, ModuleBypass], report):
        self.handles = handles
        self.modules = modules
        self.report = report

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def attach(model: torch.nn.Module, adapter: OFTAdapter, strength: float = 1.0, mode: str = "kohya", *,
           components: Sequence[str] | None = None) -> _BypassHandle:
    """Apply `adapter` to a plain torch `model` in bypass mode (forward hooks); returns a handle to `remove()`.

    The model's state-dict names are matched the way the baker matches a base file's keys. Nothing is written to
    any weight; on any error nothing is attached.
    """
    if mode not in STRENGTH_MODES:
        raise OFTError(f"strength mode: expected {' | '.join(STRENGTH_MODES)}, found {mode!r}", path=adapter.path)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = match_adapter(adapter, shapes, build_key_map(shapes), components=components)
    if not report.matched:
        raise OFTError(f"none of its {report.total} layers matches the model's weights", path=adapter.path)
    modules = dict(model.named_modules())

    def info(path):
        w = modules[path].weight
        return w.ndim > 2, int(w[0, 0].numel()) if w.ndim > 2 else 1

    bypasses = module_bypasses(report.matched, lambda layer: strength, mode, info)
    handles = []
    for path, mb in bypasses.items():
        handles += mb.attach(modules[path])
    return _BypassHandle(handles, bypasses, report)
