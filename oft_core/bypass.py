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
about b/in of the layer's own matmul (b = block size), read from and written to the activations' own layout
(`_add_block_product`), plus one or two elementwise passes (the bias term, the sum). The output side cannot be
moved to the (sometimes narrower) input: M·W·x = W·M'·x for every x needs M' = W⁻¹·M·W, dense (and W square and
invertible), so rotating x is not the same forward. benchmarks/bench_bypass.py measures the step against the merged
layer.

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
    if b is None:
        return None
    if b.dtype != dtype or b.device != device:
        b = b.to(device=device, dtype=dtype)
    return b if b.dtype == torch.float32 else b.to(torch.float32)


def _is_identity(layer: OFTLayer) -> bool:
    """All generators zero and no row scale: R = I exactly (Cayley, Neumann and both strength modes)."""
    return (layer.parameterization != "matrix" and layer.row_scale is None
            and all(g.device.type != "meta" and not bool(g.any()) for g in layer.blocks))


def _add_block_product(src: torch.Tensor, dt: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out ← src + D·(src − bias) per block of features, D = B − I: the output side's y + (B − I)·(y − b).

    `src`, `out`: (N, n·b) of one dtype, each with unit stride on its last axis (a feature slice of a contiguous
    tensor is fine), `out` apart from `src`; `dt`: the transposed blocks Dᵀ (n, b, b) in that dtype, contiguous;
    `bias`: (n·b,) or None. 16-bit activations keep their dtype: the product of the small change B − I runs at the
    16-bit matmul rate the layer itself used, its error ~2⁻⁸ / 2⁻¹¹ of that change, and the sum is rounded once.

    One batched matmul over strided views (batch n at stride b, rows N at the row stride) writing out's rows where
    they are (an `out=` view): neither y nor the result takes a transposed copy. 16-bit: accumulated onto src in the
    product (beta = 1: the sum rounded once); with a bias, one extra pass writes src − bias in the (n, N, b) layout
    the 16-bit kernels copy their input to anyway. fp32 with a bias and b ≤ N: out ← src − (B − I)·bias, then the
    product added in place (one pass); without a bias: out ← src, then the same; otherwise (fp32 with a bias and
    b > N) the product of src − bias into `out`, then + src (the per-step
    (B − I)·bias reads all n·b² of D: 460 MB a step for 4 blocks of 5376). Measured (benchmarks/bench_bypass.py
    shapes, 256 tokens) against a contiguous product added back transposed (the previous step), the bias term in
    every dtype, and src − bias in y's layout: best or within noise of the best, per dtype and block size (fp32,
    3072 features in blocks of 96: 1.15–1.17 → 1.08–1.11 of the merged step for the one-pass form).
    """
    rows, (n, b) = src.shape[0], dt.shape[:2]
    z = src.view(rows, n, b).transpose(0, 1)  # (n, N, b) view
    ov = out.view(rows, n, b).transpose(0, 1)
    if src.dtype == torch.float32 and (bias is None or b <= rows):
        # one pass instead of two: out ← src − (B − I)·bias (without a bias: src), then out += (B − I)·src in place
        # (beta = 1); the per-step (B − I)·bias reads n·b² of D, no more than one pass over src while b ≤ rows.
        # A product written through the strided view instead (out=) goes through a temporary and a copy: without a
        # bias, 154 × 640 in blocks of 8 grouped to 32, 0.29 → 0.11 ms (2048 × 128: 0.65 → 0.30 ms), one thread
        if bias is None:
            out.copy_(src)
        else:
            c = torch.bmm(bias.view(n, 1, b), dt).view(n, b)
            torch.sub(src.view(rows, n, b), c, out=out.view(rows, n, b))
        ov.baddbmm_(z, dt)
        return
    if bias is None:
        t = z
    else:
        t = torch.empty((n, rows, b), dtype=src.dtype, device=src.device)
        torch.sub(z, bias.view(n, 1, b), out=t)
    if src.dtype == torch.float32:
        torch.bmm(t, dt, out=ov)
        out.add_(src)
    else:
        torch.baddbmm(z, t, dt, out=ov)


# Blocks narrower than this are multiplied g at a time as one block-diagonal (g·b)² matrix (its off-diagonal blocks
# zero): the batched product's cost is set by the matrix width far more than by its FLOPs there, and the copies
# around it move rows of b elements. Measured (benchmarks/bench_bypass.py shapes, 256 tokens, one thread): 3072
# features in blocks of 16 or 8, the hooked step over the merged one 1.39–1.53 → 1.16–1.20 in bf16, 1.16–1.18 →
# 1.10 in fp32, for 2–4× the (small) FLOPs.
_GROUP_WIDTH = 32


def _group_factor(n: int, b: int) -> int:
    """How many of n blocks of b are grouped into one matrix: the largest divisor of n with g·b ≤ `_GROUP_WIDTH`
    (1 for wide blocks)."""
    g = max(1, _GROUP_WIDTH // b)
    while n % g:
        g -= 1
    return g


def _group_blocks(dt: torch.Tensor) -> torch.Tensor:
    """(n, b, b) blocks as (n/g, g·b, g·b) block-diagonal matrices, g = `_group_factor(n, b)` (the same blocks when
    g = 1): the product over g·b features equals the n products over b."""
    n, b = dt.shape[0], dt.shape[-1]
    g = _group_factor(n, b)
    if g == 1:
        return dt
    grouped = torch.zeros(n // g, g * b, g * b, dtype=dt.dtype, device=dt.device)
    parts = dt.view(n // g, g, b, b)
    for j in range(g):
        grouped[:, j * b: (j + 1) * b, j * b: (j + 1) * b] = parts[:, j]
    return grouped


# Row pieces of the activation-side products. A batched product over strided views of an output with many rows
# reads each row at a stride of the whole feature width (one page per row and group): past a few hundred rows that
# thrashes a CPU's TLB, and cutting the rows into pieces of ~`_PIECE_ELEMENTS` (at least `_MIN_PIECE_ROWS` rows)
# is 1.5–2.3× faster. Measured, one thread, blocks grouped to 32 wide: 4096 tokens × 9216 features, bf16,
# 189 → 82 ms; 4096 × 3072, 47 → 26 ms; training's 1024 × 3072, 8.7 → 5.5 ms. Up to `_ONE_PIECE_ROWS` rows, or
# with blocks wider than `_PIECED_WIDTH` (large GEMMs of their own: 256 × 21504 in blocks of 672, 15 → 32 ms in
# pieces of 32 rows), one piece is as fast or faster. On an accelerator the pieces only bound the temporaries.
_ONE_PIECE_ROWS = 256
_PIECED_WIDTH = 128
_PIECE_ELEMENTS = 1 << 18
_MIN_PIECE_ROWS = 32
_ACCELERATOR_PIECE_ELEMENTS = 1 << 24


def _piece_rows(t: torch.Tensor, block_width: int) -> int:
    """Rows per piece for a (rows, features) activation `t` multiplied in blocks (or groups) `block_width` wide."""
    rows, width = t.shape[0], max(1, t.shape[-1])
    if t.device.type != "cpu":
        return max(1, _ACCELERATOR_PIECE_ELEMENTS // width)
    if rows <= _ONE_PIECE_ROWS or block_width > _PIECED_WIDTH:
        return max(1, rows)
    return max(_MIN_PIECE_ROWS, _PIECE_ELEMENTS // width)


def _add_block_product_rows(src: torch.Tensor, dt: torch.Tensor, bias: torch.Tensor | None,
                            out: torch.Tensor | None) -> None:
    """`_add_block_product` over row pieces of `_piece_rows` (the same values, up to the kernels' summation order);
    `out` None: the result goes over `src` itself, each piece made in a scratch piece and copied back."""
    step = _piece_rows(src, dt.shape[-1])
    if out is not None and step >= src.shape[0]:  # one piece: no slicing (a few µs a call, many calls a step)
        _add_block_product(src, dt, bias, out)
        return
    scratch = None
    for i in range(0, src.shape[0], step):
        piece = src[i:i + step]
        if out is not None:
            _add_block_product(piece, dt, bias, out[i:i + step])
            continue
        if scratch is None:
            scratch = torch.empty((min(step, src.shape[0]), src.shape[1]), dtype=src.dtype, device=src.device)
        done = scratch[:piece.shape[0]]
        _add_block_product(piece, dt, bias, done)
        piece.copy_(done)


def _disjoint(spans: list[tuple[int, int]]) -> bool:
    ordered = sorted(spans)
    return all(a[0] + a[1] <= b[0] for a, b in zip(ordered, ordered[1:]))


class ModuleBypass:
    """The OFT rotations one adapter applies to one Linear / Conv module, as forward hooks.

    `conv`: the module is a convolution (features on axis 1) rather than a Linear (features on the last axis).
    `bias_of(module, dtype, device)`: the bias the module's forward adds, cast as the forward cast it, in fp32.
    A layer's trained bias (`OFTLayer.bias`) is not applied by the hooks: it replaces the module's own bias, which
    the caller patches (the nodes add a ComfyUI patch of that bias, `nodes.patch.OFTBiasAdapter`); `bias_of` then
    reads the patched one.
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
        self._scales = [t for t in self.in_targets if t.layer.row_scale is not None]
        self._plan: tuple | None = None

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

    def _out_plan(self) -> tuple[list[_BypassTarget], bool, list[tuple[int, int]] | None]:
        """The output side's active targets, whether they all take the (B − I)·(y − b) path (diagonal blocks, no row
        scale, no permuted rows, no input-side row scale), and for a Linear their disjoint feature spans (None:
        overlapping, or a convolution). Found on the first forward, then reused: each step's Python work is a few
        lookups."""
        if self._plan is None:
            targets = self._active(self.out_targets)
            plain = not self._scales and all(t.layer.kind == "diag" and t.layer.row_scale is None and t.perm is None
                                             for t in targets)
            spans = None
            if plain and not self.conv:
                spans = [(0 if t.span is None else t.span[0],
                          sum(n * b for n, b in zip(t.layer.num_blocks, t.layer.block_sizes))) for t in targets]
                if not _disjoint(spans):
                    spans = None
            self._plan = (targets, plain, spans)
        return self._plan

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
                if self.conv:
                    src = x.to(work)
                    x = x.to(work, memory_format=torch.contiguous_format, copy=True)
                    self._add_delta(target, src, x, work)
                    continue
                features = x.shape[-1]
                src = x.to(work).reshape(-1, features)
                out = torch.empty(src.shape, dtype=work, device=x.device)
                start = 0
                deltas = self.product_blocks(target, x.device, work)
                for dt, n, b in zip(deltas, target.layer.num_blocks, target.layer.block_sizes):
                    _add_block_product_rows(src[:, start: start + n * b], dt, None, out[:, start: start + n * b])
                    start += n * b
                if start < features:
                    out[:, start:].copy_(src[:, start:])
                x = out.view(x.shape)
            return (x.to(args[0].dtype), *args[1:])
        x32 = x.to(torch.float32)
        for target in reversed(targets):
            x32 = self._rotate(target, x32)
        return (x32.to(x.dtype), *args[1:])

    def _deltas(self, target: _BypassTarget, device: torch.device, dtype: torch.dtype, *,
                transposed: bool = False) -> list[torch.Tensor]:
        """B − I per split in `dtype` (or its transpose (B − I)ᵀ, contiguous: what the products take as their right
        factor; a transposed view would be copied by every 16-bit bmm, 230 MB a step for 4 blocks of 5376), cached
        like the blocks."""
        key = (id(target), str(device), dtype, transposed)
        d = self._delta_cache.get(key)
        if d is None:
            d = [(b - torch.eye(b.shape[-1], device=device)).to(dtype) for b in self.blocks(target, device)]
            if transposed:
                d = [m.transpose(-1, -2).contiguous() for m in d]
            self._delta_cache[key] = d
        return d

    def product_blocks(self, target: _BypassTarget, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """The right factors of `_add_block_product` per split: (B − I)ᵀ, contiguous; blocks under `_GROUP_WIDTH`
        wide merged g at a time into block-diagonal (n/g, g·b, g·b) matrices (`_group_blocks`), cached."""
        key = (id(target), str(device), dtype, "product")
        d = self._delta_cache.get(key)
        if d is None:
            d = [_group_blocks(m) for m in self._deltas(target, device, dtype, transposed=True)]
            self._delta_cache[key] = d
        return d

    def _post_delta(self, y: torch.Tensor, bias: torch.Tensor | None, targets: list[_BypassTarget],
                    spans: list[tuple[int, int]] | None) -> torch.Tensor:
        """y + (B − I)·(y − b) per split of every output target: the plain case (diagonal blocks, no row scale).

        16-bit activations keep their dtype (see `_add_block_product`); others are rotated in fp32."""
        work = y.dtype if y.dtype in (torch.float16, torch.bfloat16) else torch.float32
        if spans is not None:
            return self._post_delta_linear(y, bias, targets, spans, work)
        out = y.to(work, memory_format=torch.contiguous_format, copy=True)
        src = y.to(work)
        for target in targets:
            part_in = self._features(src, target.span)
            part_out = self._features(out, target.span)
            if bias is not None:
                part_in = part_in - self._bias_view(self._features(bias, target.span).to(work), part_in.ndim)
            self._add_delta(target, part_in, part_out, work)
        return out.to(y.dtype)

    def _post_delta_linear(self, y: torch.Tensor, bias: torch.Tensor | None, targets: list[_BypassTarget],
                           spans: list[tuple[int, int]], work: torch.dtype) -> torch.Tensor:
        """A Linear's output side, targets on disjoint feature spans (one whole-layer target, or the q / k / v
        slices of a fused weight): each split by `_add_block_product` straight into a new tensor; features no target
        covers copied."""
        features = y.shape[-1]
        src = (y if y.dtype == work else y.to(work)).reshape(-1, features)
        plan = [(target, start, length, self.product_blocks(target, y.device, work))
                for target, (start, length) in zip(targets, spans)]
        # On a CPU, an output cut into pieces is written in place, a piece at a time through a scratch piece, when
        # nothing can see it change (a layer output autograd does not track, the same memory as src): a new
        # output tensor costs its first-touch page faults (4096 tokens × 9216 features in bf16: 75 MB; measured
        # hooked / merged step 1.34 → 1.24 there, fp32 1.11 → 1.07 on 3072 features).
        in_place = (y.device.type == "cpu" and src.data_ptr() == y.data_ptr() and y.is_contiguous()
                    and not y.requires_grad and not torch.is_grad_enabled()
                    and all(_piece_rows(src, d.shape[-1]) < src.shape[0] for *_, deltas in plan for d in deltas))
        out = src if in_place else torch.empty(src.shape, dtype=work, device=y.device)
        if bias is not None and bias.dtype != work:
            bias = bias.to(work)
        covered = 0
        for target, start, length, deltas in plan:
            covered += length
            if length == features and len(deltas) == 1:  # the common case: no slicing
                _add_block_product_rows(src, deltas[0], bias, None if in_place else out)
                continue
            for dt, n, b in zip(deltas, target.layer.num_blocks, target.layer.block_sizes):
                cols = slice(start, start + n * b)
                _add_block_product_rows(src[:, cols], dt, None if bias is None else bias[cols],
                                        None if in_place else out[:, cols])
                start += n * b
        if covered < features and not in_place:
            done = 0
            for start, length in sorted(spans) + [(features, 0)]:
                if start > done:
                    out[:, done:start].copy_(src[:, done:start])
                done = max(done, start + length)
        out = out.view(y.shape)
        return out if out.dtype == y.dtype else out.to(y.dtype)

    def _add_delta(self, target: _BypassTarget, src: torch.Tensor, out: torch.Tensor, work: torch.dtype) -> None:
        """out += (M − I)·src on the feature axis (diagonal blocks), in `work` dtype; a Linear's `out` must be
        viewable as (rows, features) (a feature slice of a contiguous tensor)."""
        start = 0
        deltas = self._deltas(target, src.device, work, transposed=not self.conv)
        for d, n, b in zip(deltas, target.layer.num_blocks, target.layer.block_sizes):
            if self.conv:
                z = src[:, start: start + n * b]
                out[:, start: start + n * b] += torch.matmul(d, z.reshape(z.shape[0], n, b, -1)).reshape(z.shape)
            else:  # d is (B − I)ᵀ
                z = src[..., start: start + n * b].reshape(-1, n, b).transpose(0, 1)  # (n, N, b)
                # in place through strided views: the product adds straight into out's rows (v ↦ (B − I)·v)
                out[..., start: start + n * b].view(-1, n, b).transpose(0, 1).baddbmm_(z, d)
            start += n * b

    def post_hook(self, module, args, y):
        """Output side: y ← s ⊙ M·(y − b) + b per target, in attach order; input-side row scales: s ⊙ (y − b) + b."""
        scales = self._scales
        targets, plain, spans = self._out_plan()
        if not targets and not scales:
            return None
        bias = self.bias_of(module, y.dtype, y.device)
        if plain:
            return self._post_delta(y, bias, targets, spans)
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
