"""Writing a click's result: a label volume as NRRD or NIfTI, on the image's own grid, in the time a click allows.

A result is mostly zeros (a lesion is a few thousand voxels of a 512 x 512 x 300 CT), so its gzip stream is
built the way pigz builds one: the voxel bytes are cut into chunks of CHUNK_BYTES, each deflated on its own and
ended with a sync flush, and the pieces joined into one gzip member (RFC 1951/1952: a sync flush ends a piece on a
byte boundary with a non-final block, so the joined pieces are one valid deflate stream). A chunk of zeros, by
far the most common, is deflated once per process and reused, and so is what it does to the CRC-32 (an affine map
of the CRC so far); the others are deflated in a thread pool, since
zlib releases the GIL. What comes out is an ordinary single-member gzip file that every reader opens (ITK, which
Slicer uses, nibabel, pynrrd, SimpleITK): on the 2-core CPU a 512 x 512 x 300 lesion mask took 112 ms through
MONAI Label's Writer (ITK) and 36 ms here before the CRC of the zero chunks was reused, the sample CT's 16 ms and
6 ms (benchmarks/bench_server.py prints the `write` stage); `write_mask` alone now takes 13 ms and 6 ms for them
(31 and 9 before the CRC's reuse).

The geometry is MONAI Label's (monailabel.transform.writer.write_itk): the RAS affine of the image as loaded,
written as LPS in NRRD and as qform and sform (code 1, scanner) in NIfTI. tests/test_mask_file.py writes the
same masks through MONAI Label's Writer with the real ITK and compares what both write.
"""

from __future__ import annotations

import functools
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.volume_formats import ResultDtype

CHUNK_BYTES = 1 << 18  # 256 KiB: about one slice of a 512 x 512 CT, so zero slices are skipped whole
DEFLATE_LEVEL = 1  # nibabel's default: the pieces holding the mask, deflated at every click
ZEROS_DEFLATE_LEVEL = 9  # the zero pieces, deflated once: 275 bytes per 256 KiB instead of level 1's 1165
_NRRD_TYPES: dict[ResultDtype, str] = {
    "uint8": "unsigned char",
    "uint16": "unsigned short",
    "int16": "short",
    "int32": "int",
    "float32": "float",
}
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_mask(path: str | os.PathLike, voxels: np.ndarray, affine: np.ndarray, compress: bool = True) -> None:
    """Write `voxels` [I, J, K] on the grid `affine` (4 x 4, voxel index to RAS mm) to `path`.

    The format is the extension's: `.nrrd` (gzip encoding when `compress`, else raw), `.nii.gz` (always gzip),
    `.nii` (never). Voxels are stored in their own dtype, one of _NRRD_TYPES; a Fortran-ordered array is
    written without a copy.
    """
    path = str(path)
    if voxels.ndim != 3:
        raise ValueError(f"a result volume is 3D, got shape {voxels.shape}")
    if voxels.dtype.name not in _NRRD_TYPES:
        raise ValueError(f"result voxels of {voxels.dtype} cannot be written; one of {sorted(_NRRD_TYPES)}")
    voxels = voxels.astype(voxels.dtype.newbyteorder("<"), order="F", copy=False)
    # index i fastest: NRRD's and NIfTI's order, and a view of the bytes of a Fortran-ordered array
    payload = memoryview(voxels.T.reshape(-1)).cast("B")
    affine = np.asarray(affine, dtype=np.float64)
    if path.endswith(".nrrd"):
        header = _nrrd_header(voxels, affine, "gzip" if compress else "raw")
        body = _gzip(payload) if compress else payload
        parts = [header, body]
    elif path.endswith(".nii.gz"):
        parts = [_gzip(payload, prefix=_nifti_header(voxels, affine))]
    elif path.endswith(".nii"):
        parts = [_nifti_header(voxels, affine), payload]
    else:
        raise ValueError(f"{Path(path).name}: a result is written as .nrrd, .nii.gz or .nii")
    with open(path, "wb") as out:
        for part in parts:
            out.write(part)


def _nrrd_header(voxels: np.ndarray, affine: np.ndarray, encoding: str) -> bytes:
    lps = _LPS_FROM_RAS @ affine
    directions = " ".join(_nrrd_vector(lps[:3, axis]) for axis in range(3))
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {_NRRD_TYPES[voxels.dtype.name]}",
        "dimension: 3",
        "space: left-posterior-superior",
        "sizes: {} {} {}".format(*voxels.shape),
        f"space directions: {directions}",
        "kinds: domain domain domain",
        *(["endian: little"] if voxels.dtype.itemsize > 1 else []),
        f"encoding: {encoding}",
        f"space origin: {_nrrd_vector(lps[:3, 3])}",
    ]
    return ("\n".join(lines) + "\n\n").encode("ascii")


def _nrrd_vector(values: np.ndarray) -> str:
    return "(" + ",".join(repr(float(x)) for x in values) + ")"


def _nifti_header(voxels: np.ndarray, affine: np.ndarray) -> bytes:
    """The 352 bytes before a .nii's voxels: nibabel's NIfTI-1 header and the empty extension flag."""
    header = nib.Nifti1Header()
    header.set_data_shape(voxels.shape)
    header.set_data_dtype(voxels.dtype)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    header.set_data_offset(352)
    return header.binaryblock + b"\0\0\0\0"


@functools.cache
def _deflated_zeros(size: int) -> bytes:
    return _deflate_piece(bytes(size), ZEROS_DEFLATE_LEVEL)


def _deflate_piece(data, level: int = DEFLATE_LEVEL) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate: no zlib wrapper
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


def _crc32_after_zeros(crc: int, size: int) -> int:
    """`zlib.crc32(bytes(size), crc)` without reading the zeros (the CRC of a 512 x 512 x 300 result took ~25 ms
    on the 2-core CPU, nearly all of it zero chunks): for fixed data a CRC-32 is an affine map of its starting
    value over GF(2), so it is its value from 0 with, for each set bit of `crc`, that bit's column added."""
    value, columns = _zeros_crc32_map(size)
    for bit in range(32):
        if crc >> bit & 1:
            value ^= columns[bit]
    return value


@functools.cache
def _zeros_crc32_map(size: int) -> tuple[int, tuple[int, ...]]:
    """The affine map of `_crc32_after_zeros`: the CRC of `size` zeros from 0, and what each of the 32 bits of
    the starting value changes in it."""
    zeros = bytes(size)
    from_zero = zlib.crc32(zeros, 0)
    return from_zero, tuple(zlib.crc32(zeros, 1 << bit) ^ from_zero for bit in range(32))


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="mask-deflate")


def _gzip(payload: memoryview, prefix: bytes = b"") -> bytes:
    """One gzip member of prefix + payload, deflated chunk by chunk (see the module's docstring)."""
    chunks = [payload[start : start + CHUNK_BYTES] for start in range(0, len(payload), CHUNK_BYTES)]
    nonzero = [np.frombuffer(chunk, dtype=np.uint8).any() for chunk in chunks]
    deflated = iter(_pool().map(_deflate_piece, [chunk for chunk, full in zip(chunks, nonzero) if full]))
    pieces = [_deflate_piece(prefix)] if prefix else []
    pieces += [next(deflated) if full else _deflated_zeros(len(chunk)) for chunk, full in zip(chunks, nonzero)]
    crc = zlib.crc32(prefix)
    for chunk, full in zip(chunks, nonzero):
        crc = zlib.crc32(chunk, crc) if full else _crc32_after_zeros(crc, len(chunk))
    size = (len(prefix) + len(payload)) & 0xFFFFFFFF
    gzip_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no time, unknown OS
    final_empty_block = b"\x03\x00"  # a fixed-Huffman block with BFINAL set and no symbols but end-of-block
    return b"".join([gzip_header, *pieces, final_empty_block, struct.pack("<II", crc, size)])
