"""Does the active-learning score find what the model gets wrong? Disagreement vs real first-click Dice.

For every labelled structure of the sample data (plus the breast1 lesion of tests/data, which no training saw),
a first click deepest inside the structure gives (a) its probe disagreement (lib.activelearning.disagreement)
and (b) the Dice of the mask it produces. A useful uncertainty score falls as Dice rises: the script prints both
per structure and their Spearman rank correlation (random ranking: 0 on average).

    .venv/bin/python benchmarks/bench_uncertainty.py [--weights apps/mais/model/mais_light.pt]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import REPO_ROOT, SAMPLE_DATA, SHIPPED_WEIGHTS
from scipy import stats

from lib.activelearning.disagreement import click_disagreement
from lib.clicks.simulator import interior_point
from lib.configs.labels import SAMPLE_LABELS
from lib.imaging import CropWindow, ModelSpaceImage, load_volume
from lib.model.weights import load_mais
from lib.training.real_data import StructureCrop, image_id, labelled_images
from lib.training.validation import validate

MIN_VOXELS = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    args = parser.parse_args()
    model = load_mais(args.weights)
    pairs = labelled_images(SAMPLE_DATA)
    pairs.append((SAMPLE_DATA / "breast1.nii.gz", REPO_ROOT / "tests" / "data" / "breast1_lesion_label.nii.gz"))
    rows = []
    for image_path, label_path in pairs:
        image = ModelSpaceImage.from_file(str(image_path))
        labels = image.resample_label(load_volume(str(label_path)))[0].numpy()
        for name, index in SAMPLE_LABELS.items():
            structure = labels == index
            if index == 0 or structure.sum() < MIN_VOXELS:
                continue
            point = np.asarray(interior_point(structure, np.random.default_rng(0)))
            window = CropWindow.around(point, image.shape)
            mask = window.extract(torch.from_numpy(structure)[None], fill=False)
            crop = StructureCrop(window.extract(image.volume, fill=image.pad_value), mask, name)
            dice = validate(model, [crop], num_clicks=1, step=0).dice_per_click[0]
            rows.append((f"{image_id(image_path)}:{name}", click_disagreement(model, image, point, 3), dice))
    print(f"{'structure':40s} disagreement  first-click Dice")
    for name, disagreement, dice in sorted(rows, key=lambda r: -r[1]):
        print(f"{name:40s} {disagreement:12.3f}  {dice:16.3f}")
    rho, p = stats.spearmanr([r[1] for r in rows], [r[2] for r in rows])
    print(f"Spearman rank correlation, disagreement vs Dice: {rho:.3f} (p = {p:.3g}, {len(rows)} structures)")


if __name__ == "__main__":
    main()
