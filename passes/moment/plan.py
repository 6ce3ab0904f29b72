"""The compression plan: which groups are rewritten, by which method, to which width.

Printable and JSON-serialisable; `--plan-out` writes it after a compress (with the units that were
kept), `--plan` replays it. The plan refers to groups by name and checks their producer and width.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from symshrink.errors import BadInput
from symshrink.passes.analysis.groups import Group

__all__ = ["GroupPlan", "Plan", "make_plan", "rewritable", "SELECTOR_KINDS"]

# the group kinds each selector of the moment method rewrites (fold merges producer parameters, which
# for heads would mix the softmax of different heads)
SELECTOR_KINDS = {
    "select": {"ffn", "swiglu", "conv", "heads"},
    "recombine": {"ffn", "swiglu", "conv", "heads"},
    "magnitude": {"ffn", "swiglu", "conv", "heads"},
    "fold": {"ffn", "swiglu", "conv"},
}


@dataclass
class GroupPlan:
    group: str
    kind: str
    where: str
    width: int
    keep_width: int
    kept: list[int] | None = None  # unit indices, filled in by the rewrite
    relative_error: float | None = None  # consumer-output error on calibration moments


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
            if isinstance(data, dict) and "groups" not in data and "moment" not in data and "layers" in data:
                raise BadInput("this plan records integer grids, not widths: replay it with --method quant")
            data = data.get("moment", data)  # the file --plan-out writes for --method moment,ternary
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
        lines = [f"plan: method={self.method} selector={self.selector} ridge={self.ridge}",
                 f"  {'group':<10} {'kind':<6} {'width':>6}    {'new':<6} {'rel.err':>8}  where"]
        for g in self.groups:
            err = "-" if g.relative_error is None else f"{g.relative_error:.2e}"
            new = g.keep_width if g.kept is None else len(g.kept)
            lines.append(f"  {g.group:<10} {g.kind:<6} {g.width:>6} -> {new:<6} {err:>8}  {g.where}")
        lines.append("  rel.err: the consumer's relative output error on the calibration moments (- : not computable)")
        return "\n".join(lines)

    def check_against(self, groups: list[Group]) -> None:
        """Refuse to replay a plan on a model whose groups differ from the plan's."""
        by_name = {g.name: g for g in groups}
        for planned in self.groups:
            found = by_name.get(planned.group)
            if found is None or not found.ok or found.where != planned.where or found.width != planned.width:
                raise BadInput(f"plan group {planned.group} ({planned.where}, width {planned.width}) "
                               "does not match this model")


def rewritable(groups: list[Group], method: str, selector: str) -> list[Group]:
    """The usable groups that this method and selector rewrite."""
    if method != "moment":
        raise BadInput(f"unknown method {method!r}; available: moment")
    kinds = SELECTOR_KINDS.get(selector)
    if kinds is None:
        raise BadInput(f"unknown selector {selector!r}; available: {', '.join(SELECTOR_KINDS)}")
    return [g for g in groups if g.ok and g.kind in kinds]


def make_plan(groups: list[Group], widths: dict[str, int], method: str = "moment", selector: str = "select",
              ridge: float = 1e-3) -> Plan:
    """A plan that takes each named group to its width (groups not in `widths` are left alone)."""
    plan = Plan(method=method, selector=selector, ridge=ridge)
    for g in groups:
        if g.name in widths:
            plan.groups.append(GroupPlan(g.name, g.kind, g.where, g.width, widths[g.name]))
    return plan
