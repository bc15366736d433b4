"""The stand-ins of scripts/gpu_shims/, which the GPU benchmark (scripts/bench_gpu_server.sh) installs where the
real ITK, SimpleITK or distutils cannot be: the ITK one writes what ITK writes through MONAI Label's Writer."""

from __future__ import annotations

import importlib.util
import warnings

import nibabel as nib
import nrrd
import numpy as np
import pytest
from monai.transforms import LoadImage
from monailabel.transform import writer

from server import REPO_ROOT, SAMPLE_DATA

SHIMS = REPO_ROOT / "scripts" / "gpu_shims"


def stand_in(package: str, module: str = "__init__"):
    spec = importlib.util.spec_from_file_location(f"mais_stand_in_{package}_{module}", SHIMS / package / f"{module}.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


@pytest.fixture(scope="module")
def images():
    """(name, voxels, affine, dtype): a uint8 mask on lung1's RAS grid, brain1's float image on its LPS grid."""
    lung1 = LoadImage(image_only=True)(str(SAMPLE_DATA / "lung1.nii.gz"))
    mask = (np.random.default_rng(0).random(lung1.shape) > 0.99).astype(np.uint8)
    brain1 = LoadImage(image_only=True)(str(SAMPLE_DATA / "brain1.nrrd"))
    return [
        ("lung1-mask", mask, lung1.affine.numpy(), np.uint8),
        ("brain1", np.asarray(brain1, dtype=np.float32), brain1.affine.numpy(), np.float32),
    ]


@pytest.mark.parametrize("extension, compress", [(".nrrd", False), (".nrrd", True), (".nii.gz", False)])
def test_the_itk_stand_in_writes_what_itk_writes(images, tmp_path, monkeypatch, extension, compress):
    real_itk = writer.itk
    for name, voxels, affine, dtype in images:
        real, shimmed = tmp_path / f"{name}-itk{extension}", tmp_path / f"{name}-stand-in{extension}"
        writer.write_itk(voxels, str(real), affine, dtype, compress)
        monkeypatch.setattr(writer, "itk", stand_in("itk"))
        writer.write_itk(voxels, str(shimmed), affine, dtype, compress)
        monkeypatch.setattr(writer, "itk", real_itk)
        a, b = LoadImage(image_only=True)(str(real)), LoadImage(image_only=True)(str(shimmed))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-6)
        if extension == ".nrrd":
            # `type`: pynrrd writes "uint8" where ITK writes "unsigned char", synonyms in NRRD: the data types match
            assert nrrd.read(str(real))[0].dtype == nrrd.read(str(shimmed))[0].dtype
            fields = ["dimension", "space", "sizes", "space directions", "kinds", "encoding", "space origin"]
            ha, hb = nrrd.read_header(str(real)), nrrd.read_header(str(shimmed))
            for field in fields:
                np.testing.assert_array_equal(ha[field], hb[field], err_msg=field)
        else:
            ha, hb = nib.load(real).header, nib.load(shimmed).header
            assert ha.get_data_dtype() == hb.get_data_dtype()
            assert (int(ha["qform_code"]), int(ha["sform_code"])) == (int(hb["qform_code"]), int(hb["sform_code"]))


def test_the_itk_stand_in_refuses_what_it_cannot_do(tmp_path):
    itk = stand_in("itk")
    image = itk.image_from_array(np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(NotImplementedError, match="stand-in"):
        itk.imwrite(image, str(tmp_path / "x.mha"))
    with pytest.raises(AttributeError, match="stand-in"):
        itk.imread(str(tmp_path / "x.nrrd"))


def test_the_simpleitk_stand_in_imports_and_refuses_every_call():
    sitk = stand_in("SimpleITK")
    annotation, constant = sitk.Image, sitk.sitkUInt8  # what pydicom-seg evaluates at import
    with pytest.raises(RuntimeError, match="stand-in"):
        sitk.ReadImage("label.nrrd")
    with pytest.raises(RuntimeError, match="stand-in"):
        annotation(1, 1, 1, constant)


def test_the_distutils_stand_in_reads_truth_values_as_distutils_did():
    util = stand_in("distutils", "util")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from distutils.util import strtobool
    for value in ["y", "YES", "t", "True", "on", "1", "n", "No", "f", "false", "OFF", "0"]:
        assert util.strtobool(value) == strtobool(value)
    for module in (util, None):
        with pytest.raises(ValueError):
            (module.strtobool if module else strtobool)("maybe")
