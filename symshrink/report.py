"""The compress report: what each method planned, what verification measured, and whether the gate held.

Printed by the CLI, returned by the API, written with `--report PATH` as JSON (.json), Markdown (.md) or one HTML
page (.html), with a table of the weight sites; also when the gate fails, so a user sees why nothing was written.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from symshrink.errors import BadInput
from symshrink.modelio import write_atomically
from symshrink.passes.analysis.groups import Group
from symshrink.passes.hyper.codes import HyperPlan
from symshrink.passes.moment.plan import Plan
from symshrink.passes.quant.grid import GridPlan
from symshrink.passes.ternary.codes import TernaryPlan
from symshrink.runtime.diff import OutputDiff, format_diffs

__all__ = ["CompressReport", "write_report", "check_report_path", "REPORT_SUFFIXES"]

REPORT_SUFFIXES = (".json", ".md", ".html")
SITE_COLUMNS = ("node", "op", "shape", "codec", "block", "bpw", "bytes", "predicted", "reason")


@dataclass
class CompressReport:
    source: str
    output: str
    bytes_before: int
    holdout_feeds: int = 0
    methods: list[str] = field(default_factory=list)
    plan: Plan | None = None  # moment reduction's
    ternary: TernaryPlan | None = None
    quant: GridPlan | None = None
    hyper: HyperPlan | None = None
    diffs: list[OutputDiff] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # the gate's; empty: within tolerance
    bytes_after: int = 0  # on disk; when the gate failed, what the file would have been
    skipped: list[Group] = field(default_factory=list)
    parameters: int = 0  # float weights of the original model (initializers): the denominator of bits per weight
    task: dict | None = None  # --max-loss: the task, the original's metric, the new one's, the relative loss

    @property
    def passed(self) -> bool:
        return not self.failures

    def plans(self) -> dict[str, Plan | TernaryPlan | GridPlan | HyperPlan]:
        named = (("moment", self.plan), ("ternary", self.ternary), ("quant", self.quant), ("hyper", self.hyper))
        return {name: plan for name, plan in named if plan is not None}

    def plan_json(self) -> str:
        """The plans as JSON: the moment plan alone (replayable with --plan), the ternary plan alone,
        or both under their method's name."""
        plans = self.plans()
        if len(plans) == 1:
            return next(iter(plans.values())).to_json()
        return json.dumps({name: json.loads(plan.to_json()) for name, plan in plans.items()}, indent=2)

    def bits_per_weight(self, nbytes: int) -> str:
        """llama.cpp's measure: bits of the file per weight of the original model (" (32.08 bpw)"; "" unknown)."""
        return f" ({8 * nbytes / self.parameters:.2f} bpw)" if self.parameters else ""

    def size_line(self) -> str:
        """`90.39 MB (32.01 bpw) -> 14.35 MB (5.08 bpw), 0.159x`, as llama.cpp's quantizer reports it."""
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else float("nan")
        return (f"{self.bytes_before / 1e6:.2f} MB{self.bits_per_weight(self.bytes_before)} -> "
                f"{self.bytes_after / 1e6:.2f} MB{self.bits_per_weight(self.bytes_after)}, {ratio:.3f}x")

    def summary(self) -> str:
        verdict = "within tolerance" if self.passed else "OUTSIDE tolerance, nothing written"
        return f"{self.source} -> {self.output or '(in memory)'}: {self.size_line()}{self.task_text()}, {verdict}"

    def task_text(self) -> str:
        """`, fmnist-accuracy 0.8962 (fp32 0.8994, loss 0.36%)` under --max-loss; "" otherwise."""
        if self.task is None:
            return ""
        return (f", {self.task['task']} {self.task['value']:.4g} (original {self.task['reference']:.4g}, loss "
                f"{100 * self.task['loss']:.2f}%)")

    def to_dict(self) -> dict:
        return {"source": self.source, "output": self.output, "methods": self.methods,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after, "parameters": self.parameters,
                "passed": self.passed, "task": self.task,
                "failures": self.failures, "holdout_feeds": self.holdout_feeds,
                "diffs": [d.to_dict() for d in self.diffs],
                "plans": {name: json.loads(plan.to_json()) for name, plan in self.plans().items()},
                "sites": self.site_rows(), "passed_over": self.passed_over(),
                "skipped_groups": [{"group": g.name, "kind": g.kind, "reason": g.reason} for g in self.skipped]}

    def site_rows(self) -> list[dict]:
        """The weight sites of the integer-grid plan, one row each (empty without one)."""
        return self.quant.site_rows() if self.quant is not None else []

    def passed_over(self) -> dict[str, str]:
        """Weight nodes the code methods left fp32 before offering anything, and why."""
        plans = [plan for plan in (self.ternary, self.quant) if plan is not None]
        return {node: why for plan in plans for node, why in plan.passed_over.items()}

    def sections(self) -> list[tuple[str, str, object]]:
        """The report's sections after its summary, as (title, kind, content): kind "list" (lines), "pre" (text),
        "table" (rows of SITE_COLUMNS); Markdown and HTML render the same ones."""
        found: list[tuple[str, str, object]] = []
        if self.failures:
            found.append(("Gate failures", "list", self.failures))
        found.append((f"Held-out verification ({self.holdout_feeds} feeds)", "pre", format_diffs(self.diffs)))
        if self.site_rows():
            found.append(("Weight sites", "table", self.site_rows()))
        found += [(f"Plan: {name}", "pre", str(plan)) for name, plan in self.plans().items()]
        passed_over = self.passed_over()
        if passed_over:
            found.append(("Weights left fp32", "list", [f"{node}: {why}" for node, why in passed_over.items()]))
        if self.skipped:
            found.append(("Groups left as they are", "list", [f"{g.name} ({g.kind}): {g.reason}" for g in self.skipped]))
        return found

    def to_markdown(self) -> str:
        lines = ["# symshrink compress report", "", self.summary(), ""]
        for title, kind, content in self.sections():
            lines += [f"## {title}", ""]
            if kind == "list":
                lines += [f"- {line}" for line in content]
            elif kind == "pre":
                lines += ["```", content, "```"]
            else:
                lines += ["| " + " | ".join(SITE_COLUMNS) + " |",
                          "|" + "|".join("---:" if c in ("bpw", "bytes", "predicted") else "---" for c in SITE_COLUMNS) + "|",
                          *["| " + " | ".join(_cell(row[c]) for c in SITE_COLUMNS) + " |" for row in content]]
            lines.append("")
        return "\n".join(lines)

    def to_html(self) -> str:
        """The Markdown's sections as one page: the sites as a table, plans and diffs as text."""
        body = ["<h1>symshrink compress report</h1>", f"<p>{html.escape(self.summary())}</p>"]
        for title, kind, content in self.sections():
            body.append(f"<h2>{html.escape(title)}</h2>")
            if kind == "list":
                body += ["<ul>", *[f"<li>{html.escape(line)}</li>" for line in content], "</ul>"]
            elif kind == "pre":
                body.append(f"<pre>{html.escape(content)}</pre>")
            else:
                body += ["<table>", "<tr>" + "".join(f"<th>{c}</th>" for c in SITE_COLUMNS) + "</tr>",
                         *["<tr>" + "".join(f"<td>{html.escape(_cell(row[c]))}</td>" for c in SITE_COLUMNS) + "</tr>"
                           for row in content], "</table>"]
        style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:90%}"
                 "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}pre{background:#f6f6f6;padding:1em}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>symshrink report</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def check_report_path(path: str | Path) -> None:
    if Path(path).suffix.lower() not in REPORT_SUFFIXES:
        raise BadInput(f"--report {path}: give a .json, .md or .html file")


def render_report(report: CompressReport, path: str | Path) -> str:
    check_report_path(path)
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return json.dumps(report.to_dict(), indent=2)
    return report.to_html() if suffix == ".html" else report.to_markdown()


def write_report(report: CompressReport, path: str | Path) -> Path:
    """Atomically, as JSON or Markdown by the suffix (the caller has claimed the path)."""
    text = render_report(report, path)
    return write_atomically(path, lambda handle: handle.write(text.encode()))
