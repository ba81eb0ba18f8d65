"""One validated description of an OFT adapter, whatever file format it came from.

Every reader turns its file into `OFTLayer` objects built by `make_layer`, which checks every field once, here, and
raises `OFTError` naming the file, the layer, what was expected and what was found. Everything downstream (rotation,
merge, bypass, bake, ComfyUI patches, writers) trusts these objects.

The convention, for every format (see `rotation.py` for the math):

    M = blockdiag(B_1, ..., B_n)          per split of the rotated axis (fused q|k|v layers have several splits)
    B = R or Rᵀ  (field `transpose`)      R = Cayley(Q) = (I + Q)(I − Q)⁻¹  or a Cayley–Neumann series in Q
    side "out":  W' = row_scale ⊙ (M · W)      rows (output features) rotated: kohya, LyCORIS, PEFT ≤ 0.13
    side "in":   W' = row_scale ⊙ (W · M)      columns (input features) rotated: PEFT ≥ 0.14

Conv kernels are flattened first: (out, in·kh·kw). A layer's `blocks` are what its file stores, in fp32: the
skew-symmetric generators Q, already skew-symmetrised the way the source tool does it (kohya/LyCORIS Q = A − Aᵀ, PEFT
Q = U − Uᵀ from the packed upper triangle, PEFT ≤ 0.15 Q = ½(A − Aᵀ)), or, for the parameterization "matrix" (old
LyCORIS `oft_diag`), the rotations R themselves. Biases are never changed.

| source format       | side | transpose | parameterization        | constraint                      | extra      |
|---------------------|------|-----------|-------------------------|---------------------------------|------------|
| kohya `networks.oft`| out  | yes       | Cayley                  | ‖Q‖_F ≤ alpha·out_dim per layer | -          |
| kohya `oft_flux`    | out  | yes       | Cayley                  | ‖Q‖_F ≤ alpha·split per split   | splits     |
| LyCORIS diag-oft    | out  | yes       | Cayley                  | as kohya; alpha 0 = none        | rescale    |
| LyCORIS `oft_diag`  | out  | yes       | matrix (R stored)       | none                            | rescale    |
| LyCORIS BOFT        | out  | no        | Cayley, butterfly stages| as kohya over all stages        | rescale    |
| PEFT ≥ 0.16         | in   | no / yes  | Cayley / Neumann        | COFT: ‖Q_i‖_F ≤ eps/√blocks     | block_share|
| PEFT ≤ 0.13         | out  | no        | Cayley of ½(A − Aᵀ)     | COFT                            | block_share|
| PEFT 0.14 – 0.15    | in   | no        | Cayley of ½(A − Aᵀ)     | COFT                            | oft_s rows |

(PEFT's exact branch is R = (I − Q)(I + Q)⁻¹ = Cayley(Q)ᵀ applied as W·Rᵀ, hence transpose "no"; its Neumann branch
approximates Cayley(Q), the transpose, applied the same way, hence "yes": the two give inverse rotations for the same
numbers, which is why `use_cayley_neumann` must come from adapter_config.json.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from operator import attrgetter, itemgetter
from typing import Literal, Mapping, Sequence

import torch

from .errors import OFTError, _mismatch

_Side = Literal["out", "in"]
_Kind = Literal["diag", "butterfly"]
_Parameterization = Literal["cayley", "neumann", "matrix"]  # "matrix": R itself is stored (old LyCORIS oft_diag)
_ConstraintKind = Literal["none", "norm_clamp", "block_projection"]
_COMPONENTS = ("unet", "te", "te1", "te2")
TE_COMPONENTS = _COMPONENTS[1:]  # the text encoders' components
_FP32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class Constraint:
    """How Q is bounded before the rotation is built.

    - ``none``.
    - ``norm_clamp`` (kohya, LyCORIS): ‖Q‖_F over all blocks of a split is clamped at ``value × split_size``
      (``value`` is the file's alpha, ``split_size`` the split's width, i.e. out_dim for an unfused layer).
    - ``block_projection`` (PEFT COFT): each block's ‖Q_i‖_F is projected to at most ``value / √stored_blocks``
      (``value`` is PEFT's eps).
    """

    kind: _ConstraintKind = "none"
    value: float = 0.0

    def describe(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "norm_clamp":
            return f"‖Q‖ ≤ {self.value:g}·dim"
        return f"COFT eps {self.value:g}"


@dataclass(frozen=True, eq=False)
class OFTLayer:
    """One adapted layer. Build it with `make_layer`, which validates it."""

    name: str  # the layer path as the file spells it, format prefix stripped (dotted or underscored)
    component: str  # "unet" | "te" | "te1" | "te2"
    side: _Side
    kind: _Kind
    # per split, fp32, (stored_blocks, b, b) (butterfly: (stages, n, b, b)): the stored blocks, i.e. the skew
    # generators Q (parameterization cayley / neumann) or the rotations R themselves (matrix)
    blocks: tuple[torch.Tensor, ...]
    num_blocks: tuple[int, ...]  # per split: blocks along the rotated axis (> stored blocks when block_share)
    transpose: bool
    parameterization: _Parameterization = "cayley"
    neumann_coeffs: tuple[float, ...] = ()  # coefficient of Q^k, k = 0, 1, ...
    constraint: Constraint = field(default_factory=Constraint)
    row_scale: torch.Tensor | None = None  # (out,) fp32: LyCORIS `rescale`, PEFT 0.14–0.15 `oft_s`
    source: str = ""  # format id, e.g. "kohya", "kohya_flux", "lycoris_diag_oft", "lycoris_boft", "peft"
    key: str = ""  # the file key prefix of this layer (for messages and writers)
    block_share: bool = False  # PEFT block_share: one stored block repeated along the axis (count set per weight)
    # OneTrainer: a convolution's weight is rotated by the transpose of what a Linear's is (its Conv2d path computes
    # W·R where its Linear path rotates the input, W·Rᵀ), and from the generators as stored (its COFT projection
    # was in the Linear path only); known only against the weight, so `resolve_for_weight` turns it into `transpose`
    # (flipped for a weight of more than 2 dimensions, whose constraint it drops) and clears it
    conv_transposed: bool = False
    # BOFT (kind "butterfly"): whose butterfly stages. "lycoris": LyCORIS BOFT, output side, stage k gathers
    # (c g k) -> (c k g), g = 2, k = 2^k · b/2 (`rotation._butterfly_index`). "peft": PEFT BOFT of several factors,
    # input side, W' = W·M with M the stages applied in order (each P Bᵀ Pᵀ, P PEFT's block butterfly permutation of
    # factor N − 1 − k, the file's factors reversed: `formats.peft`)
    butterfly: str = "lycoris"
    # A trained bias replacing the base layer's (PEFT `bias` "oft_only" / "boft_only": the adapted module's
    # `base_layer.bias`), fp32 (out,): at strength s the base bias b becomes b + s·(bias − b) (`rotation.adapted_bias`)
    bias: torch.Tensor | None = None

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return tuple(int(g.shape[-1]) for g in self.blocks)

    @property
    def split_sizes(self) -> tuple[int, ...]:
        return tuple(n * b for n, b in zip(self.num_blocks, self.block_sizes))

    @property
    def dim(self) -> int:
        """Width of the rotated axis (out_features for side "out", in_features·kh·kw for side "in")."""
        return sum(self.split_sizes)

    def num_params(self) -> int:
        """Free values stored: per stored block (× stages) b(b−1)/2 for a skew Q, b² for a stored R ("matrix"), plus
        the row scale; from the shapes alone (no tensor op per layer). tests/test_format_variants.py pins both."""
        per_block = (lambda b: b * b) if self.parameterization == "matrix" else (lambda b: b * (b - 1) // 2)
        n = sum(math.prod(g.shape[:-2]) * per_block(b) for g, b in zip(self.blocks, self.block_sizes))
        return n + (0 if self.row_scale is None else int(self.row_scale.numel()))

    def with_(self, **changes) -> "OFTLayer":
        return replace(self, **changes)


@dataclass(eq=False)
class OFTAdapter:
    """A whole adapter file: its layers (keyed by (component, name)), where it came from, and its metadata."""

    layers: dict[tuple[str, str], OFTLayer]
    format: str  # reader id
    path: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # reader facts worth showing (alpha, peft config, ...)
    # Per-layer strength policy, set by oft_core.blocks.with_block_strength (never by a reader):
    layer_strengths: Mapping[tuple[str, str], float] = field(default_factory=dict)  # per kept layer; 1 if absent
    block_spec: str | None = None  # the block spec(s) applied ("A then B"); None: none applied
    layers_off: int = 0  # how many layers the spec(s) switched off (dropped from `layers`)
    made_from: Mapping | None = None  # provenance: a JSON-able tree of the operations that made it; None: its file
    # writer family -> why no file of that format can hold this adapter (its writer refuses with the reason), e.g.
    # {"kohya": ...} for a family sd-scripts has no OFT network for (SD3, Wan, Qwen-Image, ...)
    refused_formats: Mapping[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers.values())

    def num_params(self) -> int:
        return sum(layer.num_params() for layer in self)


def _neumann_coefficients(terms: int, *, last_term_halved: bool) -> tuple[float, ...]:
    """Coefficients of I, Q, Q², ... of PEFT's Cayley–Neumann series, as each PEFT version computes it.

    PEFT ≥ 0.18: I + 2Q + 2Q² + … + 2Q^(n−2) + Q^(n−1) (for n = 3 and 4 PEFT's loop gives I + 2Q + 2Q² + Q³).
    PEFT 0.16–0.17: I + 2Q + 2Q² + … + 2Q^(n−1).
    """
    if terms < 1:
        raise OFTError(_mismatch("num_cayley_neumann_terms", "≥ 1", terms))
    coeffs = [1.0]
    if terms > 1:
        coeffs.append(2.0)
    if terms > 2:
        coeffs.append(2.0)
        if last_term_halved:
            coeffs += [2.0] * len(range(3, terms - 1))
            coeffs.append(1.0)
        else:
            coeffs += [2.0] * len(range(3, terms))
    return tuple(coeffs)


def make_layer(
    *,
    path: str,
    name: str,
    component: str = "unet",
    side: _Side,
    blocks: Sequence[torch.Tensor],
    transpose: bool,
    kind: _Kind = "diag",
    num_blocks: Sequence[int] | None = None,
    parameterization: _Parameterization = "cayley",
    neumann_coeffs: Sequence[float] = (),
    constraint: Constraint | None = None,
    row_scale: torch.Tensor | None = None,
    source: str = "",
    key: str = "",
    block_share: bool = False,
    conv_transposed: bool = False,
    butterfly: str = "lycoris",
    bias: torch.Tensor | None = None,
) -> OFTLayer:
    """Validate once and build an `OFTLayer`. `blocks`, per split, are the stored blocks: the skew generators Q,
    already skew-symmetric (parameterization cayley / neumann), or the rotations R themselves (matrix).

    One check per concern, in this order (the first failing one is raised, naming file and layer): the enumerations,
    the block tensors, the block counts, the butterfly layout, the parameterization, the constraint, the finite
    magnitudes the math cannot take (`_check_magnitudes`), the row scale. tests/test_bad_input.py,
    tests/test_fail_closed.py and tests/test_hostile_magnitudes.py pin the messages."""

    def fail(msg: str):
        raise OFTError(msg, path=path, layer=key or name)

    _check_choices(component, side, kind, fail)
    gens = _checked_blocks(blocks, kind, fail)
    num_blocks = _checked_block_counts(gens, num_blocks, block_share, fail)
    if kind == "butterfly":
        _check_butterfly(gens, num_blocks, side, butterfly, fail)
    coeffs = _checked_parameterization(parameterization, neumann_coeffs, constraint, fail)
    constraint = _checked_constraint(constraint or Constraint(), gens, num_blocks, fail)
    _check_magnitudes(gens, num_blocks, constraint, parameterization, coeffs,
                      blocks.finite if isinstance(blocks, _Blocks) else None, fail)
    dim = sum(n * int(g.shape[-1]) for g, n in zip(gens, num_blocks))
    row_scale = _checked_row_scale(row_scale, side, dim, fail)
    bias = _checked_bias(bias, side, dim, fail)
    return OFTLayer(
        name=name,
        component=component,
        side=side,
        kind=kind,
        blocks=tuple(gens),
        num_blocks=num_blocks,
        transpose=bool(transpose),
        parameterization=parameterization,
        neumann_coeffs=coeffs,
        constraint=constraint,
        row_scale=row_scale,
        source=source,
        key=key or name,
        block_share=bool(block_share),
        conv_transposed=bool(conv_transposed),
        butterfly=butterfly,
        bias=bias,
    )


def _make_layers(
    *,
    path: str,
    names: Sequence[str],
    keys: Sequence[str],
    blocks: Sequence[Sequence[torch.Tensor]],
    finite: Sequence[Sequence[bool]],
    constraints: Sequence[Constraint],
    sources: Sequence[str],
    facts: Sequence[tuple] | None = None,
    **common,
) -> list[OFTLayer]:
    """`make_layer` for many layers at once (a reader of 100,000 layers): row i is
    `make_layer(path=path, name=names[i], key=keys[i], blocks=_Blocks(blocks[i], finite[i]),
    constraint=constraints[i], source=sources[i], **common)`, and gives the same layer or raises the same error.

    The same checks, run once per distinct input: every check of `make_layer` depends only on the `common` fields,
    each generator's type, shape, dtype and requires_grad, the finiteness flags and the constraint (never on a
    layer's name, key or source, nor on the values beyond the flags, when they are all true). So the first row of
    each distinct such signature goes through `make_layer` itself, and every later row of that signature passes the
    same checks and is built like it; a row with a false flag (NaN / Inf, or a norm beyond float32: which one, only
    its values say) always goes through `make_layer` itself. Rows are checked in order: the error raised is the first
    failing row's, as when each layer is built in turn (tests/test_batched_read.py feeds the same bad values through
    both).

    `facts` (optional): per row, `_tensor_facts` of its one generator as the caller already knows it (the views of
    one unbound batch share one such tuple), so that 100,000 rows need no four attribute reads each."""
    rows = len(names)
    if not len(keys) == len(blocks) == len(finite) == len(constraints) == len(sources) == rows:
        raise ValueError("make_layers: every per-layer sequence needs one item per layer")
    blocks = list(map(tuple, blocks))
    finite = list(map(tuple, finite))
    signatures = _signatures(blocks, finite, constraints, facts)
    # each row's signature named by the row where it first occurs (one hash of a signature per row; the dict keeps
    # those first rows in row order)
    first_row: dict = {}
    first_of = list(map(first_row.setdefault, signatures, range(rows))) if signatures is not None else [None] * rows
    # the first row of each signature, in row order: through make_layer (so the first failing row raises first)
    first: dict = {}
    for i in first_row.values():
        layer = make_layer(path=path, name=names[i], key=keys[i], blocks=_Blocks(blocks[i], finite[i]),
                           constraint=constraints[i], source=sources[i], **common)
        # later rows are built like it only when make_layer kept the caller's tensors as they are (fp32, no grad)
        # and made no row scale of its own, and its flags were all true (a false flag is looked at value by value:
        # NaN / Inf, or a norm beyond float32, see `_check_magnitudes`)
        if layer.row_scale is None and all(a is b for a, b in zip(layer.blocks, blocks[i])) and all(finite[i]):
            first[i] = layer
    new, set_fields = object.__new__, object.__setattr__
    out = []
    for i, f in enumerate(first_of):
        like = first.get(f)
        if like is None or f == i:
            out.append(like if like is not None else make_layer(
                path=path, name=names[i], key=keys[i], blocks=_Blocks(blocks[i], finite[i]),
                constraint=constraints[i], source=sources[i], **common))
            continue
        # frozen dataclass: its __setattr__ refuses, so the fields are filled like dataclasses.replace would, without
        # its per-field overhead (a layer of 14 fields took 2.6 µs; 100,000 of them a quarter second): a copy of the
        # first row's field dict (one C copy; updating an empty one key by key took a quarter longer), 4 replaced
        fields = like.__dict__.copy()
        fields["name"] = names[i]
        fields["key"] = keys[i] or names[i]
        fields["blocks"] = blocks[i]
        fields["source"] = sources[i]  # the constraint: the very object (the signature holds its identity)
        layer = new(OFTLayer)
        set_fields(layer, "__dict__", fields)
        out.append(layer)
    return out


_TENSOR_FACTS = (attrgetter("shape"), attrgetter("dtype"), attrgetter("requires_grad"))


def _tensor_facts(t: torch.Tensor) -> tuple:
    """What `make_layer`'s checks read of a generator tensor: its type, shape, dtype and requires_grad (the views
    `unbind` makes of one batch share all four)."""
    return (type(t), t.shape, t.dtype, t.requires_grad)


def _signatures(generators: list[tuple], finite: list[tuple], constraints: Sequence,
                facts: Sequence[tuple] | None = None) -> list[tuple] | None:
    """Per row, everything `make_layer`'s checks depend on besides the common fields: each generator's type, shape,
    dtype and requires_grad, the finiteness flags and the constraint (by identity: equal objects apart only cost a
    check more). Computed column by column (no Python step per row); None when a row is not one tensor (the rows then
    go through `make_layer` one by one, which says what is wrong)."""
    try:
        if set(map(len, generators)) != {1}:
            return None
        if facts is not None:  # `_tensor_facts` of each row's one tensor, from the caller
            if len(facts) != len(generators):
                raise ValueError("make_layers: every per-layer sequence needs one item per layer")
            if not all(issubclass(f[0], torch.Tensor) for f in set(facts)):
                return None
            return list(zip(facts, finite, map(id, constraints)))
        tensors = list(map(itemgetter(0), generators))
        if not all(issubclass(t, torch.Tensor) for t in set(map(type, tensors))):
            return None
        columns = [list(map(type, tensors))] + [list(map(fact, tensors)) for fact in _TENSOR_FACTS]
        return list(zip(zip(*columns), finite, map(id, constraints)))
    except (AttributeError, TypeError):
        return None


class _Blocks(tuple):
    """A layer's stored blocks with `finite[i]`: whether split i (as fp32) holds no NaN / Inf, computed for many
    layers at once by `_finite_each`, so that `make_layer` checks finiteness without one tensor op per layer. It is
    the same check on the same values: the readers pass the exact tensors the flags were computed on."""

    finite: tuple[bool, ...]

    def __new__(cls, tensors: Sequence[torch.Tensor], finite: Sequence[bool]):
        self = super().__new__(cls, tensors)
        if len(finite) != len(self):
            raise ValueError(f"{len(finite)} finiteness flags for {len(self)} tensors")
        self.finite = tuple(bool(f) for f in finite)
        return self


def _finite_each(stacked: torch.Tensor) -> list[bool]:
    """Per index of the first axis of `stacked` (many layers' stored blocks of one shape, fp32): no NaN / Inf, and a
    Frobenius norm that fits in float32 (the norm clamp divides by it; `_check_magnitudes` says which of the two a
    false flag means). A meta batch (a structure-only skeleton) counts as finite, as `make_layer` counts a meta
    tensor."""
    n = int(stacked.shape[0])
    if stacked.device.type == "meta" or stacked.numel() == 0:
        return [True] * n
    flat = stacked.reshape(-1)
    # Σ x² over the batch: a NaN or Inf anywhere makes it one, and no row's exceeds it (the norm clamp's ‖Q‖ = √Σ x²
    # in float32); one BLAS dot, as fast as a sum (a vector_norm took twice as long). Non-finite: per-row norms below
    if bool(torch.isfinite(torch.dot(flat, flat))):
        return [True] * n
    return torch.isfinite(torch.linalg.vector_norm(stacked.reshape(n, -1), dim=1)).tolist()


def _check_choices(component: str, side: str, kind: str, fail) -> None:
    if component not in _COMPONENTS:
        fail(_mismatch("component", " | ".join(_COMPONENTS), repr(component)))
    if side not in ("out", "in"):
        fail(_mismatch("rotated side", "'out' or 'in'", repr(side)))
    if kind not in ("diag", "butterfly"):
        fail(_mismatch("kind", "'diag' or 'butterfly'", repr(kind)))


def _checked_blocks(blocks: Sequence[torch.Tensor], kind: str, fail) -> list[torch.Tensor]:
    """Per split: a tensor of square blocks (4-D for butterfly stages), at least one block, finite, as fp32.
    A tensor on the meta device is a structure-only skeleton (bake streams the values later): not checked for NaN.
    `_Blocks` carry their finiteness from one batched check of many layers (`_finite_each`)."""
    if not blocks:
        fail("no rotation blocks")
    known = blocks.finite if isinstance(blocks, _Blocks) else None
    want_ndim = 4 if kind == "butterfly" else 3
    gens = []
    for i, g in enumerate(blocks):
        if not isinstance(g, torch.Tensor) or g.ndim != want_ndim or g.shape[-1] != g.shape[-2] or g.shape[-1] < 1:
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            fail(_mismatch(f"split {i} blocks", f"{want_ndim}-D tensor of square blocks", shape))
        if g.numel() == 0:
            fail(_mismatch(f"split {i} blocks", "at least one block", tuple(g.shape)))
        g = g.detach() if g.requires_grad else g
        g = g if g.dtype == torch.float32 else g.to(torch.float32)
        finite = known[i] if known is not None else g.device.type == "meta" or bool(torch.isfinite(g).all())
        if not finite and not (known is not None and _norm_overflows(g)):  # a false flag may mean a huge norm only
            fail(f"split {i} blocks contain NaN or Inf values: the file is damaged or the training diverged")
        gens.append(g)
    if kind == "butterfly" and len(gens) != 1:
        fail(_mismatch("butterfly splits", 1, len(gens)))
    return gens


def _checked_block_counts(gens: list[torch.Tensor], num_blocks: Sequence[int] | None, block_share: bool,
                          fail) -> tuple[int, ...]:
    """One count per split, equal to the stored blocks, except one shared stored block (PEFT block_share)."""
    if num_blocks is None:
        num_blocks = [int(g.shape[-3]) for g in gens]
    num_blocks = tuple(int(n) for n in num_blocks)
    if len(num_blocks) != len(gens):
        fail(_mismatch("block counts", f"one per split ({len(gens)})", len(num_blocks)))
    for i, (g, n) in enumerate(zip(gens, num_blocks)):
        stored = int(g.shape[-3])
        if block_share and (stored != 1 or len(gens) != 1):
            fail(_mismatch("shared blocks (block_share)", "one stored block", f"{stored} in split {i}"))
        if n < 1 or (stored != n and not block_share):
            fail(_mismatch(f"split {i} block count", stored, n))
    return num_blocks


def _check_butterfly(gens: list[torch.Tensor], num_blocks: tuple[int, ...], side: str, butterfly: str,
                     fail) -> None:
    """LyCORIS BOFT: output side, even block size, a power-of-two block count, at most log2(n) + 1 stages. PEFT BOFT
    (as PEFT's BOFTLayer checks its config): input side, even block size and count, the count a multiple of
    2^(stages − 1), at most log2(n) + 1 stages."""
    if butterfly not in ("lycoris", "peft"):
        fail(_mismatch("butterfly stages", "'lycoris' or 'peft'", repr(butterfly)))
    if butterfly == "peft":
        b, n, stages = int(gens[0].shape[-1]), num_blocks[0], int(gens[0].shape[0])
        if side != "in":
            fail(_mismatch("PEFT BOFT rotated side", "'in'", repr(side)))
        if stages > 1 and (b % 2 or n % 2 or n % 2 ** (stages - 1) or 2 ** (stages - 1) > n):
            fail(_mismatch("PEFT BOFT layout", f"an even block size, and a block count that 2^{stages - 1} "
                           f"divides ({stages} butterfly factors)", f"b={b}, n={n}"))
        return
    if side != "out":
        fail(_mismatch("butterfly (BOFT) rotated side", "'out'", repr(side)))
    b = int(gens[0].shape[-1])
    n = num_blocks[0]
    if b % 2 or (n & (n - 1)):
        fail(_mismatch("butterfly layout", "even block size and a power-of-two block count", f"b={b}, n={n}"))
    if int(gens[0].shape[0]) > max(1, int(math.log2(n)) + 1):
        fail(_mismatch("butterfly stages", f"at most {int(math.log2(n)) + 1} for {n} blocks", gens[0].shape[0]))


def _checked_parameterization(parameterization: str, neumann_coeffs: Sequence[float], constraint: Constraint | None,
                              fail) -> tuple[float, ...]:
    """The series coefficients (required for Cayley–Neumann); a stored R carries no constraint."""
    if parameterization == "matrix" and constraint is not None and constraint.kind != "none":
        fail("a stored rotation matrix (LyCORIS oft_diag) cannot carry a constraint")
    if parameterization not in ("cayley", "neumann", "matrix"):
        fail(_mismatch("parameterization", "'cayley', 'neumann' or 'matrix'", repr(parameterization)))
    coeffs = tuple(float(c) for c in neumann_coeffs)
    if parameterization == "neumann" and not coeffs:
        fail("Cayley–Neumann parameterization without series coefficients")
    return coeffs


def _checked_constraint(constraint: Constraint, gens: list[torch.Tensor], num_blocks: tuple[int, ...],
                        fail) -> Constraint:
    """A known kind and a finite value ≥ 0 whose bound fits in float32 (kohya's NaN alpha and LyCORIS's are refused
    the same way; an alpha × width beyond fp32 fails in sd-scripts and LyCORIS: "cannot be converted ... overflow")."""
    if constraint.kind not in ("none", "norm_clamp", "block_projection"):
        fail(_mismatch("constraint", "none | norm_clamp | block_projection", repr(constraint.kind)))
    what = "constraint (alpha)" if constraint.kind == "norm_clamp" else "constraint (eps)"
    if not math.isfinite(constraint.value) or constraint.value < 0:
        fail(_mismatch(what, "a finite number ≥ 0", constraint.value))
    widest = max(n * int(g.shape[-1]) for g, n in zip(gens, num_blocks))
    if constraint.kind == "norm_clamp" and constraint.value * widest > _FP32_MAX:
        fail(_mismatch(what, f"at most {_FP32_MAX / widest:.3g} (alpha × {widest} rows must fit in float32)",
                      f"{constraint.value:g}"))
    if constraint.kind == "block_projection" and constraint.value > _FP32_MAX:
        fail(_mismatch(what, f"at most {_FP32_MAX:.3g} (it must fit in float32)", f"{constraint.value:g}"))
    return constraint


def _norm_overflows(g: torch.Tensor) -> bool:
    """All of `g`'s values are finite but its Frobenius norm is not, in float32 (‖g‖² beyond 3.4·10³⁸)."""
    return bool(torch.isfinite(g).all()) and not bool(torch.isfinite(torch.linalg.vector_norm(g)))


def _check_magnitudes(gens: list[torch.Tensor], num_blocks: tuple[int, ...], constraint: Constraint,
                      parameterization: str, coeffs: tuple[float, ...], finite: tuple[bool, ...] | None,
                      fail) -> None:
    """Finite values whose size still breaks the math in float32, refused by name instead of giving a silently
    wrong rotation (a finite value is otherwise never refused: the Cayley map is defined for every skew Q, a stored
    R is applied as it is):

    - a constraint divides Q by its norm (‖Q‖_F of the split, or of each block for COFT); when that norm overflows
      float32 (values ≳ 10¹⁹) sd-scripts, LyCORIS and PEFT compute it as Inf and scale Q by c/Inf = 0: the layer
      silently becomes the identity. Its right value (Q scaled down to the bound) is not what any of them computes,
      so the file is refused;
    - the Cayley–Neumann series Σ c_k Q^k (PEFT) of the constrained Q overflows float32 (then PEFT's own R holds Inf
      and NaN): refused when Σ |c_k|·ρ^k, ρ the largest block's ‖Q_i‖_F after the constraint, exceeds float32's
      largest value (that bounds every entry and every partial sum of the series' products, so below it the series
      is finite; above it, for ρ ≥ 10⁹ with 5 terms, its entries are ~10³⁶ and any weight it multiplies overflows).

    `finite`: the batched flags (`_Blocks`); a true flag proves the split's norm finite, so nothing is computed."""
    for i, (g, n) in enumerate(zip(gens, num_blocks)):
        if g.device.type == "meta":
            continue
        if constraint.kind != "none" and (finite is None or not finite[i]):
            norms = torch.linalg.vector_norm(g) if constraint.kind == "norm_clamp" else torch.linalg.matrix_norm(g)
            if not bool(torch.isfinite(norms).all()):
                which = "‖Q‖_F of the split" if constraint.kind == "norm_clamp" else "a block's ‖Q_i‖_F"
                fail(f"split {i}: " + _norm_overflow_text(which, g, constraint))
        if parameterization != "neumann":
            continue
        rho = float(torch.linalg.matrix_norm(g).max())  # ≥ every block's spectral norm
        if constraint.kind == "norm_clamp":
            rho = min(float(torch.linalg.vector_norm(g)), constraint.value * n * int(g.shape[-1]))
        elif constraint.kind == "block_projection":
            rho = min(rho, constraint.value / math.sqrt(g.shape[-3]))
        if _series_bound(coeffs, rho) > _FP32_MAX:
            limit = _largest_series_norm(coeffs)
            fail(_mismatch(f"split {i}: Cayley–Neumann series of {len(coeffs)} terms", f"blocks with ‖Q_i‖_F ≤ "
                           f"{limit:.3g} (after the constraint), so that Σ c_k Q^k fits in float32 (PEFT itself gets "
                           "Inf / NaN weights beyond)",
                           f"‖Q_i‖_F up to {rho:.3g}" if math.isfinite(rho) else "‖Q_i‖_F beyond float32"))


def _norm_overflow_text(which: str, g: torch.Tensor, constraint: Constraint) -> str:
    """The refusal of a constrained layer whose norm overflows float32 (also PEFT ≤ 0.15's projection of A)."""
    return (f"{which} overflows float32 (largest |value| {float(g.abs().max()):.3g}): the constraint "
            f"({constraint.describe()}) divides by that norm, which sd-scripts, LyCORIS and PEFT compute as Inf, "
            "silently turning the layer into the identity; the file is damaged or the training diverged")


def _series_bound(coeffs: Sequence[float], rho: float) -> float:
    """Σ |c_k|·ρ^k in float64, Inf once it passes float32's largest value (no Python OverflowError)."""
    total, power = 0.0, 1.0
    for k, c in enumerate(coeffs):
        if k:
            power *= rho
        total += abs(c) * power
        if not total <= _FP32_MAX:
            return math.inf
    return total


def _largest_series_norm(coeffs: Sequence[float]) -> float:
    """The largest ρ with `_series_bound(coeffs, ρ)` ≤ float32's largest value (bisection on a log scale)."""
    lo, hi = 0.0, _FP32_MAX
    for _ in range(200):
        mid = math.sqrt(max(lo, 1e-300) * hi)
        lo, hi = (mid, hi) if _series_bound(coeffs, mid) <= _FP32_MAX else (lo, mid)
    return lo


def _checked_row_scale(row_scale: torch.Tensor | None, side: str, dim: int, fail) -> torch.Tensor | None:
    """fp32, flat, finite; one value per rotated output row (an input-side layer's rows are checked per weight)."""
    if row_scale is None:
        return None
    row_scale = row_scale.detach().to(torch.float32).reshape(-1)
    if row_scale.device.type != "meta" and not torch.isfinite(row_scale).all():
        fail("row scale (rescale / oft_s) contains NaN or Inf values")
    if side == "out" and row_scale.numel() != dim:
        fail(_mismatch("row scale length", f"{dim} (the rotated output width)", row_scale.numel()))
    return row_scale


def _checked_bias(bias: torch.Tensor | None, side: str, dim: int, fail) -> torch.Tensor | None:
    """A trained bias: fp32, one axis, finite; one value per output row (an input-side layer's rows are checked per
    weight)."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or bias.ndim != 1 or not bias.is_floating_point():
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        fail(_mismatch("trained bias", "a floating-point vector (out,)", shape))
    bias = bias.detach().to(torch.float32)
    if bias.device.type != "meta" and not torch.isfinite(bias).all():
        fail("trained bias contains NaN or Inf values")
    if side == "out" and bias.numel() != dim:
        fail(_mismatch("trained bias length", f"{dim} (the rotated output width)", bias.numel()))
    return bias


def _flatten_weight_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(out, in·kh·kw) of a Linear or Conv weight shape."""
    out = int(shape[0])
    rest = 1
    for s in shape[1:]:
        rest *= int(s)
    return out, rest


def resolve_for_weight(layer: OFTLayer, shape: Sequence[int], *, path: str = "",
                       weight_name: str = "weight") -> OFTLayer:
    """Check that `layer` fits a base weight of `shape` and resolve what depends on it: shared block counts (PEFT
    block_share) and OneTrainer's convolution convention (`conv_transposed`).

    Raises `OFTError` naming the layer with the expected and found sizes.
    """
    if len(shape) < 2:
        raise OFTError(_mismatch("base weight", "a Linear or Conv weight (2-D or more)", tuple(shape)), path=path,
                       layer=layer.key)
    out, inner = _flatten_weight_shape(shape)
    axis = out if layer.side == "out" else inner
    what = "output features" if layer.side == "out" else "input features (× kernel)"
    if layer.block_share:
        b = layer.block_sizes[0]
        if axis % b:
            raise OFTError(_mismatch(f"{what} divisible by the shared block size {b}", f"a multiple of {b}", axis),
                           path=path, layer=layer.key)
        layer = layer.with_(num_blocks=(axis // b,))
    if layer.dim != axis:
        blocks = " + ".join(f"{n}×{b}" for n, b in zip(layer.num_blocks, layer.block_sizes))
        raise OFTError(
            _mismatch(f"base {what}", f"{layer.dim} (= {blocks} blocks of the adapter)",
                     f"{axis} in {weight_name} {tuple(shape)}")
            + ": the adapter was made for another model or architecture",
            path=path,
            layer=layer.key,
        )
    if layer.row_scale is not None and layer.row_scale.numel() != out:
        raise OFTError(_mismatch("row scale length", out, layer.row_scale.numel()), path=path, layer=layer.key)
    if layer.bias is not None and layer.bias.numel() != out:
        raise OFTError(_mismatch("trained bias length", f"{out} (the output rows of {weight_name} {tuple(shape)})",
                                 layer.bias.numel()), path=path, layer=layer.key)
    if layer.conv_transposed:
        conv = len(shape) > 2  # OneTrainer's convolution path: W·R, of the generators as stored (no COFT)
        layer = layer.with_(conv_transposed=False, transpose=layer.transpose != conv,
                            constraint=Constraint() if conv else layer.constraint)
    return layer

