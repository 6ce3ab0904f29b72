"""Today's per-method rules, as choices over a method's offer: what `--method X` picks on its own.

moment: one width rule for every group (keep, width, k = ceil(C sqrt d)), or the greedy path of least squared
error increase per byte saved, cut at a size target or at the most moves whose held-out error stays within
max_error (bisection, each step verified). ternary: ternary codes where within the per-layer budget, else 8 bits
within it, else fp32; with max_error alone, layers become ternary in order of their calibrated error, as many as
stay within it (the rest 8 bits). quant: every layer on the asked grid, or with a per-layer budget the fewest
bits within it, or with a held-out budget alone the allocator's plan (`symshrink.allocate`: per layer 8/4/2 bits or
fp32, a plan within it found by bisection, the fewest bytes when the error falls monotonically). hyper: per tensor
the fewest bytes within the tensor error target.
A rule only chooses: the verified searches get `error_of(chosen)`, the held-out error of a trial rewrite, from
the caller, and the offer's rewrite writes the choice.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from symshrink.allocate import allocate, allocate_bytes, plan_bytes, squared_error
from symshrink.errors import BadInput
from symshrink.options import HyperOptions, MomentOptions
from symshrink.passes.hyper.codes import pick_setting
from symshrink.passes.moment import budget
from symshrink.passes.protocol import Candidate, Offer

__all__ = ["Choice", "moment_rule", "ternary_rule", "quant_rule", "allocation_rule", "size_rule", "hyper_rule"]

Choice = dict[str, Candidate]  # at most one candidate per site
ErrorOf = Callable[[Choice], float]


def moment_rule(offer: Offer, options: MomentOptions, max_error: float | None, model_bytes: int,
                saved_after: Callable[[Choice], float], error_of: ErrorOf, progress: bool = False) -> Choice:
    """The width of every group: the options' rule, or the allocation path cut at the target size or within
    max_error."""
    full = {site.name: site.shape[0] for site in offer.sites}
    at_width = {site: {c.payload(): c for c in options} for site, options in offer.candidates.items()}

    def choice(widths: dict[str, int]) -> Choice:
        return {site: at_width[site][k] for site, k in widths.items()}

    if any(v is not None for v in (options.keep, options.width, options.sqrt_c)):
        return choice(budget.rule_widths(full, keep=options.keep, width=options.width, sqrt_c=options.sqrt_c))
    curves = {}
    for site in tqdm(offer.sites, desc="error curves", unit="group", disable=not progress, leave=False):
        by_width = at_width[site.name]
        curves[site.name] = np.array([1.0] + [by_width[k].predicted_error() for k in range(1, site.shape[0] + 1)])
        # index k: width k (0 unused)
    unit_bytes = {site.name: site.bytes / site.shape[0] for site in offer.sites}
    path = budget.allocation_path(curves, unit_bytes)

    def after(moves: int) -> Choice:
        return choice(budget.widths_after(full, path, moves))

    if options.target_size is not None:
        goal = model_bytes - budget.target_bytes(options.target_size, model_bytes)
        moves = budget.path_to_size(path, goal, lambda m: saved_after(after(m)))
    else:
        moves = budget.widest_within(len(path), lambda m: error_of(after(m)), max_error)
    return after(moves)


def _codec(options: list[Candidate], layer_error: float | None, allowed: bool) -> tuple[Candidate, str]:
    """Ternary where `allowed` and within the per-layer budget, else 8 bits within it (where offered), else fp32;
    and why, when not ternary."""
    ternary, fp32 = options[0], options[-1]
    fallback = next((c for c in options if c.method == "uint8"), None)
    error = ternary.predicted_error()
    if allowed and (layer_error is None or error <= layer_error):
        return ternary, ""
    why = f"ternary error {error:.3f} > budget {layer_error:g}" if allowed else \
        "the --max-error search kept it in higher precision"
    if fallback is None:
        return fp32, f"{why} (8 bits needs --storage dequantize)"
    if layer_error is None or fallback.predicted_error() <= layer_error:
        return fallback, why
    return fp32, f"ternary {error:.3f} and 8-bit {fallback.predicted_error():.3f} errors > budget {layer_error:g}"


def ternary_rule(offer: Offer, layer_error: float | None, max_error: float | None,
                 error_of: ErrorOf) -> tuple[Choice, dict[str, str]]:
    """Each layer's code and, where it is not ternary, why."""
    def choose(allowed: set[str] | None, layer_error: float | None) -> tuple[Choice, dict[str, str]]:
        picks = {site: _codec(cands, layer_error, allowed is None or site in allowed)
                 for site, cands in offer.candidates.items()}
        return {site: pick for site, (pick, _) in picks.items()}, {site: why for site, (_, why) in picks.items() if why}

    if max_error is not None and layer_error is None:
        errors = {site: cands[0].predicted_error() for site, cands in offer.candidates.items()}
        order = sorted(errors, key=errors.__getitem__)  # smallest calibrated error first
        count = budget.widest_within(len(order), lambda n: error_of(choose(set(order[:n]), None)[0]), max_error)
        return choose(set(order[:count]), None)
    return choose(None, layer_error)


def hyper_rule(offer: Offer, options: HyperOptions) -> Choice:
    """Per tensor the fewest bytes within the tensor error target (without one: the least error)."""
    return {site: pick_setting(cands, options.tensor_error) for site, cands in offer.candidates.items()}


def _grid_bits(candidate: Candidate) -> int:
    return int(candidate.method.removeprefix("uint"))  # a grid candidate's method is "uint<bits>"


def quant_rule(offer: Offer, bits: int, layer_error: float | None) -> tuple[Choice, dict[str, str]]:
    """Every layer on the grid of `bits`; with a per-layer budget, the fewest bits within it, else fp32. And why,
    where a layer is not on the asked grid."""
    chosen, reasons = {}, {}
    for site, options in offer.candidates.items():
        grids = [c for c in options if c.method != "fp32"]  # widest first
        if layer_error is None:
            wider = [c for c in grids if _grid_bits(c) >= bits]  # widest first
            chosen[site] = wider[-1] if wider else options[-1]
            if chosen[site].method != f"uint{bits}":
                reasons[site] = f"no {bits}-bit format holds this shape: " + \
                    (f"{_grid_bits(chosen[site])} bits" if wider else "no wider grid either")
            continue
        within = [c for c in grids if c.predicted_error() <= layer_error]
        chosen[site] = within[-1] if within else options[-1]
        if not grids:
            reasons[site] = "no grid format holds this shape"
        elif chosen[site].method != f"uint{bits}":
            reasons[site] = f"fewest bits within budget {layer_error:g}" if within else \
                f"{_grid_bits(grids[0])}-bit error {grids[0].predicted_error():.3f} > budget {layer_error:g}"
    return chosen, reasons


def allocation_rule(offer: Offer, within: Callable[[Choice], bool], budget: str,
                    distortion: Callable[[Candidate], float] = squared_error) -> tuple[Choice, dict[str, str]]:
    """The allocator's plan over every site's candidates: a Lagrangian plan that `within` (the held-out gates,
    measured on a trial rewrite) accepts, found by bisection: the fewest bytes of those plans when the measured error
    falls as the multiplier rises; all fp32 when no plan passes. Then the smaller one-setting plans (`uniform_plans`),
    the nearest below it first, while they pass, at most UNIFORM_TRIALS of them: measured errors do not add as
    predicted, and a plan that gives every site the same grid can pass where the bisection stopped above it. And why,
    per site."""
    result = allocate(offer.candidates, within, distortion)
    if result.choice is None:
        fp32 = {site: options[-1] for site, options in offer.candidates.items()}
        return fp32, dict.fromkeys(fp32, f"no plan within {budget}, even the least distorted")
    found = plan_bytes(result.choice)
    smaller = sorted((plan for plan in uniform_plans(offer) if plan_bytes(plan) < found), key=lambda plan: -plan_bytes(plan))
    best = None
    for plan in smaller[:UNIFORM_TRIALS]:  # the one-setting plans below the bisection's, nearest first, while they pass
        if not within(plan):
            break
        best = plan
    if best is not None:
        return best, {site: f"one setting for every site ({c.setting} here): smaller than the allocator's plan "
                            f"within {budget}" for site, c in best.items()}
    why = f"allocated within {budget} (multiplier {result.multiplier:.3g}, {result.tests} trials)"
    return result.choice, dict.fromkeys(result.choice, why)


UNIFORM_TRIALS = 3  # one-setting plans tried after the bisection, at most


def uniform_plans(offer: Offer) -> list[Choice]:
    """One plan per setting of the offer: every site takes the candidate of that width at the same rank among its
    blocks (else the site's first of that width, else fp32). The plans users would pick by hand (`--bits 4`)."""
    def ranked(options: list[Candidate]) -> dict[tuple[str, int], Candidate]:
        seen: dict[str, int] = {}
        keyed = {}
        for c in options:
            keyed[c.method, seen.setdefault(c.method, 0)] = c
            seen[c.method] += 1
        return keyed

    by_site = {site: ranked(options) for site, options in offer.candidates.items()}
    keys = sorted({key for keyed in by_site.values() for key in keyed if key[0] != "fp32"})
    return [{site: keyed.get(key) or keyed.get((key[0], 0)) or offer.candidates[site][-1]
             for site, keyed in by_site.items()} for key in keys]


def size_rule(offer: Offer, max_bytes: float, distortion: Callable[[Candidate], float],
              budget: str) -> tuple[Choice, dict[str, str]]:
    """The least distorted Lagrangian plan whose sites take at most `max_bytes`; BadInput when even the fewest bytes
    do not fit. And why, per site."""
    result = allocate_bytes(offer.candidates, max_bytes, distortion)
    if result.choice is None:
        least = sum(min(c.bytes_after for c in options) for options in offer.candidates.values())
        raise BadInput(f"{budget} is out of reach: the weights' smallest codes take {least} bytes, "
                       f"{max(0, int(max_bytes))} are left for them")
    why = f"allocated within {budget} (multiplier {result.multiplier:.3g})"
    return result.choice, dict.fromkeys(result.choice, why)
