"""Paired comparison of evaluated models on the same structures and clicks (lib.evaluation.evaluate's summary.json).

    cd apps/mais && python -m lib.evaluation.compare new/summary.json old/summary.json --reference run14 \\
        --structures "$(cat ../../benchmarks/results/generalist/unseen_structures.txt)"

For every model against the reference, structure by structure: the mean Dice difference after clicks 1, 5 and
K with its standard error and the number of structures it is better on, and for every model the share of clicks
2..K after which Dice fell (a click that undid some of the earlier ones). A mean over 17 structures moves by
2-3 points between runs of one training line, so a gain is read against its standard error, not alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lib.evaluation.plot import merge, restrict


def curves(summary: dict, model: str, rule: str) -> dict[str, np.ndarray]:
    """{case:structure: Dice per click [K]} of one model and rule."""
    try:
        structures = summary["models"][model][rule]["structures"]
    except KeyError:
        raise ValueError(f"no {model!r} under rule {rule!r}; the summaries have {sorted(summary['models'])}") from None
    return {name: np.asarray(curve, dtype=float) for name, curve in structures.items()}


def share_worse(structure_curves: dict[str, np.ndarray]) -> float:
    """The share of clicks 2..K, over all structures, after which Dice was lower than before the click."""
    falls = [np.diff(curve) < 0 for curve in structure_curves.values()]
    return float(np.concatenate(falls).mean())


def paired(model: dict[str, np.ndarray], reference: dict[str, np.ndarray], click: int) -> dict:
    """Model minus reference after `click` (1-based), over the structures both have: mean, standard error, the
    number better and the number compared."""
    names = sorted(set(model) & set(reference))
    if len(names) < 2:
        raise ValueError(f"a paired comparison needs at least 2 common structures, got {len(names)}")
    differences = np.array([model[n][click - 1] - reference[n][click - 1] for n in names])
    return {
        "click": click,
        "mean": float(differences.mean()),
        "standard_error": float(differences.std(ddof=1) / np.sqrt(len(differences))),
        "better": int((differences > 0).sum()),
        "structures": len(differences),
    }


def compare(summary: dict, reference: str, rule: str = "center") -> str:
    """The markdown table of every model of `summary` against `reference` under `rule`."""
    clicks = sorted({1, min(5, summary["clicks"]), summary["clicks"]})
    base = curves(summary, reference, rule)
    header = "| model | " + " | ".join(f"Dice@{k} - {reference}" for k in clicks) + " | clicks after which Dice fell |"
    lines = [header, "| --- " * (len(clicks) + 2) + "|"]
    for model in summary["models"]:
        own = curves(summary, model, rule)
        cells = []
        for k in clicks:
            if model == reference:
                cells.append(f"{np.mean([c[k - 1] for c in own.values()]):.3f} (reference)")
                continue
            p = paired(own, base, k)
            cells.append(f"{p['mean']:+.3f} ± {p['standard_error']:.3f} ({p['better']}/{p['structures']} better)")
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {share_worse(own):.0%} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", type=Path, nargs="+", help="summary.json files of lib.evaluation.evaluate")
    parser.add_argument("--reference", required=True, help="the model every other one is compared with")
    parser.add_argument("--rule", default="center", help="the click rule to compare under")
    parser.add_argument("--structures", default="", help="comma-separated case:structure keys (default: all)")
    args = parser.parse_args(argv)
    summary = merge([json.loads(path.read_text()) for path in args.summaries])
    if args.structures:
        summary = restrict(summary, args.structures.split(","))
    try:
        print(compare(summary, args.reference, args.rule))
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
