"""docs/benchmarks.png: medians of the three brokers with min–max bars, if matplotlib is there."""
from scenarios import RSS_TARGET_MIB

PANELS = [  # (title, table row keys)
    ("Throughput, msg/s\n(higher is better)", ["1", "2", "3", "9", "9b", "7", "7b", "6a",
                                                       "6b", "6c"]),
    ("Latency at 1,000 msg/s, ms, log scale\n(lower is better)",
     ["4.p50", "4.p99", "8.p50", "8.p99"]),
    ("RSS, 100k queued, MiB\n(lower is better)", ["5"]),
]
SIDES = [("ours", "CipherMQ", "#2b7bba", -0.27), ("rabbit", "RabbitMQ", "#f28e2b", 0.0),
         ("redis", "Redis Streams", "#c0392b", 0.27)]
BAR_WIDTH = 0.27


def draw(path, lines):
    """Draw the chart to ``path``; return None, or the reason there is no chart."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (`make bench-peer-install` installs it)"
    matplotlib.use("Agg")           # no display needed
    from matplotlib import pyplot

    by_key = {line.key: line for line in lines if not line.calibration}
    figure, axes = pyplot.subplots(1, len(PANELS), figsize=(15, 4.8),
                                   gridspec_kw={"width_ratios": [9, 4, 1.8]})
    for axis, (title, keys) in zip(axes, PANELS):
        keys = [key for key in keys if key in by_key]
        for side, name, colour, offset in SIDES:
            xs, medians, below, above = [], [], [], []
            for index, key in enumerate(keys):
                summary = getattr(by_key[key], side)
                if summary:
                    xs.append(index + offset)
                    medians.append(summary.median)
                    below.append(summary.median - summary.low)
                    above.append(summary.high - summary.median)
            axis.bar(xs, medians, width=BAR_WIDTH, color=colour, yerr=[below, above], capsize=3,
                     label=name)
        axis.set_xticks(range(len(keys)), [key.replace(".", " ") for key in keys])
        axis.set_title(title, fontsize=10)
        if "log scale" in title and any(  # one slow broker must not flatten the rest
                summary.low > 0 for key in keys for summary in
                (by_key[key].ours, by_key[key].rabbit, by_key[key].redis) if summary):
            axis.set_yscale("log")
        if "5" in keys:
            axis.axhline(RSS_TARGET_MIB, color="grey", linestyle="--", linewidth=1)
            axis.annotate("target", (0.05, RSS_TARGET_MIB), fontsize=8, color="grey",
                          va="bottom")
    axes[0].legend()
    figure.suptitle("CipherMQ, RabbitMQ and Redis Streams on one machine: medians, "
                    "bars from min to max")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return None
