"""The app's result writer (lib.mask_file) against MONAI Label's Writer with the real ITK, which it replaced: the
same voxels, geometry and header fields for every format and compression a request can ask for, read back by
ITK (SimpleITK), nibabel and pynrrd, and gzip streams that a single-member reader such as pynrrd takes whole."""

from __future__ import annotations

import zlib

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from monai.transforms import LoadImage
from monailabel.transform.writer import write_itk

from lib.mask_file import CHUNK_BYTES, write_mask
from server import SAMPLE_DATA

FORMATS = [(".nrrd", False), (".nrrd", True), (".nii.gz", True), (".nii", False)]
NRRD_FIELDS = ["type", "dimension", "space", "sizes", "space directions", "kinds", "encoding", "space origin"]


@pytest.fixture(scope="module")
def results():
    """(name, voxels [I, J, K] in Fortran order as the infer task holds them, RAS affine): a lesion-like box on
    lung1's RAS grid, every voxel set at random on brain1's LPS grid in int16 and float32 (every chunk deflated,
    none reused), and a volume whose byte count is no multiple of CHUNK_BYTES."""
    lung1 = LoadImage(image_only=True)(str(SAMPLE_DATA / "lung1.nii.gz"))
    box = np.zeros(lung1.shape, np.uint8, order="F")
    box[200:260, 210:250, 20:30] = 3
    brain1 = LoadImage(image_only=True)(str(SAMPLE_DATA / "brain1.nrrd"))
    noise = np.asfortranarray(np.random.default_rng(0).integers(-500, 500, brain1.shape, dtype=np.int16))
    odd = np.zeros((67, 45, 31), np.uint16, order="F")
    odd[-1, -1, -1] = 65535
    assert odd.nbytes % CHUNK_BYTES and noise.nbytes > 4 * CHUNK_BYTES
    return [
        ("lung1-box", box, lung1.affine.numpy()),
        ("brain1-noise", noise, brain1.affine.numpy()),
        ("brain1-float", noise.astype(np.float32) / 7, brain1.affine.numpy()),
        ("odd", odd, np.diag([0.5, -2.0, 3.0, 1.0])),
    ]


@pytest.mark.parametrize("extension, compress", FORMATS)
def test_a_result_reads_back_as_what_monai_labels_writer_wrote_with_itk(results, tmp_path, extension, compress):
    for name, voxels, affine in results:
        itk_file, ours = tmp_path / f"{name}-itk{extension}", tmp_path / f"{name}{extension}"
        write_itk(voxels, str(itk_file), affine, voxels.dtype, compress)
        write_mask(ours, voxels, affine, compress=compress)
        a, b = sitk.ReadImage(str(itk_file)), sitk.ReadImage(str(ours))
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b), err_msg=name)
        assert a.GetPixelID() == b.GetPixelID(), name
        for geometry in ("GetOrigin", "GetSpacing", "GetDirection"):
            np.testing.assert_allclose(getattr(a, geometry)(), getattr(b, geometry)(), atol=1e-6, err_msg=name)
        loaded = LoadImage(image_only=True)(str(ours))  # the reader the app itself uses
        np.testing.assert_array_equal(np.asarray(loaded), voxels, err_msg=name)
        np.testing.assert_allclose(loaded.affine.numpy(), affine, atol=1e-6, err_msg=name)
        if extension == ".nrrd":
            ha, hb = nrrd.read_header(str(itk_file)), nrrd.read_header(str(ours))
            for field in NRRD_FIELDS:
                np.testing.assert_array_equal(ha[field], hb[field], err_msg=f"{name}: {field}")
            np.testing.assert_array_equal(nrrd.read(str(ours), index_order="F")[0], voxels, err_msg=name)
        else:
            ha, hb = nib.load(itk_file).header, nib.load(ours).header
            assert ha.get_data_dtype() == hb.get_data_dtype(), name
            assert (int(ha["qform_code"]), int(ha["sform_code"])) == (int(hb["qform_code"]), int(hb["sform_code"]))
            np.testing.assert_array_equal(np.asarray(nib.load(ours).dataobj), voxels, err_msg=name)


def test_a_compressed_result_is_one_gzip_member_with_its_checksum(results, tmp_path):
    """A reader that stops at the first member's end (pynrrd, zlib.decompressobj) must get every voxel, and the
    gzip trailer's CRC-32 and size are checked by the decompressor: with every chunk deflated, with zero chunks
    among them, and with a short zero chunk at the end (an empty result whose size is no multiple of a chunk)."""
    empty = ("empty", np.zeros((301, 250, 9), np.uint8, order="F"), np.eye(4))
    assert empty[1].nbytes % CHUNK_BYTES and empty[1].nbytes > CHUNK_BYTES
    for name, voxels, affine in [*results, empty]:
        write_mask(tmp_path / f"{name}.nii.gz", voxels, affine)
        stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
        data = stream.decompress((tmp_path / f"{name}.nii.gz").read_bytes())
        assert stream.eof and stream.unused_data == b"", name
        assert data[352:] == voxels.tobytes(order="F"), name


def test_a_result_that_cannot_be_written_is_refused_with_its_reason(tmp_path):
    affine = np.eye(4)
    with pytest.raises(ValueError, match=r"\.nrrd, \.nii\.gz or \.nii"):
        write_mask(tmp_path / "label.mha", np.zeros((2, 2, 2), np.uint8), affine)
    with pytest.raises(ValueError, match="float64 cannot be written"):
        write_mask(tmp_path / "label.nrrd", np.zeros((2, 2, 2)), affine)
    with pytest.raises(ValueError, match="3D"):
        write_mask(tmp_path / "label.nrrd", np.zeros((2, 2), np.uint8), affine)
