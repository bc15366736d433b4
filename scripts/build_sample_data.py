#!/usr/bin/env python3
"""Rebuild `sample-data/` (a MONAI Label LOCAL datastore) from Debian and PyPI packages, then check it.

How to run, from the repository root (apt-get needs root; no network beyond Debian and PyPI):

    apt-get install -y mricron-data
    python3 -m venv /work/datavenv
    /work/datavenv/bin/pip install -r scripts/requirements-sample-data.txt
    /work/datavenv/bin/pip download --no-deps --no-build-isolation --no-binary pyradiomics \
        pyradiomics==3.0.1 -d /tmp/pyradiomics-sdist
    /work/datavenv/bin/python scripts/build_sample_data.py \
        --pyradiomics-sdist /tmp/pyradiomics-sdist/pyradiomics-3.0.1.tar.gz

The pyradiomics data are read out of the source archive with tarfile; pyradiomics itself is never installed or
imported (its getTestCase() downloads). The output is byte-for-byte reproducible (gzip mtime 0, level 9).

Output (labels in the index space of apps/mais/lib/configs/labels.py):
    sample-data/colin27_t1.nii.gz          + labels/final/colin27_t1.nii.gz     AAL deep grey nuclei + precentral
    sample-data/icbm2009a_t1.nii.gz        + labels/final/icbm2009a_t1.nii.gz   grey/white matter/other brain
    sample-data/brain1.nrrd                + labels/final/brain1.nrrd           lesion (original LPS NRRD geometry)
    sample-data/lung1.nii.gz               + labels/final/lung1.nii.gz          lesion (CT, HU, int16)
    sample-data/breast1.nii.gz             unlabelled (reference: tests/data/breast1_lesion_label.nii.gz)
    sample-data/colin27_t1_brain.nii.gz    unlabelled
    sample-data/NOTICE
"""

import argparse
import gzip
import hashlib
import importlib.util
import io
import shutil
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import SimpleITK as sitk
from nilearn import datasets as nilearn_datasets
from scipy import ndimage

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "sample-data"
FINAL_LABELS = SAMPLE_DATA / "labels" / "final"
BREAST1_REFERENCE_LABEL = REPO_ROOT / "tests" / "data" / "breast1_lesion_label.nii.gz"
MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
PYRADIOMICS_SDIST_SHA256 = "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"
MAX_DATASTORE_MB = 25.0

# labels.py name stem -> AAL name stem (aal.nii.txt: "<voxel value> <name> <code>", e.g. "37 Hippocampus_L 4101")
AAL_STRUCTURES = {
    "hippocampus": "Hippocampus",
    "amygdala": "Amygdala",
    "caudate": "Caudate",
    "putamen": "Putamen",
    "pallidum": "Pallidum",
    "thalamus": "Thalamus",
    "precentral": "Precentral",
}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_XFORM_SCANNER, NIFTI_XFORM_MNI_152 = 1, 4


def load_sample_labels() -> dict[str, int]:
    """Import SAMPLE_LABELS from apps/mais/lib/configs/labels.py (plain Python, no app dependencies)."""
    path = REPO_ROOT / "apps" / "mais" / "lib" / "configs" / "labels.py"
    spec = importlib.util.spec_from_file_location("mais_sample_labels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.SAMPLE_LABELS)


SAMPLE_LABELS = load_sample_labels()
LABEL_NAMES = {value: name for name, value in SAMPLE_LABELS.items()}


# ----------------------------------------------------------------------------------------------------------- I/O
def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, xform_code: int) -> None:
    """Write a .nii.gz with a fresh header (qform = sform = affine, mm), gzip level 9 and mtime 0."""
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(data.dtype)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=xform_code)
    image.set_sform(affine, code=xform_code)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=9, mtime=0))


def nrrd_affine_ras(header: dict) -> np.ndarray:
    """Voxel -> RAS world affine of an LPS NRRD (rows of 'space directions' are the axis vectors)."""
    if header["space"] != "left-posterior-superior":
        raise ValueError(f"expected an LPS NRRD, got space={header['space']!r}")
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = np.asarray(header["space directions"], dtype=float).T
    affine_lps[:3, 3] = np.asarray(header["space origin"], dtype=float)
    return LPS_TO_RAS @ affine_lps


def nrrd_geometry(header: dict) -> dict:
    """The NRRD header fields that place the voxels in the world (copied unchanged to written NRRDs)."""
    return {key: header[key] for key in ("space", "space directions", "space origin")}


def write_nrrd(path: Path, data: np.ndarray, geometry: dict) -> None:
    """Write a gzip (level 9) NRRD with the given LPS geometry, minus pynrrd's "# on <date>" comment line."""
    header = {**geometry, "kinds": ["domain"] * data.ndim, "encoding": "gzip", "endian": "little"}
    buffer = io.BytesIO()
    nrrd.write(buffer, data, header, compression_level=9, index_order="F")
    header_text, blank_line, payload = buffer.getvalue().partition(b"\n\n")  # the header ends at the first blank line
    header_lines = [line for line in header_text.split(b"\n") if not line.startswith(b"# on ")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(header_lines) + blank_line + payload)


def read_sdist_nrrd(sdist: tarfile.TarFile, case: str, kind: str) -> tuple[np.ndarray, dict]:
    """Read `data/<case>_<kind>.nrrd` straight out of the pyradiomics source archive."""
    member = f"pyradiomics-3.0.1/data/{case}_{kind}.nrrd"
    with io.BytesIO(sdist.extractfile(member).read()) as stream:
        header = nrrd.read_header(stream)
        data = nrrd.read_data(header, stream, index_order="F")
    return data, header


def read_aal_values(names_file: Path) -> dict[str, int]:
    """AAL region name -> voxel value in aal.nii.gz."""
    values = {}
    for line in names_file.read_text().splitlines():
        if line.strip():
            value, name, _code = line.split()
            values[name] = int(value)
    return values


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------- geometry
def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Centroid of a boolean mask in the world coordinates of `affine` (mm)."""
    voxel_centroid = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ voxel_centroid + affine[:3, 3]


def voxel_centroid(mask: np.ndarray) -> np.ndarray:
    """Centroid of a boolean mask in (continuous) voxel indices."""
    return np.argwhere(mask).mean(axis=0)


def lps_to_ras(point: np.ndarray) -> np.ndarray:
    """Flip x and y of a world point (LPS <-> RAS)."""
    return point * np.array([-1.0, -1.0, 1.0])


# -------------------------------------------------------------------------------------------------------- builds
def build_colin27(out: Path) -> None:
    """Colin27 ch2 T1 with the AAL regions of labels.py merged into one uint8 label map; ch2bet unlabelled."""
    ch2 = nib.load(MRICRON_TEMPLATES / "ch2.nii.gz")
    aal = nib.load(MRICRON_TEMPLATES / "aal.nii.gz")
    ch2bet = nib.load(MRICRON_TEMPLATES / "ch2bet.nii.gz")
    for other in (aal, ch2bet):
        assert other.shape == ch2.shape and np.allclose(other.affine, ch2.affine), "mricron templates off-grid"
    assert ch2.get_data_dtype() == ch2bet.get_data_dtype() == np.uint8, "expected uint8 mricron templates"
    t1 = np.asarray(ch2.dataobj, dtype=np.uint8)
    aal_map = np.asarray(aal.dataobj)
    aal_values = read_aal_values(MRICRON_TEMPLATES / "aal.nii.txt")

    label = np.zeros(t1.shape, dtype=np.uint8)
    for name, index in SAMPLE_LABELS.items():
        stem, _, side = name.rpartition("_")
        if stem not in AAL_STRUCTURES:
            continue
        aal_name = f"{AAL_STRUCTURES[stem]}_{'L' if side == 'left' else 'R'}"
        region = aal_map == aal_values[aal_name]
        assert region.any(), f"AAL region {aal_name} is empty"
        assert not label[region].any(), f"AAL region {aal_name} overlaps another"
        label[region] = index

    save_nifti(out / "colin27_t1.nii.gz", t1, ch2.affine, NIFTI_XFORM_MNI_152)
    save_nifti(out / "labels" / "final" / "colin27_t1.nii.gz", label, ch2.affine, NIFTI_XFORM_MNI_152)
    brain = np.asarray(ch2bet.dataobj, dtype=np.uint8)
    save_nifti(out / "colin27_t1_brain.nii.gz", brain, ch2bet.affine, NIFTI_XFORM_MNI_152)
    check_colin27_label(label, t1, brain > 0, ch2.affine)


def build_icbm2009a(out: Path) -> None:
    """ICBM 2009a T1 (nilearn, stored back as its original uint8) with a tissue label from the GM/WM maps."""
    template = nilearn_datasets.load_mni152_template(resolution=1)
    grey = nilearn_datasets.load_mni152_gm_template(resolution=1)
    white = nilearn_datasets.load_mni152_wm_template(resolution=1)
    mask = nilearn_datasets.load_mni152_brain_mask(resolution=1)
    for other in (grey, white, mask):
        assert other.shape == template.shape and np.allclose(other.affine, template.affine), "nilearn maps off-grid"

    # nilearn rescales the uint8 file to [0, 1]; *255 gives the stored integers back exactly
    t1_float = template.get_fdata(dtype=np.float32)
    t1 = np.round(t1_float * 255).astype(np.uint8)
    assert np.array_equal(t1.astype(np.float32) / 255, t1_float), "ICBM template is not uint8/255"

    p_grey = grey.get_fdata(dtype=np.float32)
    p_white = white.get_fdata(dtype=np.float32)
    p_other = np.clip(1.0 - p_grey - p_white, 0.0, 1.0)
    tissue_values = np.array(
        [SAMPLE_LABELS["grey_matter"], SAMPLE_LABELS["white_matter"], SAMPLE_LABELS["other_brain"]], dtype=np.uint8
    )
    tissue = tissue_values[np.argmax(np.stack([p_grey, p_white, p_other]), axis=0)]  # ties -> grey, then white
    label = np.where(np.asarray(mask.dataobj) > 0, tissue, 0).astype(np.uint8)

    save_nifti(out / "icbm2009a_t1.nii.gz", t1, template.affine, NIFTI_XFORM_MNI_152)
    save_nifti(out / "labels" / "final" / "icbm2009a_t1.nii.gz", label, template.affine, NIFTI_XFORM_MNI_152)
    check_icbm_tissue(label, t1)


def build_lesion_cases(out: Path, sdist_path: Path) -> None:
    """pyradiomics brain1 (kept as LPS NRRD), lung1 and breast1 (NIfTI on their original voxel grids)."""
    with tarfile.open(sdist_path) as sdist:
        cases = {
            case: (read_sdist_nrrd(sdist, case, "image"), read_sdist_nrrd(sdist, case, "label"))
            for case in ("brain1", "lung1", "breast1")
        }
    for case, ((image, image_header), (label, label_header)) in cases.items():
        assert image.dtype == np.int16, f"{case}: expected int16 image, got {image.dtype}"
        assert set(np.unique(label)) == {0, 1}, f"{case}: expected a 0/1 lesion label"
        assert label.shape == image.shape, f"{case}: label and image shapes differ"
        for key in ("space directions", "space origin"):
            assert np.allclose(image_header[key], label_header[key]), f"{case}: label and image grids differ"
        check_lesion(case, image, label > 0)
    lesion = np.uint8(SAMPLE_LABELS["lesion"])

    # brain1: the original geometry (anisotropic, LAS in RAS terms) as NRRD; only the label dtype changes
    (image, header), (label, _) = cases["brain1"]
    write_nrrd(out / "brain1.nrrd", image, nrrd_geometry(header))
    write_nrrd(out / "labels" / "final" / "brain1.nrrd", (label > 0).astype(np.uint8) * lesion, nrrd_geometry(header))
    check_nrrd_pair(out / "brain1.nrrd", out / "labels" / "final" / "brain1.nrrd", image, label > 0, header)

    # lung1 (CT, HU) and breast1: same voxels, LPS header -> RAS affine
    (image, header), (label, _) = cases["lung1"]
    assert image.shape[:2] == (512, 512) and -1100 <= image.min() <= -900, "lung1: not a 512x512 CT in HU"
    affine = nrrd_affine_ras(header)
    save_nifti(out / "lung1.nii.gz", image, affine, NIFTI_XFORM_SCANNER)
    lung1_label = (label > 0).astype(np.uint8) * lesion
    save_nifti(out / "labels" / "final" / "lung1.nii.gz", lung1_label, affine, NIFTI_XFORM_SCANNER)
    check_nifti_conversion(out / "lung1.nii.gz", image, header)
    check_nifti_conversion(out / "labels" / "final" / "lung1.nii.gz", (label > 0).astype(np.uint8), header)

    (image, header), (label, _) = cases["breast1"]
    affine = nrrd_affine_ras(header)
    save_nifti(out / "breast1.nii.gz", image, affine, NIFTI_XFORM_SCANNER)
    save_nifti(BREAST1_REFERENCE_LABEL, (label > 0).astype(np.uint8) * lesion, affine, NIFTI_XFORM_SCANNER)
    check_nifti_conversion(out / "breast1.nii.gz", image, header)
    check_nifti_conversion(BREAST1_REFERENCE_LABEL, (label > 0).astype(np.uint8), header)


# -------------------------------------------------------------------------------------------------------- checks
def check_colin27_label(label: np.ndarray, t1: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> None:
    """AAL regions sit inside the brain, on the right side, in the right top-to-bottom and front-to-back order."""
    # ch2bet is a tight mask: deep nuclei lie wholly inside it, the precentral gyrus (cortex + sulcal CSF) within 3 mm
    near_brain = ndimage.binary_dilation(brain, iterations=3)
    centroids = {}
    for name, index in SAMPLE_LABELS.items():
        if name.rpartition("_")[0] not in AAL_STRUCTURES:
            continue
        region = label == index
        inside = near_brain[region].mean() if name.startswith("precentral") else brain[region].mean()
        assert inside > (0.9 if name.startswith("precentral") else 0.99), f"colin27 {name}: {inside:.0%} in brain"
        centroids[name] = world_centroid(region, affine)  # RAS mm
        side = np.sign(centroids[name][0])
        assert side == (-1 if name.endswith("_left") else 1), f"colin27 {name}: centroid on the wrong side"
    for side in ("left", "right"):
        c = {stem: centroids[f"{stem}_{side}"] for stem in AAL_STRUCTURES}
        assert c["amygdala"][1] > c["hippocampus"][1], f"{side} amygdala not anterior to hippocampus"
        assert c["hippocampus"][2] < c["thalamus"][2] < c["precentral"][2], f"{side}: wrong vertical order"
        assert c["caudate"][2] > c["putamen"][2] and c["caudate"][2] > c["pallidum"][2], f"{side}: caudate low"
        assert abs(c["putamen"][0]) > abs(c["pallidum"][0]) > abs(c["thalamus"][0]), f"{side}: lateral order"
    labelled = label > 0
    print(
        f"  colin27: mean T1 in AAL labels {t1[labelled].mean():.1f}, rest of brain {t1[brain & ~labelled].mean():.1f}"
    )


def check_icbm_tissue(label: np.ndarray, t1: np.ndarray) -> None:
    """On a T1 template, white matter is brighter than grey matter, which is brighter than CSF/other."""
    means = {name: t1[label == SAMPLE_LABELS[name]].mean() for name in ("white_matter", "grey_matter", "other_brain")}
    print("  icbm2009a: mean T1 " + ", ".join(f"{k} {v:.1f}" for k, v in means.items()))
    assert means["white_matter"] > means["grey_matter"] > means["other_brain"], "ICBM tissue contrast is wrong"


def check_lesion(case: str, image: np.ndarray, lesion: np.ndarray) -> None:
    """The lesion is inside the volume and brighter than a 3-voxel shell around it (all three cases enhance)."""
    lesion_box = np.argwhere(lesion)
    assert lesion_box.min() > 0 and np.all(lesion_box.max(axis=0) < np.array(image.shape) - 1), f"{case}: on border"
    shell = ndimage.binary_dilation(lesion, iterations=3) & ~lesion
    inside, around, spread = image[lesion].mean(), image[shell].mean(), image[lesion].std()
    print(
        f"  {case}: {lesion.sum()} lesion voxels, mean inside {inside:.1f}, shell {around:.1f}, elsewhere "
        f"{image[~lesion].mean():.1f}"
    )
    assert inside - around > spread, f"{case}: lesion does not stand out from its surroundings"


def check_nifti_conversion(nifti_path: Path, original: np.ndarray, nrrd_header: dict) -> None:
    """The NIfTI holds the same voxels as the NRRD and puts them at the same LPS points (nibabel and SimpleITK)."""
    converted = nib.load(nifti_path)
    data = np.asarray(converted.dataobj)
    assert np.array_equal(data, original), f"{nifti_path.name}: voxels changed"
    mask = data > 0 if data.dtype == np.uint8 else data > np.percentile(data, 90)
    index = voxel_centroid(mask)
    directions = np.asarray(nrrd_header["space directions"], dtype=float).T
    expected_lps = directions @ index + np.asarray(nrrd_header["space origin"], dtype=float)
    nibabel_lps = lps_to_ras(world_centroid(mask, converted.affine))
    sitk_lps = np.array(sitk.ReadImage(str(nifti_path)).TransformContinuousIndexToPhysicalPoint(index.tolist()))
    for reader, got in (("nibabel", nibabel_lps), ("SimpleITK", sitk_lps)):
        assert np.allclose(got, expected_lps, atol=1e-3), f"{nifti_path.name}: {reader} {got} != NRRD {expected_lps}"


def check_nrrd_pair(image_path: Path, label_path: Path, image: np.ndarray, lesion: np.ndarray, header: dict) -> None:
    """Written NRRD image and label share the source grid and voxels (pynrrd and SimpleITK agree)."""
    image_back, image_header = nrrd.read(str(image_path), index_order="F")
    label_back, label_header = nrrd.read(str(label_path), index_order="F")
    assert np.array_equal(image_back, image) and np.array_equal(label_back > 0, lesion), "NRRD voxels changed"
    assert label_back.dtype == np.uint8, "NRRD label is not uint8"
    for written in (image_header, label_header):
        assert np.allclose(nrrd_affine_ras(written), nrrd_affine_ras(header)), "NRRD geometry changed"
    sitk_image, sitk_label = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    for attribute in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(sitk_image, attribute)(), getattr(sitk_label, attribute)()), attribute
    index = voxel_centroid(lesion)
    expected_lps = np.asarray(header["space directions"], float).T @ index + np.asarray(header["space origin"], float)
    sitk_lps = np.array(sitk_label.TransformContinuousIndexToPhysicalPoint(index.tolist()))
    assert np.allclose(sitk_lps, expected_lps, atol=1e-4), "NRRD lesion centroid moved"


def load_any(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(voxels, RAS affine) of a .nii.gz or an LPS .nrrd."""
    if path.name.endswith(".nrrd"):
        data, header = nrrd.read(str(path), index_order="F")
        return data, nrrd_affine_ras(header)
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def image_files(datastore: Path) -> list[Path]:
    """Images of the datastore (top-level volumes)."""
    return sorted(p for p in datastore.iterdir() if p.name.endswith((".nii.gz", ".nrrd")))


def check_datastore(datastore: Path) -> list[dict]:
    """Layout checks (labels on the image grid, uint8, known indices, unlabelled images, size); summary rows."""
    rows = []
    for image_path in image_files(datastore):
        image, affine = load_any(image_path)
        row = {
            "file": image_path.name,
            "shape": image.shape,
            "dtype": str(image.dtype),
            "spacing": np.sqrt((affine[:3, :3] ** 2).sum(axis=0)),
            "axcodes": "".join(nib.aff2axcodes(affine)),
            "mb": image_path.stat().st_size / 1e6,
            "labels": "(unlabelled)",
        }
        label_path = datastore / "labels" / "final" / image_path.name
        if label_path.exists():
            label, label_affine = load_any(label_path)
            assert label.dtype == np.uint8, f"{label_path.name}: label dtype {label.dtype}"
            assert label.shape == image.shape and np.allclose(label_affine, affine, atol=1e-4), f"{image_path.name}"
            values, counts = np.unique(label, return_counts=True)
            assert set(values.tolist()) <= set(LABEL_NAMES), f"{label_path.name}: unknown label values"
            row["labels"] = ", ".join(f"{LABEL_NAMES[v]}={v}:{c}" for v, c in zip(values, counts) if v)
            row["mb"] += label_path.stat().st_size / 1e6
        rows.append(row)
    stray_labels = {p.name for p in (datastore / "labels" / "final").iterdir()} - {r["file"] for r in rows}
    assert not stray_labels, f"labels without an image: {stray_labels}"
    unlabelled = {r["file"] for r in rows if r["labels"] == "(unlabelled)"}
    assert unlabelled == {"breast1.nii.gz", "colin27_t1_brain.nii.gz"}, f"unlabelled images: {unlabelled}"
    assert not any((datastore / "labels").rglob("breast1*")), "breast1 must stay unlabelled in the datastore"
    total_mb = sum(p.stat().st_size for p in datastore.rglob("*") if p.is_file()) / 1e6
    assert total_mb < MAX_DATASTORE_MB, f"sample-data is {total_mb:.1f} MB"
    return rows


def print_summary(rows: list[dict], datastore: Path) -> None:
    """Print one line per image: file, shape, spacing, orientation, labels with voxel counts, MB (image+label)."""
    print(
        f"\n{'file':<24} {'shape':<16} {'dtype':<6} {'spacing (mm)':<20} {'axes':<5} {'MB':>6}  "
        "labels (name=value:voxels)"
    )
    for row in rows:
        shape = "x".join(map(str, row["shape"]))
        spacing = "x".join(f"{s:.3g}" for s in row["spacing"])
        print(
            f"{row['file']:<24} {shape:<16} {row['dtype']:<6} {spacing:<20} {row['axcodes']:<5} {row['mb']:6.2f}  "
            f"{row['labels']}"
        )
    total_mb = sum(p.stat().st_size for p in datastore.rglob("*") if p.is_file()) / 1e6
    print(f"total size of {datastore.name}/: {total_mb:.2f} MB (limit {MAX_DATASTORE_MB:.0f} MB)")


NOTICE = """\
Sample data of the MONAI Label app (a MONAI Label LOCAL datastore). Rebuilt by scripts/build_sample_data.py;
nothing here is hand-edited. Label values follow apps/mais/lib/configs/labels.py (SAMPLE_LABELS).
Images without a file in labels/final/ (breast1, colin27_t1_brain) are left for active learning.

1. colin27_t1.nii.gz, colin27_t1_brain.nii.gz, labels/final/colin27_t1.nii.gz
   Source: Debian package mricron-data (tested 1.2.20211006+dfsg-4), /usr/share/mricron/templates/
   ch2.nii.gz, ch2bet.nii.gz, aal.nii.gz, aal.nii.txt. Debian packaging: BSD-3-Clause (Copyright 2006-2010
   Chris Rorden; debian/* Copyright 2010 Michael Hanke).
   Colin27 (ch2, single-subject average of 27 T1 scans), MNI/McGill notice below. Cite: Holmes CJ, Hoge R,
   Collins L, Woods R, Toga AW, Evans AC. Enhancement of MR images using registration for signal averaging.
   J Comput Assist Tomogr 1998;22(2):324-333.
   AAL atlas drawn on Colin27. Cite: Tzourio-Mazoyer N, Landeau B, Papathanassiou D, Crivello F, Etard O,
   Delcroix N, Mazoyer B, Joliot M. Automated anatomical labeling of activations in SPM using a macroscopic
   anatomical parcellation of the MNI MRI single-subject brain. NeuroImage 2002;15(1):273-289.
   Done: voxels and grid unchanged (181x217x181, 1 mm, RAS; uint8); header rewritten (qform = sform, MNI code).
   Label: the 14 AAL regions Hippocampus, Amygdala, Caudate, Putamen, Pallidum, Thalamus, Precentral (_L/_R)
   relabelled to hippocampus_left ... precentral_right (values 5-18); all other AAL regions set to 0.
   colin27_t1_brain = ch2bet (brain-extracted Colin27), unlabelled.

2. icbm2009a_t1.nii.gz, labels/final/icbm2009a_t1.nii.gz
   Source: PyPI nilearn 0.14.1, nilearn.datasets.load_mni152_template / load_mni152_gm_template /
   load_mni152_wm_template / load_mni152_brain_mask (resolution=1; files
   mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz shipped in the wheel). ICBM 2009a nonlinear template,
   MNI/McGill notice below. Cite: Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear
   average age-appropriate brain templates from birth to adulthood. NeuroImage 2009;47(Suppl 1):S102.
   Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, Collins DL. Unbiased average age-appropriate
   atlases for pediatric studies. NeuroImage 2011;54(1):313-327.
   Done: T1 stored as the uint8 values of nilearn's file (nilearn's [0,1] scaling x 255, exact); grid
   unchanged (197x233x189, 1 mm, RAS). Label: inside the brain mask, the most probable of grey matter,
   white matter and other (1 - GM - WM) -> grey_matter=2, white_matter=3, other_brain=4; 0 outside the mask.

3. brain1.nrrd, labels/final/brain1.nrrd, lung1.nii.gz, labels/final/lung1.nii.gz, breast1.nii.gz
   Source: pyradiomics 3.0.1 source archive on PyPI (pyradiomics-3.0.1.tar.gz, sha256
   47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5), data/{brain1,lung1,breast1}_{image,label}.nrrd.
   Licence: BSD-3-Clause, Copyright 2017 Harvard Medical School. Cite: van Griethuysen JJM, Fedorov A,
   Parmar C, Hosny A, Aucoin N, Narayan V, Beets-Tan RGH, Fillion-Robin JC, Pieper S, Aerts HJWL.
   Computational Radiomics System to Decode the Radiographic Phenotype. Cancer Research 2017;77(21):e104-e107.
   Done: no resampling, no cropping, voxel values unchanged (int16; lung1 in Hounsfield units).
   brain1 (MR, 256x256x25, 0.78x0.78x6.5 mm) kept as LPS NRRD with its original space directions/origin;
   label re-stored as uint8, lesion=1. lung1 (CT, 512x512x48) and breast1 (MR, 45x120x21) converted to NIfTI:
   RAS affine = diag(-1,-1,1) x (NRRD space directions, space origin), same voxel order; lung1 label
   lesion=1. breast1 is unlabelled here; its reference lesion label is kept outside the datastore at
   tests/data/breast1_lesion_label.nii.gz (same grid) for evaluation.

BSD-3-Clause (pyradiomics; Debian mricron packaging; see the source packages for the full text):
  Redistribution and use in source and binary forms, with or without modification, are permitted provided
  that the following conditions are met: (1) Redistributions of source code must retain the above copyright
  notice, this list of conditions and the following disclaimer. (2) Redistributions in binary form must
  reproduce the above copyright notice, this list of conditions and the following disclaimer in the
  documentation and/or other materials provided with the distribution. (3) Neither the name of the copyright
  holder nor the names of its contributors may be used to endorse or promote products derived from this
  software without specific prior written permission. THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND
  CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED
  WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE
  COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR
  CONSEQUENTIAL DAMAGES ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE
  POSSIBILITY OF SUCH DAMAGE.

MNI/McGill notice (Colin27 and ICBM 2009a):
  Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,
  McGill University. Permission to use, copy, modify, and distribute this software and its documentation for
  any purpose and without fee is hereby granted, provided that the above copyright notice appear in all
  copies. The authors and McGill University make no representations about the suitability of this software
  for any purpose. It is provided "as is" without express or implied warranty. The authors are not
  responsible for any data loss, equipment damage, property loss, or injury to subjects or patients
  resulting from the use or misuse of this software package.
"""


def main() -> None:
    """Rebuild sample-data/ and tests/data/breast1_lesion_label.nii.gz, check them, print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pyradiomics-sdist",
        type=Path,
        default=Path("/tmp/pyradiomics-sdist/pyradiomics-3.0.1.tar.gz"),
        help="pyradiomics-3.0.1.tar.gz from `pip download --no-binary pyradiomics` (see top of file)",
    )
    args = parser.parse_args()
    if not (MRICRON_TEMPLATES / "ch2.nii.gz").exists():
        sys.exit("mricron-data is missing: apt-get install -y mricron-data")
    if not args.pyradiomics_sdist.exists() or sha256(args.pyradiomics_sdist) != PYRADIOMICS_SDIST_SHA256:
        sys.exit(f"{args.pyradiomics_sdist}: missing or not the pyradiomics 3.0.1 sdist (see top of file)")

    if SAMPLE_DATA.exists():
        shutil.rmtree(SAMPLE_DATA)  # generated content only; MONAI Label recreates its runtime files
    FINAL_LABELS.mkdir(parents=True)
    print("building sample-data/ ...")
    build_colin27(SAMPLE_DATA)
    build_icbm2009a(SAMPLE_DATA)
    build_lesion_cases(SAMPLE_DATA, args.pyradiomics_sdist)
    (SAMPLE_DATA / "NOTICE").write_text(NOTICE)

    rows = check_datastore(SAMPLE_DATA)
    print_summary(rows, SAMPLE_DATA)
    print("\nsha256:")
    for path in sorted(p for p in [*SAMPLE_DATA.rglob("*"), BREAST1_REFERENCE_LABEL] if p.is_file()):
        print(f"  {sha256(path)}  {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
