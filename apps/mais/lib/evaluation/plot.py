"""Dice-vs-clicks plot of an evaluation (lib.evaluation.evaluate's summary.json): one curve per model and rule.

cd apps/mais && python -m lib.evaluation.plot results/summary.json ../../docs/dice_vs_clicks.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

LINE_STYLES = {"center": "-", "random": "--", "noisy": ":"}


def plot(summary: dict, out: Path, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, rules in summary["models"].items():
        colour = None
        for rule, s in rules.items():
            curve = s["mean_dice_per_click"]
            (line,) = ax.plot(
                range(1, len(curve) + 1),
                curve,
                LINE_STYLES.get(rule, "-."),
                marker="o",
                markersize=3,
                color=colour,
                label=f"{model} ({rule})",
            )
            colour = line.get_color()  # one colour per model, one line style per click rule
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean Dice")
    ax.set_xticks(range(1, summary["clicks"] + 1))
    ax.grid(alpha=0.3)
    ax.set_title(title or "structures: " + ", ".join(s for c in summary["cases"].values() for s in c), fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summary", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    plot(json.loads(args.summary.read_text()), args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
