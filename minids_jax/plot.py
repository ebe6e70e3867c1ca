"""Train and eval loss of a run as a PNG, from its metrics.jsonl.

    python -m minids_jax.plot runs/tiny            # writes runs/tiny/loss.png
    python -m minids_jax.plot runs/tiny --out loss.png

Training writes the same plot when it ends.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

METRICS_FILE = "metrics.jsonl"  # in the workdir, written by reporting.Reporter

SMOOTH_FROM = 50  # train points from which a smoothed curve reads better than the raw one


def read_metrics(workdir) -> dict[str, dict[int, dict]]:
    """{"train": {step: record}, "eval": {step: record}}; a step logged again after a resume
    keeps its latest record."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} the workdir of a run that "
                                f"has logged at least one step (train.py --workdir)?")
    splits: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill mid-write
                continue
            splits.setdefault(record.get("split", "train"), {})[int(record["step"])] = record
    return splits


def _series(records: dict[int, dict], key: str):
    steps = sorted(s for s, r in records.items() if key in r)
    return np.array(steps), np.array([records[s][key] for s in steps], dtype=float)


def plot_losses(workdir, out=None) -> pathlib.Path:
    """Writes the loss curves (train: raw and smoothed; eval: markers) and returns the path."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    splits = read_metrics(workdir)
    train_steps, train_loss = _series(splits["train"], "loss")
    eval_steps, eval_loss = _series(splits["eval"], "eval_loss")
    if not len(train_steps) and not len(eval_steps):
        raise ValueError(f"{pathlib.Path(workdir) / METRICS_FILE} holds no loss values yet; "
                         f"plot again after the first logged step.")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if len(train_steps) >= SMOOTH_FROM:  # many noisy points: faint raw, smoothed on top
        ax.plot(train_steps, train_loss, color="tab:blue", alpha=0.3, lw=1)
        ax.plot(train_steps, _ema(train_loss), color="tab:blue", lw=1.8,
                label="train loss (smoothed)")
    elif len(train_steps):
        ax.plot(train_steps, train_loss, ".-", color="tab:blue", lw=1.5, label="train loss")
    if len(eval_steps):
        ax.plot(eval_steps, eval_loss, "o-", color="tab:orange", lw=1.5, ms=5,
                label="eval loss (held out)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(pathlib.Path(workdir).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = pathlib.Path(out) if out else pathlib.Path(workdir) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def _ema(values: np.ndarray, weight: float = 0.8) -> np.ndarray:
    """TensorBoard-style smoothing, debiased so the curve starts at the first value."""
    smoothed, average = np.empty_like(values), 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        smoothed[i] = average / (1 - weight ** (i + 1))
    return smoothed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", help="the run directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="PNG path (default: <workdir>/loss.png)")
    args = parser.parse_args(argv)
    try:
        print(plot_losses(args.workdir, args.out))
    except (OSError, ValueError) as error:  # a missing run, an unwritable --out
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
