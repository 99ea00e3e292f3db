"""Plot the demo model's training curves (main and MTP loss, train and validation) from its training_log.json.

    python tools/plot_training.py [--log cluster/models/moeserve-demo/training_log.json] [--out docs/demo-training.png]
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def runs(report: dict) -> list[dict]:
    """Earlier runs first (a resumed run keeps its predecessor under 'previous')."""
    return (runs(report["previous"]) if "previous" in report else []) + [report]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", type=Path, default=ROOT / "cluster/models/moeserve-demo/training_log.json")
    p.add_argument("--out", type=Path, default=ROOT / "docs/demo-training.png")
    a = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    series = {"loss": [], "mtp_loss": [], "val_loss": [], "val_mtp_loss": []}
    for run in runs(json.loads(a.log.read_text())):
        for entry in run["log"]:
            for key in series:
                if key in entry:
                    series[key].append(((offset + entry["tokens"]) / 1e6, entry[key]))
        offset += run["tokens"]
    styles = {"loss": ("main, train", "-", 0.5), "mtp_loss": ("MTP, train", "-", 0.5),
              "val_loss": ("main, held-out files", "o-", 1.0), "val_mtp_loss": ("MTP, held-out files", "s-", 1.0)}
    for key, points in series.items():
        if points:
            label, style, alpha = styles[key]
            ax.plot(*zip(*points), style, label=label, alpha=alpha, markersize=4)
    ax.set(xlabel="training tokens (millions)", ylabel="cross-entropy (nats/token)",
           title="moeserve demo model on the Python standard library")
    ax.legend()
    ax.grid(alpha=0.3)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
