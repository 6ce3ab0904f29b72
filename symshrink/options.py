"""Typed options: one small dataclass per method and one for the run. Values are typed here (ints, floats,
tuples); the CLI parses its strings into them at its edge, the API checks keyword arguments against them.

One meaning per budget: `max_error` is the largest relative L2 error ||y - y'|| / ||y|| of any output on the
held-out feeds, wherever it appears (the gate, the moment width search, the ternary layer search, the
two-level activation search); `min_cosine` the smallest cosine of any output there. Per-layer and per-tensor
budgets have their own names (`layer_error`, `tensor_error`) and say what they measure.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from symshrink.calibration.feeds import LAYOUTS
from symshrink.errors import BadInput
from symshrink.passes.moment.plan import SELECTOR_KINDS
from symshrink.passes.quant.grid import ROUNDINGS
from symshrink.passes.ternary import codes as ternary
from symshrink.passes.ternary.codes import BLOCK_SIZES
from symshrink.runtime.formats import CODEBOOKS, GRID_BITS

__all__ = ["MomentOptions", "WeightOptions", "TernaryOptions", "QuantOptions", "HyperOptions", "CompressOptions",
           "METHODS", "DEFAULT_MIN_COSINE", "SELECTORS", "CORRECTIONS", "STORAGES", "BLOCK_SIZES", "CODEBOOKS", "LAYOUTS",
           "options_from"]

METHODS = ("moment", "ternary", "quant", "hyper")  # the order they run in when stacked
DEFAULT_MIN_COSINE = 0.99  # the budget of a run that names no method and no budget: cosine of every held-out output
SELECTORS = tuple(SELECTOR_KINDS)
CORRECTIONS = tuple(ternary.CORRECTIONS)
STORAGES = tuple(ternary.STORAGES)


def _one_of(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise BadInput(f"{name} must be one of {', '.join(map(str, allowed))}, not {value!r}")


def _positive(name: str, value: float | None, strict: bool = True) -> None:
    """A finite number above zero (`strict`) or at least zero; None passes (not given)."""
    if value is not None and not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
        raise BadInput(f"{name} must be {'positive' if strict else 'non-negative'} and finite, not {value}")


@dataclass(frozen=True)
class MomentOptions:
    """Width reduction of symmetric groups. Widths: `keep` (fraction per group), `width` (units per group),
    `sqrt_c` (k = ceil(C sqrt d)), `target_size` (bytes as an int, or a fraction of the input's size as a
    float), or the run's `max_error` alone (the widest reduction within it), or a `plan` file to replay."""

    selector: str = "select"
    keep: float | None = None
    width: int | None = None
    sqrt_c: float | None = None
    target_size: int | float | None = None
    ridge: float = 1e-3
    plan: str | Path | None = None

    def __post_init__(self) -> None:
        _one_of("selector", self.selector, SELECTORS)
        if self.keep is not None and not 0 < self.keep <= 1:
            raise BadInput(f"keep must be in (0, 1], not {self.keep}")
        _positive("width", self.width)
        _positive("sqrt_c (--width-rule sqrt:C)", self.sqrt_c)
        _positive("target_size", self.target_size)
        if isinstance(self.target_size, float) and self.target_size >= 1:
            raise BadInput(f"target_size as a fraction must be below 1, not {self.target_size}")
        _positive("ridge", self.ridge, strict=False)
        rules = [v for v in (self.keep, self.width, self.sqrt_c) if v is not None]
        if len(rules) > 1:
            raise BadInput("give one width rule: keep, width or sqrt_c")
        if rules and self.target_size is not None:
            raise BadInput("target_size is a budget of its own: give it without keep, width or sqrt_c")

    def has_widths(self) -> bool:
        return any(v is not None for v in (self.keep, self.width, self.sqrt_c, self.target_size, self.plan))


@dataclass(frozen=True)
class WeightOptions:
    """What the weight codes (ternary, integer grids) share: `block` input rows per scale (None: one per output
    column), the `layer_error` budget per layer on its relative output error on the calibration moments,
    `exclude`, fnmatch patterns of node or weight names kept fp32, and `rounding`: with error feedback on the
    input's second moment E[x x^T] (GPTQ-class), or to nearest (for ternary: the optimal ternary fit)."""

    block: int | None = 64
    layer_error: float | None = None
    exclude: tuple[str, ...] = ()
    rounding: str | None = None  # "feedback" or "nearest"; None: each method's default (quant feedback, the others nearest)

    def rounding_for(self, method: str) -> str:
        return self.rounding or {"quant": "feedback", "ternary": "nearest", "hyper": "nearest"}[method]

    def __post_init__(self) -> None:
        if self.rounding is not None:
            _one_of("rounding", self.rounding, ROUNDINGS)
        if self.block is not None:
            _one_of("block (--block-size)", self.block, BLOCK_SIZES)
        _positive("layer_error", self.layer_error)
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))  # one pattern, not its characters
        object.__setattr__(self, "exclude", tuple(self.exclude))


@dataclass(frozen=True)
class TernaryOptions:
    """Ternary codes for MatMul/Gemm weights: `correction` per output unit, the `storage` form, `activations`
    two-level to try the NTK-LC one. Over the per-layer budget a layer takes 8 bits, then stays fp32."""

    correction: str = "lstsq"
    activations: str = "relu"
    storage: str = "dequantize"

    def __post_init__(self) -> None:
        _one_of("correction", self.correction, CORRECTIONS)
        _one_of("activations", self.activations, ("relu", "two-level"))
        _one_of("storage", self.storage, STORAGES)


@dataclass(frozen=True)
class QuantOptions:
    """Integer grids for MatMul/Gemm/Conv weights and Gather tables: `bits` per weight for every layer (None: 4, or
    under a held-out budget or target size the allocator's choice per layer); with the per-layer budget, the fewest
    bits within it (else fp32). Symmetric grids (zero point 2^(bits-1), none stored)
    unless `zero_points`: a zero point per block, the grid over the block's range. `act_order`: second-moment
    rounding takes the input rows in order of decreasing E[x_i^2] (frames set first; the layout is unchanged).
    Convs other than 1x1 (which become MatMulNBits) stay fp32 unless `dequantize_convs`: DequantizeLinear -> Conv,
    smaller on disk, slower in onnxruntime."""

    bits: int | None = None
    zero_points: bool = False
    act_order: bool = True
    dequantize_convs: bool = False

    def __post_init__(self) -> None:
        if self.bits is not None:
            _one_of("bits", self.bits, GRID_BITS)

    def grid_bits(self) -> int:
        return 4 if self.bits is None else self.bits


@dataclass(frozen=True)
class HyperOptions:
    """Hyperfunction codes for every large float weight: per tensor the fewest bits whose relative error is
    within `tensor_error` among the settings the other fields span (index widths in bits per pair, or explicit
    codebook sizes `codes`; radial `bands`; the square's absolute `side`; weights per centre and span
    `group_size`, None: the tensor; `code_dims` weights per index)."""

    codebook: str = "lattice"
    tensor_error: float | None = 0.05
    index_bits: tuple[int, ...] = tuple(range(4, 14))
    codes: tuple[int, ...] = ()
    bands: tuple[int, ...] = (0, 1, 2, 3)
    side: float | None = None
    group_size: int | None = None
    code_dims: int = 2

    def __post_init__(self) -> None:
        _one_of("codebook", self.codebook, CODEBOOKS)
        _positive("tensor_error", self.tensor_error)
        _positive("side", self.side)
        _one_of("code_dims", self.code_dims, (2, 3))
        for name in ("index_bits", "codes", "bands"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.index_bits and not self.codes:
            raise BadInput("give index_bits or codes")
        if any(not 2 <= c <= 1 << 16 for c in self.codes):
            raise BadInput(f"codes (codebook sizes) must be 2 .. 65536, not {list(self.codes)}")
        if any(b < 0 for b in self.bands) or (self.codebook == "lattice" and not self.bands):
            raise BadInput(f"bands must be non-negative counts, at least one for the lattice, not {list(self.bands)}")


@dataclass
class CompressOptions:
    """One compress run: the methods in order, each method's options, calibration, the gate and the run's
    resources."""

    method: str | tuple[str, ...] | None = None  # "moment,ternary" or a sequence; a tuple in run order after init;
    # None: moment when widths are given, else the allocator over every packed code within the run's budget
    # (DEFAULT_MIN_COSINE when none is given)
    moment: MomentOptions = field(default_factory=MomentOptions)
    weights: WeightOptions = field(default_factory=WeightOptions)
    ternary: TernaryOptions = field(default_factory=TernaryOptions)
    quant: QuantOptions = field(default_factory=QuantOptions)
    hyper: HyperOptions = field(default_factory=HyperOptions)
    calib: object = None  # a zoo data set, a path, feed dicts or a CalibrationDataReader; None: the zoo model's
    calib_samples: int | None = None
    calib_layout: str = "batch"  # "batch": files split on axis 0; "runs": a leading axis of complete runs
    random_calib: bool = False
    plan_out: str | Path | None = None
    max_error: float | None = None  # see the module docstring
    min_cosine: float | None = None
    max_loss: float | None = None  # relative loss of `task`'s metric against the original model's
    task: str | Callable[[object], float] | None = None  # a zoo task name, or callable(session) -> metric (higher better)
    rows_per_batch: int = 4096  # activation rows kept per calibration batch and site (conv maps are subsampled)
    threads: int | None = None
    stream: bool | None = None  # block by block in bounded memory (None: when the input's weights pass 2 GB)
    block_bytes: int = 64 * 2**20  # weights per block when streaming
    cluster: str | None = None  # a Dask scheduler's address, or local:N: the streamed encodings run there
    progress: bool = True
    seed: int = 0

    auto: bool = False  # set when no method (and no moment width) was given: the allocator's default run

    def cosine_gate(self) -> float | None:
        """The smallest held-out cosine the gate accepts: min_cosine, or DEFAULT_MIN_COSINE when the run gives no
        budget at all (every run has a gate; a user widens it, never goes without one)."""
        if self.min_cosine is None and self.max_error is None and self.max_loss is None:
            return DEFAULT_MIN_COSINE
        return self.min_cosine

    def allocating(self) -> bool:
        """Whether the integer grids are allocated under a budget (the default run's, held-out gates the user gave or
        a target size), rather than set by --bits (given: the grid of every layer, the gate only verifies) or
        --layer-error. Not under hyper codes, whose error would come on
        top of the budget."""
        budget = self.auto or self.max_error is not None or self.max_loss is not None or self.moment.target_size is not None \
            or self.min_cosine is not None
        return budget and self.quant.bits is None and self.weights.layer_error is None and "hyper" not in self.method \
            and not ("moment" in self.method and self.moment.target_size is not None)  # moment's widths take it

    def streamable(self) -> bool:
        """Whether the run can go block by block: integer grids chosen per layer (--bits, --layer-error), no budget
        over the whole model to allocate."""
        return self.method == ("quant",) and not self.allocating() and self.moment.plan is None and self.max_loss is None

    def __post_init__(self) -> None:
        if self.method is None:
            self.method = "moment" if self.moment.has_widths() else "quant"
            self.auto = self.method == "quant"
        methods = [self.method] if isinstance(self.method, str) else list(self.method)
        if not all(isinstance(m, str) for m in methods):
            raise BadInput(f"method: a name or names ({', '.join(METHODS)}), not {self.method!r}")
        methods = [m.strip() for text in methods for m in text.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if not methods or unknown:
            raise BadInput(f"unknown method {', '.join(unknown) or repr(self.method)}; available: {', '.join(METHODS)} "
                           "(or several, comma-separated: moment,ternary, moment,hyper)")
        self.method = tuple(sorted(set(methods), key=METHODS.index))
        _one_of("calib_layout", self.calib_layout, LAYOUTS)
        _positive("calib_samples", self.calib_samples)
        _positive("max_error", self.max_error)
        _positive("max_loss", self.max_loss, strict=False)
        if self.task is not None and not (isinstance(self.task, str) or callable(self.task)):
            raise BadInput(f"task: a zoo task name or a callable(session) -> metric, not {type(self.task).__name__}")
        if self.task is not None and self.max_loss is None:
            raise BadInput("--task goes with --max-loss L (the largest relative loss of its metric)")
        _positive("rows_per_batch", self.rows_per_batch)
        _positive("threads", self.threads)
        _positive("block_bytes", self.block_bytes)
        if self.stream and not self.streamable():
            raise BadInput("--stream codes each layer by itself: give --method quant with --bits B or --layer-error E "
                           "(the allocator and the other methods run on the whole model)")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise BadInput(f"min_cosine must be in [-1, 1], not {self.min_cosine}")


_PARTS = {"moment": MomentOptions, "weights": WeightOptions, "ternary": TernaryOptions, "quant": QuantOptions,
          "hyper": HyperOptions}


def _check_type(name: str, value: object, hint: object) -> None:
    """isinstance against a field's annotation (X, X | None, tuple[X, ...]); ints pass where floats are asked,
    lists where tuples are (element by element), and `exclude` takes one string as one pattern."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    for kind in typing.get_args(hint) if union else (hint,):
        origin = typing.get_origin(kind) or kind
        if origin is tuple:
            element = typing.get_args(kind)[0] if typing.get_args(kind) else object
            if isinstance(value, str) and name == "exclude":
                return
            if isinstance(value, (list, tuple)) and all(_is(v, element) for v in value):
                return
        elif _is(value, origin):
            return
    allowed = typing.get_args(hint) if union else (hint,)
    names = " or ".join("None" if k is type(None) else str(k) if typing.get_origin(k) else getattr(k, "__name__", str(k))
                        for k in allowed)
    raise BadInput(f"option {name}: {names}, not {type(value).__name__} {value!r}")


def _is(value: object, kind: object) -> bool:
    if kind is object:
        return True
    if kind is type(None):
        return value is None
    if isinstance(value, bool) and kind in (int, float):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def options_from(**flat: object) -> CompressOptions:
    """CompressOptions from flat keyword arguments: each name is a field of the run or of one method's options
    (keep=0.5, block=32, index_bits=(8, 10)...), checked against its type."""
    owners: dict[str, type] = {f.name: CompressOptions for f in dataclasses.fields(CompressOptions)
                               if f.name not in _PARTS}
    for cls in _PARTS.values():
        owners.update({f.name: cls for f in dataclasses.fields(cls)})
    unknown = sorted(set(flat) - set(owners))
    if unknown:
        raise BadInput(f"unknown option {', '.join(unknown)}; available: {', '.join(sorted(owners))}")
    hints = {cls: typing.get_type_hints(cls) for cls in {*owners.values()}}
    for name, value in flat.items():
        _check_type(name, value, hints[owners[name]][name])
    parts = {part: cls(**{k: v for k, v in flat.items() if owners[k] is cls}) for part, cls in _PARTS.items()}
    return CompressOptions(**{k: v for k, v in flat.items() if owners[k] is CompressOptions}, **parts)
