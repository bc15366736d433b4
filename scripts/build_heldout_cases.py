"""Real labelled cases held out of the generalist training, as a datastore for `lib.evaluation.evaluate`.

Whole subjects and whole structure classes held out, CT and MR:
- pyradiomics `brain2` (MR, lesion) and `lung2` (CT, lesion): other patients than sample-data's brain1 and lung1;
  `breast1` (MR, lesion), whose image is in sample-data but whose label is not;
- Colin27 (`ch2`, mricron-data) with AAL regions: no generalist run trains on the subject, and amygdala and
  putamen are classes no generalist training target is; the earlier weights the shipped ones continue from
  trained on four of these regions (putamen, caudate, thalamus, hippocampus), so a fair comparison leaves those
  out (benchmarks/results/generalist/unseen_structures.txt);
- the spinal-cord MRs of `../shared/data/pairs/spinal_cord` (one subject, four contrasts, manual labels).

    python scripts/build_heldout_cases.py --out /tmp/heldout --pyradiomics-sdist DL/pyradiomics-3.0.1.tar.gz
    cd apps/mais && python -m lib.evaluation.evaluate --studies /tmp/heldout --labels /tmp/heldout/labels.json ...

The pyradiomics archive comes from PyPI (`pip download --no-deps --no-build-isolation --no-binary pyradiomics
pyradiomics==3.0.1 -d DL`), Colin27 and AAL from Debian (`apt-get install mricron-data`). Nothing is downloaded
here. The cases are not committed: they are rebuilt from these sources.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
from build_sample_data import (
    MRICRON_TEMPLATES,
    REPO_ROOT,
    nrrd_geometry,
    read_aal_values,
    read_sdist_nrrd,
    save_nifti,
    write_nrrd,
)

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# AAL regions of Colin27 kept as held-out structures: deep nuclei (two of them classes no training target is),
# cortical gyri of several sizes and the cerebellum.
AAL_REGIONS = (
    "Amygdala_L",
    "Amygdala_R",
    "Putamen_L",
    "Caudate_R",
    "Thalamus_L",
    "Hippocampus_R",
    "Insula_L",
    "Calcarine_R",
    "Frontal_Sup_L",
    "Temporal_Mid_R",
    "Cerebelum_6_L",
    "Lingual_L",
)
# (file stem in ../shared/data/pairs/spinal_cord, {label value: structure name})
SPINAL_CORD = (
    ("t1", {1: "spinal_cord"}),
    ("t2", {1: "spinal_cord"}),
    ("t2s", {1: "cord_white_matter", 2: "cord_grey_matter"}),
    ("mt1", {1: "cord_white_matter", 2: "cord_grey_matter"}),
)


def build(out: Path, sdist_path: Path, shared_data: Path) -> dict[str, int]:
    """Write the cases into `out` (images, labels/final/) and return the label map they share."""
    labels_dir = out / "labels" / "final"
    labels_dir.mkdir(parents=True, exist_ok=True)
    label_map = {"background": 0, "lesion": 1}
    with tarfile.open(sdist_path) as sdist:
        for case in ("brain2", "lung2"):
            image, header = read_sdist_nrrd(sdist, case, "image")
            lesion, _ = read_sdist_nrrd(sdist, case, "label")
            write_nrrd(out / f"{case}.nrrd", image, nrrd_geometry(header))
            write_nrrd(labels_dir / f"{case}.nrrd", (lesion > 0).astype(np.uint8), nrrd_geometry(header))
    shutil.copy(REPO_ROOT / "sample-data" / "breast1.nii.gz", out / "breast1.nii.gz")
    shutil.copy(REPO_ROOT / "tests" / "data" / "breast1_lesion_label.nii.gz", labels_dir / "breast1.nii.gz")

    aal = nib.load(MRICRON_TEMPLATES / "aal.nii.gz")
    aal_values = read_aal_values(MRICRON_TEMPLATES / "aal.nii.txt")
    regions = np.asarray(aal.dataobj)
    colin_label = np.zeros(regions.shape, dtype=np.uint8)
    for region in AAL_REGIONS:
        label_map[f"aal_{region.lower()}"] = len(label_map)
        colin_label[regions == aal_values[region]] = label_map[f"aal_{region.lower()}"]
    shutil.copy(MRICRON_TEMPLATES / "ch2.nii.gz", out / "colin27_ch2.nii.gz")
    save_nifti(labels_dir / "colin27_ch2.nii.gz", colin_label, aal.affine, xform_code=2)

    for stem, structures in SPINAL_CORD:
        image = nib.load(shared_data / "pairs" / "spinal_cord" / f"{stem}_image.nii.gz")
        label = np.asarray(nib.load(shared_data / "pairs" / "spinal_cord" / f"{stem}_label.nii.gz").dataobj)
        named = np.zeros(label.shape, dtype=np.uint8)
        for value, name in structures.items():
            label_map.setdefault(name, len(label_map))
            named[label == value] = label_map[name]
        shutil.copy(image.get_filename(), out / f"spinal_cord_{stem}.nii.gz")
        save_nifti(labels_dir / f"spinal_cord_{stem}.nii.gz", named, image.affine, xform_code=1)
    (out / "labels.json").write_text(json.dumps(label_map, indent=1) + "\n")
    return label_map


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pyradiomics-sdist", type=Path, required=True, help="pyradiomics-3.0.1.tar.gz from PyPI")
    parser.add_argument("--shared-data", type=Path, default=SHARED_DATA, help="the team's ../shared/data")
    args = parser.parse_args(argv)
    label_map = build(args.out, args.pyradiomics_sdist, args.shared_data)
    print(f"{args.out}: {len(list(args.out.glob('*.n*')))} images, {len(label_map) - 1} structures")


if __name__ == "__main__":
    main()
