"""Evaluate weights files interactively on labelled images (no server): Dice after each click, NoC, time per click.

    cd apps/mais && python -m lib.evaluation.evaluate --studies ../../sample-data --structures amygdala_left \\
        --extra ../../sample-data/breast1.nii.gz=../../tests/data/breast1_lesion_label.nii.gz \\
        --weights model/mais_light.pt other.pt@none=baseline --rules center,random,noisy --out results/

Writes to --out: `dice_per_click.csv` (one row per model, rule, structure and click), `summary.json` (the model
space's voxel size per image; per model and rule: mean Dice per click, NoC@80/85/90, mean seconds per click,
per-structure curves) and `summary.md` (the table the README shows). `python -m lib.evaluation.plot` draws the
Dice-vs-clicks PNG from summary.json. A weights argument may carry a memory-mode override and a name:
`path[@mode][=name]`; the pseudo-weights `region_growing` is the classical baseline
(lib.evaluation.region_growing) on the same clicks.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lib.clicks.simulator import CLICK_PRESETS
from lib.configs.labels import SAMPLE_LABELS
from lib.evaluation.interactive import NOC_THRESHOLDS, StructureResult, evaluate_structure
from lib.evaluation.region_growing import BASELINE_NAME, RegionGrowingSession
from lib.imaging import ModelSpaceImage, load_volume
from lib.model.weights import load_mais
from lib.training.real_data import image_id, labelled_images

# Structures smaller than this many voxels in the label file are skipped (partial-volume remnants).
MIN_VOXELS = 30


def parse_weights(argument: str) -> tuple[Path, str | None, str]:
    """`path[@mode][=name]` -> (path, memory mode override or None, display name)."""
    spec, _, name = argument.partition("=")
    path, _, mode = spec.partition("@")
    return Path(path), mode or None, name or (Path(path).stem + (f"@{mode}" if mode else ""))


def cases(args) -> list[tuple[str, ModelSpaceImage, dict[str, np.ndarray], Path]]:
    """(image name, image in model space, {structure: truth bool on the file's grid}, image file) of every case."""
    pairs = labelled_images(args.studies) if args.studies else []
    pairs += [tuple(Path(p) for p in extra.split("=", 1)) for extra in args.extra]
    wanted_images = set(filter(None, args.images.split(",")))
    wanted = set(filter(None, args.structures.split(",")))
    label_map = json.loads(args.labels.read_text()) if args.labels else SAMPLE_LABELS
    result = []
    for image_path, label_path in pairs:
        name = image_id(image_path)
        if wanted_images and name not in wanted_images:
            continue
        labels = np.asarray(load_volume(str(label_path))[0])
        truths = {
            structure: labels == index
            for structure, index in label_map.items()
            if index and (not wanted or structure in wanted) and (labels == index).sum() >= MIN_VOXELS
        }
        if truths:
            image = ModelSpaceImage.from_file(str(image_path), spacing_mm=args.spacing_mm)
            result.append((name, image, truths, Path(image_path)))
    return result


def summarise(results: list[StructureResult]) -> dict:
    curves = np.array([r.dice for r in results])
    timed = [s for r in results for s in r.seconds if s > 0]
    obeyed = [o for r in results for o in r.obeyed if o is not None]
    return {
        "mean_dice_per_click": [round(float(v), 4) for v in curves.mean(0)],
        "noc": {
            f"{round(t * 100)}": round(float(np.mean([r.clicks_to_reach(t) for r in results])), 2)
            for t in NOC_THRESHOLDS
        },
        "seconds_per_click": round(float(np.mean(timed)), 4) if timed else None,
        "clicks_obeyed": round(float(np.mean(obeyed)), 4) if obeyed else None,
        "structures": {r.structure: [round(d, 4) for d in r.dice] for r in results},
    }


def markdown_table(summary: dict) -> str:
    """One row per model and rule: Dice after clicks 1, 5, 10 (or K), the rise from 5 to 10, and NoC@85/90,
    seconds per click and the share of clicks obeyed where the summary has them (one averaged over chosen
    structures by lib.evaluation.plot has not: they describe every structure)."""
    entries = [s for rules in summary["models"].values() for s in rules.values()]
    with_noc = all("noc" in s for s in entries)
    header = "| model | click rule | Dice@1 | Dice@5 | Dice@10 | Dice@10 - Dice@5 |"
    lines = [
        header + (" NoC@85 | NoC@90 | s/click | clicks obeyed |" if with_noc else ""),
        "| --- " * (10 if with_noc else 6) + "|",
    ]
    for model, rules in summary["models"].items():
        for rule, s in rules.items():
            d = s["mean_dice_per_click"]
            d1, d5, d10 = (d[min(k, len(d)) - 1] for k in (1, 5, 10))
            row = f"| {model} | {rule} | {d1:.3f} | {d5:.3f} | {d10:.3f} | {d10 - d5:+.3f} |"
            if with_noc:
                row += f" {s['noc']['85']} | {s['noc']['90']} | {s['seconds_per_click']} | {s.get('clicks_obeyed')} |"
            lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--weights",
        nargs="+",
        required=True,
        help=f"weights files: path[@memory_mode][=name]; {BASELINE_NAME} for the region-growing baseline",
    )
    parser.add_argument("--studies", type=Path, help="a MONAI Label local datastore: images with labels/final")
    parser.add_argument("--extra", action="append", default=[], help="another case: image_path=label_path")
    parser.add_argument("--images", default="", help="comma-separated image names to keep (default: all)")
    parser.add_argument("--structures", default="", help="comma-separated label names to keep (default: all)")
    parser.add_argument("--labels", type=Path, help="label map JSON (default: the sample labels)")
    parser.add_argument("--rules", default="center", help=f"comma-separated click presets of {sorted(CLICK_PRESETS)}")
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument(
        "--spacing-mm",
        type=float,
        help="resample every image to this voxel size (default: the server's choice, lib.imaging.model_spacing_mm)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.spacing_mm is not None and args.spacing_mm <= 0:
        parser.error(f"--spacing-mm must be positive, got {args.spacing_mm}")
    logging.basicConfig(level=logging.WARNING)
    rules = args.rules.split(",")
    unknown = set(rules) - set(CLICK_PRESETS)
    if unknown:
        parser.error(f"unknown click preset(s) {sorted(unknown)} in --rules; known: {sorted(CLICK_PRESETS)}")

    data = cases(args)
    if not data:
        parser.error("no labelled structure matches --studies/--extra/--images/--structures")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "clicks": args.clicks,
        "cases": {name: sorted(truths) for name, _, truths, _ in data},
        "spacing_mm": {name: image.spacing_mm for name, image, _, _ in data},
        "models": {},
    }
    rows = []
    total = len(args.weights) * len(rules) * sum(len(truths) for _, _, truths, _ in data)
    with tqdm(total=total, desc="structures", unit="structure") as progress:
        for argument in args.weights:
            path, mode, name = parse_weights(argument)
            baseline = str(path) == BASELINE_NAME
            model = None if baseline else load_mais(path, device=torch.device(args.device), memory_mode=mode)
            summary["models"][name] = {}
            for rule in rules:
                results = []
                for image_name, image, truths, image_path in data:
                    original = load_volume(str(image_path)) if baseline else None
                    for structure, truth in truths.items():
                        session = RegionGrowingSession.of(original) if baseline else None
                        result = evaluate_structure(
                            model, image, truth, f"{image_name}:{structure}", rule, args.clicks, args.seed, session
                        )
                        results.append(result)
                        rows += [
                            (name, rule, result.structure, k, round(d, 4), round(s, 4), "" if o is None else int(o))
                            for k, (d, s, o) in enumerate(zip(result.dice, result.seconds, result.obeyed), 1)
                        ]
                        progress.update()
                summary["models"][name][rule] = summarise(results)

    with open(args.out / "dice_per_click.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("model", "rule", "structure", "click", "dice", "seconds", "obeyed"))
        writer.writerows(rows)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = markdown_table(summary)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)
    return summary


if __name__ == "__main__":
    main()
