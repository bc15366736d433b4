"""The stand-ins of scripts/gpu_shims/, which the GPU benchmark (scripts/bench_gpu_server.sh) installs where the
real ITK, SimpleITK or distutils cannot be."""

from __future__ import annotations

import importlib.util
import warnings

import pytest

from server import REPO_ROOT

SHIMS = REPO_ROOT / "scripts" / "gpu_shims"


def stand_in(package: str, module: str = "__init__", imported_as: str | None = None):
    name = imported_as or f"mais_stand_in_{package}_{module}"
    spec = importlib.util.spec_from_file_location(name, SHIMS / package / f"{module}.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def test_the_import_only_stand_in_imports_and_refuses_every_call_under_its_own_name():
    sitk = stand_in("import_only", imported_as="SimpleITK")
    annotation, constant = sitk.Image, sitk.sitkUInt8  # what pydicom-seg evaluates at import
    with pytest.raises(RuntimeError, match="SimpleITK.ReadImage: this is the MAIS stand-in for SimpleITK"):
        sitk.ReadImage("label.nrrd")
    with pytest.raises(RuntimeError, match="stand-in"):
        annotation(1, 1, 1, constant)
    itk = stand_in("import_only", imported_as="itk")
    with pytest.raises(RuntimeError, match="itk.imwrite: this is the MAIS stand-in for itk"):
        itk.imwrite(None, "label.nrrd")


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
