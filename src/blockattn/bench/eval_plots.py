"""Plots of `blockattn eval` results: a needle-in-a-haystack heatmap per method (accuracy by context
length x needle depth), a speed/quality Pareto plot (prefill speedup vs passkey accuracy), and for
`eval --kv` accuracy vs KV compression per policy."""
from __future__ import annotations

import os
import re


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_")


def heatmaps(results: dict, folder: str) -> list[str]:
    """One PNG per method, `<folder>/needle_<method>.png`; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths, depths = results["config"]["lengths"], results["config"]["depths"]
    paths = []
    if "passkey" not in results["config"].get("tasks", ("passkey",)):
        return paths
    for entry in (e for e in results["methods"] if e["cells"]):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                found = [c["found"] for c in entry["cells"] if c["length"] == length and c["depth"] == depth
                         and c.get("task", "passkey") == "passkey"]
                if found:
                    grid[i, j] = sum(found) / len(found)
        fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(lengths), 1.4 + 0.6 * len(depths)))
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
        ax.set_title(f"passkey: {entry['method']}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.05)
        fig.tight_layout()
        path = os.path.join(folder, f"needle_{_safe(entry['method'])}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def pareto(results: dict, path: str) -> str:
    """Prefill speedup over unpatched SDPA (x) against passkey accuracy (y), one point per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from blockattn.commands.compare import pareto_front

    rows = [e for e in results["methods"] if e["cells"] and e["prefill_speedup"] == e["prefill_speedup"]]
    fig, ax = plt.subplots(figsize=(7, 5))
    points = [(-e["prefill_speedup"], e["accuracy"]) for e in rows]
    for e in rows:
        ax.scatter(e["prefill_speedup"], e["accuracy"], s=40)
        ax.annotate(e["method"], (e["prefill_speedup"], e["accuracy"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    if rows:
        front = pareto_front(points)
        ax.plot([rows[i]["prefill_speedup"] for i in front], [rows[i]["accuracy"] for i in front], "k--", lw=0.8,
                label="Pareto front")
        ax.legend(fontsize=8)
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("prefill speedup vs unpatched SDPA model (same run)")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("speed / quality", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _kv_family(row: dict) -> str:
    """The policy without its ratio: one line of the accuracy-vs-compression plot."""
    from blockattn.bench.kv_eval import label
    return label(row["name"], {k: v for k, v in row["params"].items() if k != "ratio"})


def kv_accuracy(results: dict, path: str) -> str:
    """`blockattn eval --kv`: accuracy (y) against the measured compression 1 − KV bytes held / dense (x),
    one line per policy, one panel per task; dense is the dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = results["config"]
    task_list = list(config["tasks"])
    fig, axes = plt.subplots(1, len(task_list), figsize=(6.5 * len(task_list), 4.6), squeeze=False)
    rows = [r for r in results["rows"] if r["cells"]]
    dense = rows[0] if rows and rows[0]["name"] == "dense" and not rows[0]["params"] else None
    others = rows[1:] if dense is not None else rows
    for ax, task in zip(axes[0], task_list):
        lines = {}
        for row in others:
            acc = row["task_accuracy"].get(task)
            if acc == acc and acc is not None:
                lines.setdefault(_kv_family(row), []).append((1 - row["kv_fraction"], acc))
        for i, (name, points) in enumerate(sorted(lines.items())):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="os^vD<>ph*"[i % 10], lw=1.2,
                    label=name if len(name) < 48 else name[:45] + "...")
        if dense is not None:
            ax.axhline(dense["task_accuracy"].get(task, float("nan")), color="k", ls="--", lw=0.8, label="dense")
        ax.set_xlim(-0.05, 1.0)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("KV compression: 1 − bytes held / dense")
        ax.set_ylabel(f"{task} accuracy")
        ax.set_title(f"{task} at {', '.join(map(str, config['lengths']))} tokens ({config['method']} prefill)",
                     fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
