"""Learning curves from `quality.py --curve` reports: k-NN top-1 against wall-clock minutes, one panel per report.

    python benchmarks/training/plot_curves.py outputs/quality/quality-A.json outputs/quality/quality-B.json \
        --png curves.png

Each panel draws the DINO teacher at each snapshot and at the end of the run (x = minutes since the
pretraining call started, as the budget counts them; the label under a point is its epoch), and raw pixels
and random init as flat lines (they do not train). Prints the same figures as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: str | Path) -> dict:
    report = json.loads(Path(path).read_text())
    if not report.get("curve"):
        raise SystemExit(f"{path}: no learning curve in this report (run quality.py with --curve)")
    return report


def dataset_name(report: dict) -> str:
    return Path(str(report["data"]).rstrip("/")).name


def table(reports: list[dict]) -> str:
    """Markdown: one row per point of every report, with the baselines and the margin over the better one."""
    rows = [
        "| data | minutes | epoch | DINO top-1 | raw pixels | random init | DINO - max(baselines) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        raw, rnd = r["top1"]["raw_pixels"], r["top1"]["random_init"]
        for c in r["curve"]:
            rows.append(
                f"| {dataset_name(r)} | {c['elapsed_min']:.1f} | {c['epoch']} | {c['top1']:.2f} | {raw:.2f} | "
                f"{rnd:.2f} | {c['top1'] - max(raw, rnd):+.2f} |"
            )
    return "\n".join(rows)


def plot(reports: list[dict], png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(5.2 * len(reports), 3.8), squeeze=False)
    for ax, r in zip(axes[0], reports):
        xs = [c["elapsed_min"] for c in r["curve"]]
        ys = [c["top1"] for c in r["curve"]]
        ax.plot(xs, ys, "o-", color="tab:blue", label=f"DINO teacher ({r['preset']})")
        for x, y, c in zip(xs, ys, r["curve"]):
            ax.annotate(
                f"ep {c['epoch']}", (x, y), textcoords="offset points", xytext=(0, -13), ha="center", fontsize=7
            )
        ax.axhline(r["top1"]["raw_pixels"], color="tab:gray", ls="--", label="raw pixels")
        ax.axhline(r["top1"]["random_init"], color="tab:orange", ls=":", label="random init")
        ax.set_xlim(0, max(xs) * 1.05)
        ax.set_xlabel("wall-clock minutes of pretraining")
        ax.set_ylabel(f"weighted k-NN top-1 (k={r['k']}), %")
        ax.set_title(f"{dataset_name(r)}: {r['n_queries']} val queries, {r['n_db']} train images", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", help="quality-*.json written by quality.py --curve")
    p.add_argument("--png", default="outputs/quality/curves.png", help="figure to write")
    args = p.parse_args(argv)
    reports = [load(r) for r in args.reports]
    print(table(reports))
    print(f"figure: {plot(reports, args.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
