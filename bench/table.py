"""The results table: medians and spreads of both sides, ratios, and each target's verdict.

``build(scenarios, results, with_peer)`` turns the runs into one ``Line`` per table row;
``as_text`` renders them for the terminal (markdown.py renders them for the report).
"""
import dataclasses
import statistics
from typing import NamedTuple


class Summary(NamedTuple):
    """One figure over the repeats of one side."""

    median: float
    low: float
    high: float
    values: list


def summarise(values):
    """A Summary of a list of figures, or None for an empty one."""
    if not values:
        return None
    return Summary(statistics.median(values), min(values), max(values), list(values))


@dataclasses.dataclass
class Line:
    """One row of the table: one figure of one scenario, both sides, and the verdict."""

    number: str
    title: str
    key: str
    label: str
    higher_is_better: bool
    calibration: bool
    has_peer: bool                  # the scenario has a RabbitMQ side at all
    ours: Summary = None
    rabbit: Summary = None
    has_redis: bool = False         # the scenario has a Redis side at all
    redis: Summary = None
    skipped: str = None
    errors: list = dataclasses.field(default_factory=list)
    target: str = None
    met: bool = None                # None: no target, or not judged (see why_unjudged)
    why_unjudged: str = None
    ratio: float = None             # ours / RabbitMQ, medians
    redis_ratio: float = None       # ours / Redis, medians
    fraction: float = None          # ours / the reference row (the RSA bound), medians

    @property
    def arrow(self):
        return "↑" if self.higher_is_better else "↓"

    def ours_cell(self):
        if self.skipped:
            return f"skipped: {self.skipped}"
        if self.errors and not self.ours:
            return "FAILED"
        return spread(self.ours)

    def rabbit_cell(self):
        return spread(self.rabbit) if self.has_peer else "n/a"

    def redis_cell(self):
        return spread(self.redis) if self.has_redis else "n/a"

    def redis_ratio_cell(self):
        return "–" if self.redis_ratio is None else f"{self.redis_ratio:.2f}×"

    def ratio_cell(self):
        if self.fraction is not None:
            return f"{100 * self.fraction:.0f}% of bound"
        return "–" if self.ratio is None else f"{self.ratio:.2f}×"

    def verdict(self):
        if self.target is None:
            return ""
        if self.met is None:
            return f"– ({self.why_unjudged})"
        return "✅ met" if self.met else "❌ not met"


def number(value):
    """A figure, as precise as it is meaningful."""
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def spread(summary):
    """``median [min–max]``, or just the value when there was one run."""
    if not summary:
        return "–"
    if len(summary.values) == 1:
        return number(summary.median)
    return f"{number(summary.median)} [{number(summary.low)}–{number(summary.high)}]"


def build(scenarios, results, with_peer):
    """One Line per row of ``scenarios``, in order, judged against its target."""
    lines, medians, targets = [], {}, []
    for scenario in scenarios:
        for row in scenario.rows:
            line = Line(
                number=scenario.number, title=scenario.title, key=row.key, label=row.label,
                higher_is_better=row.higher_is_better, calibration=scenario.calibration,
                has_peer=scenario.rabbit is not None,
                ours=summarise(results.values(scenario.number, "ours", row.figure)),
                rabbit=summarise(results.values(scenario.number, "RabbitMQ", row.figure)),
                has_redis=scenario.redis is not None,
                redis=summarise(results.values(scenario.number, "Redis", row.figure)),
                skipped=results.skipped.get(scenario.number),
                errors=results.errors_of(scenario.number))
            medians[row.key] = line.ours.median if line.ours else None
            lines.append(line)
            targets.append(row.target)
    for line, target in zip(lines, targets):
        ours = line.ours.median if line.ours else None
        rabbit = line.rabbit.median if line.rabbit else None
        if ours is not None and rabbit:
            line.ratio = ours / rabbit
        if ours is not None and line.redis and line.redis.median:
            line.redis_ratio = ours / line.redis.median
        if target is None:
            continue
        line.target = target.text
        line.met = target.judge(ours, rabbit, medians)
        if target.kind == "fraction_of" and ours is not None and medians.get(target.ref):
            line.fraction = ours / medians[target.ref]
        if line.met is None:
            if line.skipped:
                line.why_unjudged = "skipped"
            elif target.kind.startswith("ratio") and not with_peer:
                line.why_unjudged = "no RabbitMQ"
            elif target.kind == "fraction_of" and not medians.get(target.ref):
                line.why_unjudged = f"no {target.ref} in this run"
            else:
                line.why_unjudged = "no result"
    return lines


def as_text(lines):
    """The table as plain text, for the terminal."""
    def row(*cells):
        widths = (4, 44, 24, 26, 26, 15, 26, 10, 28)
        return " ".join(f"{cell:<{width}.{width}}" for cell, width in zip(cells, widths)) \
            + " " + cells[-1]

    out = [row("#", "scenario", "figure", "CipherMQ median [min-max]",
               "RabbitMQ median [min-max]", "ratio", "Redis median [min-max]", "ratio",
               "target", "met?")]
    for line in lines:
        out.append(row(line.number, line.title, f"{line.label} {line.arrow}", line.ours_cell(),
                       line.rabbit_cell(), line.ratio_cell(), line.redis_cell(),
                       line.redis_ratio_cell(), line.target or "",
                       line.verdict()))
    return "\n".join(out)
