"""Stand-in for ITK's Python package: only what MONAI Label's Writer uses to write a 3D result (see ../README.md).

`write_itk` (monailabel/transform/writer.py) calls image_from_array on the transposed [K, J, I] array, size,
SetDirection(matrix_from_array(...)), SetSpacing, SetOrigin, then imwrite(image, file, compress). This writes
the same image as ITK does: NRRD in LPS space (pynrrd, which names the `type` uint8 where ITK writes unsigned
char, synonyms in NRRD), NIfTI with the RAS affine (nibabel); tests/test_gpu_shims.py compares the two.
"""

from __future__ import annotations

import numpy as np

__version__ = "0+mais.stand.in"
IS_MAIS_STAND_IN = True

_NRRD_TYPES = {
    "int8": "signed char",
    "uint8": "unsigned char",
    "int16": "short",
    "uint16": "unsigned short",
    "int32": "int",
    "uint32": "unsigned int",
    "int64": "long long",
    "uint64": "unsigned long long",
    "float32": "float",
    "float64": "double",
}


class _Image:
    """An image as ITK holds it: voxels [K, J, I] (NumPy's view of ITK's buffer), spacing, origin, direction."""

    def __init__(self, array: np.ndarray):
        self.array = np.ascontiguousarray(array)
        dim = self.array.ndim
        self.spacing = np.ones(dim)
        self.origin = np.zeros(dim)
        self.direction = np.eye(dim)

    def SetDirection(self, direction) -> None:  # noqa: N802 (ITK's names)
        self.direction = np.asarray(direction, dtype=np.float64)

    def SetSpacing(self, spacing) -> None:  # noqa: N802
        self.spacing = np.asarray(spacing, dtype=np.float64)

    def SetOrigin(self, origin) -> None:  # noqa: N802
        self.origin = np.asarray(origin, dtype=np.float64)

    def GetImageDimension(self) -> int:  # noqa: N802
        return self.array.ndim


def image_from_array(array, is_vector: bool = False, ttype=None) -> _Image:
    if is_vector:
        raise NotImplementedError(f"{__name__} (MAIS stand-in for ITK): vector images are not supported")
    return _Image(np.asarray(array))


def size(image: _Image) -> list[int]:
    return list(image.array.shape[::-1])


def matrix_from_array(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


def imwrite(image: _Image, filename, compression: bool = False, compression_level: int = -1, **kwargs) -> None:
    filename = str(filename)
    voxels = image.array.transpose()  # back to [I, J, K]
    if image.array.ndim != 3:
        raise NotImplementedError(f"{__name__} (MAIS stand-in for ITK) writes 3D images only: {image.array.shape}")
    axes = image.direction * image.spacing  # column i: axis i's step in LPS millimetres
    if filename.endswith(".nrrd"):
        import nrrd

        if voxels.dtype.name not in _NRRD_TYPES:
            raise NotImplementedError(f"{__name__} (MAIS stand-in for ITK): no NRRD type for {voxels.dtype}")
        header = {
            "type": _NRRD_TYPES[voxels.dtype.name],
            "dimension": 3,
            "space": "left-posterior-superior",
            "sizes": list(voxels.shape),
            "space directions": axes.T,
            "kinds": ["domain"] * 3,
            "encoding": "gzip" if compression else "raw",
            "space origin": image.origin,
        }
        if voxels.dtype.itemsize > 1:
            header["endian"] = "little"
        level = compression_level if compression_level > 0 else 4  # close to ITK's own output size
        nrrd.write(filename, np.asfortranarray(voxels), header, index_order="F", compression_level=level)
    elif filename.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        affine = np.eye(4)
        affine[:3, :3], affine[:3, 3] = axes, image.origin
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS
        out = nib.Nifti1Image(voxels, affine)
        out.header.set_xyzt_units("mm", "sec")
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        nib.save(out, filename)
    else:
        raise NotImplementedError(f"{__name__} (MAIS stand-in for ITK) writes .nrrd, .nii and .nii.gz: {filename}")


def __getattr__(name: str):
    raise AttributeError(
        f"itk.{name}: this is the MAIS stand-in for ITK (scripts/gpu_shims), which only writes .nrrd/.nii results; "
        "install the real itk for anything else"
    )
