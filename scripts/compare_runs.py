"""Loss curves of runs against wall time, and their per-layer expert balance over steps.

    python scripts/compare_runs.py runs/tiny runs/v3 runs/v3_nobias --out docs/v3_tiny

writes OUT_loss.png (train, eval and MTP loss against seconds since each run's first logged
step) and OUT_balance.png (each MoE layer's busiest over idlest expert share against steps), and
prints the losses each run reached by the wall time the fastest finished in.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from minids_jax.plot import read_metrics  # noqa: E402


def series(records: dict[int, dict], key: str, start: float):
    steps = sorted(s for s, r in records.items() if key in r)
    return (np.array([records[s]["time"] - start for s in steps]),
            np.array([records[s][key] for s in steps]), steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--out", required=True, help="path prefix of the two PNGs")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        runs = {pathlib.Path(w).name: read_metrics(w) for w in args.workdirs}
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    starts = {name: min(r["time"] for r in m["train"].values()) for name, m in runs.items()}
    ends = {name: max(r["time"] for split in m.values() for r in split.values()) - starts[name]
            for name, m in runs.items()}
    budget = min(ends.values())
    figure, axis = plt.subplots(figsize=(8, 5))
    print(f"losses at {budget:.0f} s after each run's first logged step (the shortest run):")
    for name, metrics in runs.items():
        for split, key, style in (("train", "loss", "-"), ("eval", "eval_loss", "o-"),
                                  ("train", "mtp_loss", ":")):
            t, y, steps = series(metrics[split], key, starts[name])
            if not len(t):
                continue
            axis.plot(t, y, style, label=f"{name} {key}")
            within = t <= budget + 1e-6
            if within.any():
                i = np.flatnonzero(within)[-1]
                print(f"  {name:12s} {key:10s} {y[i]:.4f} at step {steps[i]} ({t[i]:.0f} s)")
    axis.set(xlabel="seconds since the first logged step", ylabel="loss (nats per token)",
             ylim=(None, 3.0))
    axis.legend()
    axis.grid(alpha=0.3)
    figure.savefig(f"{args.out}_loss.png", dpi=110, bbox_inches="tight")

    figure, axis = plt.subplots(figsize=(8, 5))
    print("busiest / idlest expert share per MoE layer (last logged step):")
    for (name, metrics), color in zip(runs.items(), ("C0", "C1", "C2", "C3")):
        steps = sorted(s for s, r in metrics["train"].items() if "expert_load" in r)
        if not steps:
            continue
        loads = np.array([metrics["train"][s]["expert_load"] for s in steps])  # [S, N, E]
        ratio = loads.max(-1) / np.maximum(loads.min(-1), 1e-3)
        # With multi-token prediction, the last rows are the MTP modules' MoE layers.
        n_mtp = 1 if any("mtp_loss" in r for r in metrics["train"].values()) else 0
        labels = [f"MoE layer {n}" for n in range(ratio.shape[1] - n_mtp)] + ["MTP"] * n_mtp
        for layer, label in enumerate(labels):
            axis.plot(steps, ratio[:, layer], color=color, alpha=0.4 + 0.6 * layer /
                      max(ratio.shape[1] - 1, 1), label=f"{name} {label}")
        print(f"  {name:12s} " + "  ".join(f"{label}: {r:.1f}" for label, r in
                                             zip(labels, ratio[-1])))
    axis.set(xlabel="step", ylabel="busiest / idlest expert share (1 = balanced)", yscale="log")
    axis.legend(fontsize=7, ncol=2)
    axis.grid(alpha=0.3)
    figure.savefig(f"{args.out}_balance.png", dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
