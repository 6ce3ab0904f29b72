"""The compression plan: which groups are rewritten, by which method, to which width.

Printable and JSON-serialisable; `--plan-out` writes it after a compress (with the units that were
kept), `--plan` replays it. The plan refers to groups by name and checks their producer and width.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from symshrink.errors import BadInput
from symshrink.passes.analysis import Group

__all__ = ["GroupPlan", "Plan", "make_plan", "REWRITABLE_KINDS"]

REWRITABLE_KINDS = {"moment": {"ffn"}}


@dataclass
class GroupPlan:
    group: str
    kind: str
    where: str
    width: int
    keep_width: int
    kept: list[int] | None = None  # unit indices, filled in by the rewrite
    relative_error: float | None = None  # consumer-output error on calibration activations


@dataclass
class Plan:
    method: str
    selector: str = "select"
    ridge: float = 1e-3
    groups: list[GroupPlan] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
            groups = [GroupPlan(**g) for g in data.pop("groups")]
            return cls(groups=groups, **data)
        except (ValueError, TypeError, KeyError) as err:
            raise BadInput(f"not a symshrink plan: {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            return cls.from_json(Path(path).read_text())
        except OSError as err:
            raise BadInput(f"cannot read plan {path}: {err.strerror}") from None

    def __str__(self) -> str:
        lines = [f"plan: method={self.method} selector={self.selector} ridge={self.ridge}"]
        for g in self.groups:
            err = "" if g.relative_error is None else f"  rel.err {g.relative_error:.2e}"
            lines.append(f"  {g.group:<10} {g.kind:<6} {g.width:>6} -> {g.keep_width:<6}{err}  {g.where}")
        return "\n".join(lines)

    def check_against(self, groups: list[Group]) -> None:
        """Refuse to replay a plan on a model whose groups differ from the plan's."""
        by_name = {g.name: g for g in groups}
        for planned in self.groups:
            found = by_name.get(planned.group)
            if found is None or not found.ok or found.where != planned.where or found.width != planned.width:
                raise BadInput(f"plan group {planned.group} ({planned.where}, width {planned.width}) "
                               "does not match this model")


def make_plan(groups: list[Group], method: str, keep: float | None = None, width: int | None = None,
              ridge: float = 1e-3) -> Plan:
    """One width rule for every rewritable group: a kept fraction, or a fixed width (capped at d)."""
    if (keep is None) == (width is None):
        raise BadInput("give exactly one of --keep FRACTION or --width K")
    if keep is not None and not 0 < keep <= 1:
        raise BadInput(f"--keep must be in (0, 1], got {keep}")
    if width is not None and width < 1:
        raise BadInput(f"--width must be >= 1, got {width}")
    kinds = REWRITABLE_KINDS.get(method)
    if kinds is None:
        raise BadInput(f"unknown method {method!r}; available: {', '.join(REWRITABLE_KINDS)}")
    plan = Plan(method=method, ridge=ridge)
    for g in groups:
        if g.ok and g.kind in kinds:
            k = max(1, math.ceil(keep * g.width)) if keep is not None else min(width, g.width)
            plan.groups.append(GroupPlan(g.name, g.kind, g.where, g.width, k))
    return plan
