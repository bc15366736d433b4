"""Dice-vs-clicks plot of evaluations (lib.evaluation.evaluate's summary.json): one curve per model and rule.

cd apps/mais && python -m lib.evaluation.plot results/summary.json ../../docs/dice_vs_clicks.png
python -m lib.evaluation.plot a/summary.json b/summary.json out.png --structures breast1:lesion,colin27_t1:amygdala_left

Several summaries (runs of the same cases with other weights) are drawn together. --structures averages only those
structures' curves (e.g. the held-out ones) instead of every structure. The Dice table of what is drawn is printed
(markdown), so that a README's figure and table come from one command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from lib.evaluation.evaluate import markdown_table  # noqa: E402

LINE_STYLES = {"center": "-", "random": "--", "noisy": ":"}


def plot(summary: dict, out: Path, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
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
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes: never over a curve
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def merge(summaries: list[dict]) -> dict:
    """One summary holding the models of several evaluations of the same cases with the same number of clicks."""
    merged = {**summaries[0], "models": {}}
    for summary in summaries:
        if summary["clicks"] != merged["clicks"] or summary["cases"] != merged["cases"]:
            raise ValueError("the summaries evaluate different cases or numbers of clicks: they cannot share a plot")
        for model, rules in summary["models"].items():
            if model in merged["models"]:
                raise ValueError(f"model name {model!r} is in two summaries: give the runs different names")
            merged["models"][model] = rules
    return merged


def restrict(summary: dict, structures: list[str]) -> dict:
    """The summary of `structures` ("case:structure" keys) only: their curves, and every mean Dice curve
    recomputed over them."""
    models = {}
    for model, rules in summary["models"].items():
        models[model] = {}
        for rule, s in rules.items():
            missing = sorted(set(structures) - set(s["structures"]))
            if missing:
                raise ValueError(f"{model} ({rule}) has no curve for {missing}; it has {sorted(s['structures'])}")
            chosen = {name: s["structures"][name] for name in structures}
            mean = [sum(column) / len(chosen) for column in zip(*chosen.values())]
            # NoC and seconds per click describe every structure: not carried over
            models[model][rule] = {"structures": chosen, "mean_dice_per_click": mean}
    cases = {}
    for name in structures:
        case, _, structure = name.partition(":")
        cases.setdefault(case, []).append(structure)
    return {**summary, "models": models, "cases": cases}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", type=Path, nargs="+", help="summary.json files of lib.evaluation.evaluate")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--title", default="")
    parser.add_argument("--structures", default="", help="comma-separated case:structure keys to average")
    args = parser.parse_args(argv)
    summary = merge([json.loads(path.read_text()) for path in args.summaries])
    if args.structures:
        summary = restrict(summary, args.structures.split(","))
    plot(summary, args.out, args.title)
    print(markdown_table(summary))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
