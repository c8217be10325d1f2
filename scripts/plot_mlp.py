"""Draw benchmarks/mlp.png from the JSON that scripts/bench_mlp.py writes (the GPU machines have no matplotlib).

    python scripts/plot_mlp.py benchmarks/mlp_h100x2.json benchmarks/mlp_h100x2.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("tpaware", "naive", "local-sort", "dense")


def main(src: str, dest: str) -> None:
    data = json.loads(open(src).read())
    rows = [r for r in data["rows"] if "m" in r]
    panels = sorted({(r["model"], r["tp"]) for r in rows})
    models = sorted({model for model, _ in panels})
    tps = sorted({tp for _, tp in panels})
    fig, axes = plt.subplots(len(models), len(tps), figsize=(4.5 * len(tps), 3.2 * len(models)), squeeze=False)
    for (model, tp) in panels:
        ax = axes[models.index(model)][tps.index(tp)]
        for mode in MODES:
            points = sorted((r["m"], r["graph_us"]) for r in rows if (r["model"], r["tp"], r["mode"]) == (model, tp, mode))
            ax.plot([m for m, _ in points], [us for _, us in points], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model}, tp={tp}")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("µs (CUDA graph, slowest rank)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    env = data["environment"]
    fig.suptitle(f"MLP latency: {env['card']} x{env['gpus']}, torch {env['torch']}, {env['date']}")
    fig.tight_layout()
    fig.savefig(dest, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
