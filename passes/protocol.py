"""The method protocol: every method offers, for each site of an analysed model, a list of candidates.

A site is what one decision is about: a symmetric group (its width) or a weight (its code). A candidate is
one setting of one method at one site: the bytes the site takes after it, the output error it predicts from
the calibration statistics (the relative L2 error of the consumer's output on the calibration moments; of
the weight itself where no statistics apply) and the payload its method's rewrite writes. Error and payload
are computed when first asked for, so offering a candidate costs nothing until a rule looks at it. Stacking
is a code candidate on a weight that a width candidate reduced: the code's sites are found on the reduced
model. A rule (symshrink.rules) picks at most one candidate per site; the offer's rewrite applies them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from onnx_ir.passes import InPlacePass

__all__ = ["Site", "Candidate", "Offer", "known"]


@dataclass(frozen=True)
class Site:
    name: str  # the group's name, the weight's node, or the tensor's name
    kind: str  # "group" (width), "weight" (a MatMul/Gemm weight's code) or "tensor" (a float tensor's code)
    shape: tuple[int, ...]
    bytes: int  # stored bytes now


def known(value: Any) -> Callable[[], Any]:
    """A value already computed, as the callable a Candidate holds."""
    return lambda: value


@dataclass(frozen=True)
class Candidate:
    site: str
    method: str
    setting: str  # printable: "ternary b64", "k=384", "lattice n255 K3"...
    bytes_after: int
    _error: Callable[[], float] = field(repr=False, compare=False)
    _payload: Callable[[], Any] = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_error", cache(self._error))
        object.__setattr__(self, "_payload", cache(self._payload))

    def predicted_error(self) -> float:
        return self._error()

    def payload(self) -> Any:
        return self._payload()


@dataclass
class Offer:
    """What one method offers on a model: its sites, their candidates (in the method's order) and the rewrite
    that writes a choice of at most one candidate per site (sites left out stay as they are)."""

    method: str
    sites: list[Site]
    candidates: dict[str, list[Candidate]]
    rewrite: Callable[[Mapping[str, Candidate]], InPlacePass]
    # start computing the payloads of a choice elsewhere (a cluster's workers), to be fetched when the rewrite runs
    prefetch: Callable[[Mapping[str, Candidate]], None] | None = None

    def table(self) -> str:
        """One line per site: its size and the byte range and settings of its candidates."""
        lines = [f"offer: method={self.method}, {len(self.sites)} sites",
                 f"  {'site':<40} {'kind':<7} {'MB':>8} {'candidates':>10} {'MB after':>18}"]
        for site in self.sites:
            options = self.candidates[site.name]
            low, high = min(c.bytes_after for c in options), max(c.bytes_after for c in options)
            lines.append(f"  {site.name[-40:]:<40} {site.kind:<7} {site.bytes / 1e6:>8.3f} {len(options):>10} "
                         f"{low / 1e6:>8.3f}-{high / 1e6:<9.3f}")
        return "\n".join(lines)
