"""Build the compact training cache of ../shared/data: label maps (and real image/label pairs) in model space.

    python scripts/build_training_cache.py [--data ../shared/data] [--out data-cache/training_cache.npz]

What goes in: every set whose licence allows shipping weights trained on it (Apache-2.0, MIT, CC-BY-SA-4.0 in
the data's manifest.json); the `synthsr` label maps (licence unknown) only as validation entries. Each volume is
resampled to 1.5 mm RAS (lib/imaging.py MODEL_SPACING_MM; nearest for labels, linear for images) through its
real affine, cropped to its labelled bounding box plus a margin (a pair: to its image), its label values remapped
to consecutive uint8 (the original values are kept, so a class can be named) and its image, if any, scaled to
uint8 between robust percentiles. Why uint8 at 1.5 mm: the file must travel with the repository to the GPU machine
(64 MiB in all).

Held out for validation, recorded in the cache: whole subjects (HELD_OUT_FILES) and whole structure classes
(HELD_OUT_CLASSES: amygdala and putamen in every labelling that has them); the synthesiser never draws a held-out
class as a label target or part of one (it may still paint it into the image, and a pseudo-object, grown from
intensities, may overlap it).

The output (one `.npz`): `labels_NNN` uint8 [X, Y, Z], `image_NNN` uint8 [X, Y, Z] for pairs, and `metadata`, a
JSON string: {"spacing_mm", "held_out_classes", "volumes": [{set, kind, licence, citation, source_file, source,
values (original label value of each index 1..), held_out_indices, held_out (whole volume), validation_only,
shape, image_percentiles}]}.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "mais"))
from lib.imaging import MODEL_SPACING_MM, load_volume  # noqa: E402

SHIPPABLE_LICENCES = ("Apache-2.0", "MIT", "CC-BY-SA-4.0")
VALIDATION_ONLY_SETS = ("synthsr",)  # licence unknown: validation only (the data README)
CITATIONS = {
    "synthseg": "Billot et al., SynthSeg, Medical Image Analysis 2023",
    "synthseg_60feea3": "Billot et al., SynthSeg, Medical Image Analysis 2023",
    "synthsr": "Iglesias et al., SynthSR, Science Advances 2023",
    "gif_parcellation": "Cardoso et al., GIF, IEEE TMI 2015; Perez-Garcia et al., TorchIO, CMPB 2021",
    "msd_prostate": "Antonelli et al., The Medical Segmentation Decathlon, Nature Communications 2022",
    "verse": "Sekuboyina et al., VerSe, Medical Image Analysis 2021",
    "spinal_cord": "De Leener et al., SCT: Spinal Cord Toolbox, NeuroImage 2017",
    "sample_data": "sample-data/NOTICE (ICBM 2009a: Fonov et al., NeuroImage 2009; brain1: pyradiomics, "
    "van Griethuysen et al., Cancer Research 2017)",
}
# Real MR pairs of the repository's own sample data (licences in sample-data/NOTICE): real texture and real
# boundaries. Colin27 and breast1 stay out: they are held-out evaluation cases (scripts/build_heldout_cases.py).
SAMPLE_DATA_PAIRS = (
    ("icbm2009a_t1.nii.gz", "MNI/McGill permissive notice"),
    ("brain1.nrrd", "BSD-3-Clause"),
)
# Structure classes never trained on, by labelling. FreeSurfer: putamen 12/51, amygdala 18/54 (the merged-side
# maps use the left numbers). GIF v3 (Neuromorphometrics numbering + 1): amygdala 32/33, putamen 58/59, checked
# on the file: 2.0 ml each, inferior and anterior to the hippocampi (48/49); 5.9 ml each, lateral at z ~ +3 mm.
FREESURFER_HELD_OUT = (12, 18, 51, 54)
HELD_OUT_CLASSES = {
    "synthseg": FREESURFER_HELD_OUT,
    "synthseg_60feea3": FREESURFER_HELD_OUT,
    "synthsr": FREESURFER_HELD_OUT,
    "gif_parcellation": (32, 33, 58, 59),
}
# Whole subjects kept for validation: two of each synthseg kind, one older-set subject, four prostates and the
# spinal-cord subject (every contrast: it is one of the held-out evaluation cases).
HELD_OUT_FILES = (
    "label_maps/synthseg/training_seg_19.nii.gz",
    "label_maps/synthseg/training_seg_20.nii.gz",
    "label_maps/synthseg/subject19_seg.nii.gz",
    "label_maps/synthseg/subject20_seg.nii.gz",
    "label_maps/synthseg_60feea3/subject19_seg.nii.gz",
    "label_maps/msd_prostate/prostate_43.nii.gz",
    "label_maps/msd_prostate/prostate_44.nii.gz",
    "label_maps/msd_prostate/prostate_46.nii.gz",
    "label_maps/msd_prostate/prostate_47.nii.gz",
    "pairs/spinal_cord/t1_image.nii.gz",
    "pairs/spinal_cord/t2_image.nii.gz",
    "pairs/spinal_cord/t2s_image.nii.gz",
    "pairs/spinal_cord/mt1_image.nii.gz",
)
MARGIN_MM = 9.0  # context kept around the labelled box
IMAGE_PERCENTILES = (0.5, 99.5)


def model_space_grid(affine: np.ndarray, labelled: np.ndarray) -> tuple[np.ndarray, tuple]:
    """The 1.5 mm RAS grid covering the labelled box + margin. affine [4, 4] voxel -> RAS mm; labelled bool
    [I, J, K]. Returns (affine of the new grid [4, 4], its shape (X, Y, Z))."""
    voxels = np.argwhere(labelled)
    lo, hi = voxels.min(0) - 0.5, voxels.max(0) + 0.5  # voxel extents, not centres
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    first = world.min(0) - MARGIN_MM
    size = np.ceil((world.max(0) + MARGIN_MM - first) / MODEL_SPACING_MM).astype(int)
    grid = np.diag([MODEL_SPACING_MM] * 3 + [1.0])
    grid[:3, 3] = first + MODEL_SPACING_MM / 2
    return grid, tuple(int(s) for s in size)


def resample(volume: np.ndarray, affine: np.ndarray, grid: np.ndarray, shape: tuple, order: int) -> np.ndarray:
    """volume [I, J, K] with voxel->world `affine` onto the grid (`grid` [4, 4], `shape`); order 0 nearest, 1
    linear; zero outside."""
    to_source = np.linalg.inv(affine) @ grid  # new voxel -> source voxel
    return ndimage.affine_transform(
        volume, to_source[:3, :3], to_source[:3, 3], output_shape=shape, order=order, mode="constant", cval=0
    )


def consecutive(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """labels int [X, Y, Z] -> (uint8 with values 0..N, original value of each index 1..N)."""
    values = [int(v) for v in np.unique(labels) if v != 0]
    if len(values) > 255:
        raise ValueError(f"{len(values)} labels do not fit uint8")
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.uint8)
    lookup[values] = np.arange(1, len(values) + 1)
    return lookup[labels], values


def to_uint8(image: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """image float [X, Y, Z] -> uint8 between its robust percentiles (measured where the file has data)."""
    low, high = np.percentile(image[inside], IMAGE_PERCENTILES)
    scaled = np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0)
    return np.round(scaled * 255).astype(np.uint8), [float(low), float(high)]


def entries(data: Path) -> list[dict]:
    """The manifest's entries to cache, each {set, kind, licence, label_file, image_file?, source}."""
    chosen = []
    for entry in json.loads((data / "manifest.json").read_text()):
        shippable = entry["licence"] in SHIPPABLE_LICENCES
        if not shippable and entry["set"] not in VALIDATION_ONLY_SETS:
            continue
        if entry["kind"] == "label_map":
            files = {"label_file": entry["file"], "source": entry["source"]}
        else:
            files = {
                "label_file": entry["label"],
                "image_file": entry["image"]["file"],
                "source": {"image": entry["image"]["source"], "label": entry["label_sources"]},
            }
        chosen.append(
            {"set": entry["set"], "kind": entry["kind"], "licence": entry["licence"], "shippable": shippable, **files}
        )
    return chosen


def sample_data_entries(sample_data: Path) -> list[dict]:
    """The SAMPLE_DATA_PAIRS as entries of `entries`' form (paths relative to `sample_data`)."""
    return [
        {
            "set": "sample_data",
            "kind": "pair",
            "licence": licence,
            "shippable": True,
            "label_file": f"labels/final/{name}",
            "image_file": name,
            "source": "sample-data/NOTICE",
        }
        for name, licence in SAMPLE_DATA_PAIRS
    ]


def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(voxels float32 [I, J, K], voxel -> RAS affine [4, 4]) of a NIfTI or NRRD file."""
    volume = load_volume(str(path))
    return np.asarray(volume[0]), np.asarray(volume.affine, dtype=np.float64)


def build(data: Path, out: Path, sample_data: Path) -> dict:
    arrays, volumes = {}, []
    chosen = [(data, entry) for entry in entries(data)] + [(sample_data, e) for e in sample_data_entries(sample_data)]
    for index, (root, entry) in enumerate(chosen):
        labels, label_affine = read_volume(root / entry["label_file"])
        labels = np.round(labels).astype(np.int32)
        # a pair keeps its image's whole field of view: the real texture around the label is what it is for
        extent = labels > 0 if "image_file" not in entry else np.ones(labels.shape, dtype=bool)
        grid, shape = model_space_grid(label_affine, extent)
        resampled, values = consecutive(resample(labels, label_affine, grid, shape, order=0))
        held_out_values = HELD_OUT_CLASSES.get(entry["set"], ())
        record = {
            "set": entry["set"],
            "kind": entry["kind"],
            "licence": entry["licence"],
            "citation": CITATIONS[entry["set"]],
            "source_file": entry.get("image_file", entry["label_file"]),
            "label_file": entry["label_file"],
            "source": entry["source"],
            "values": values,
            "held_out_indices": [i + 1 for i, v in enumerate(values) if v in held_out_values],
            "held_out": entry.get("image_file", entry["label_file"]) in HELD_OUT_FILES
            or entry["label_file"] in HELD_OUT_FILES,
            "validation_only": not entry["shippable"],
            "shape": list(shape),
        }
        arrays[f"labels_{index:03d}"] = resampled
        if "image_file" in entry:
            image, image_affine = read_volume(root / entry["image_file"])
            if not np.allclose(image_affine, label_affine, atol=1e-3):
                raise ValueError(f"{entry['image_file']}: its label has another grid")
            inside = resample(np.ones_like(image), image_affine, grid, shape, order=0) > 0
            scaled, record["image_percentiles"] = to_uint8(resample(image, image_affine, grid, shape, 1), inside)
            arrays[f"image_{index:03d}"] = scaled
        volumes.append(record)
        print(f"{record['source_file']}: {shape}, {len(values)} labels{' (held out)' if record['held_out'] else ''}")
    missing = set(HELD_OUT_FILES) - {v["source_file"] for v in volumes} - {v["label_file"] for v in volumes}
    if missing:
        raise ValueError(f"held-out files not in the data: {sorted(missing)}")
    metadata = {
        "spacing_mm": MODEL_SPACING_MM,
        "held_out_classes": {name: list(values) for name, values in HELD_OUT_CLASSES.items()},
        "volumes": volumes,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_npz_lzma(out, {"metadata": np.array(json.dumps(metadata)), **arrays})
    return metadata


def write_npz_lzma(out: Path, arrays: dict[str, np.ndarray]) -> None:
    """An `.npz` that `np.load` reads, compressed with LZMA instead of `np.savez_compressed`'s deflate: 28 %
    smaller on this cache (7.4 against 10.4 MB), which the device call's 64 MiB carry needs; loading takes 0.5 s
    longer."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_LZMA) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--sample-data", type=Path, default=REPO / "sample-data")
    parser.add_argument("--out", type=Path, default=REPO / "data-cache" / "training_cache.npz")
    args = parser.parse_args(argv)
    if not (args.data / "manifest.json").is_file():
        parser.error(f"{args.data} has no manifest.json")
    metadata = build(args.data, args.out, args.sample_data)
    volumes = metadata["volumes"]
    held = sum(v["held_out"] for v in volumes)
    print(
        f"{args.out}: {args.out.stat().st_size / 1e6:.1f} MB, {len(volumes)} volumes "
        f"({held} held out, {sum(v['validation_only'] for v in volumes)} validation only)"
    )


if __name__ == "__main__":
    main()
