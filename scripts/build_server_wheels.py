"""Wheels to run the MAIS server and its HTTP benchmarks on a machine without network: the lent GPU machine.

That machine has Python 3.12, torch, numpy, scipy, scikit-image, requests, httpx and the other common packages
(COMMON below), and no package registry. This script downloads every other package that `monailabel start_server
--app apps/mais` and benchmarks/bench_server.py / bench_concurrency.py import (PACKAGES), at the versions
requirements.txt resolves to, for one Python version, into one folder (default `.whl-server/`, ignored by git),
and slims the large ones (SLIM): MONAI Label's bundled OHIF viewer and viewer plugins (19.5 of its 19.7 MB: /infer
and /info never serve them), the test suites and test data of nibabel, pydicom and passlib, pydicom's
structured-report dictionaries. A slimmed wheel keeps its name and gets a rewritten RECORD, so pip installs it
as usual. 12 MB in all, for an upload of 64 MiB that the repository fills to ~49 MB.
scripts/bench_gpu_server.sh installs them (scripts/complete_offline_site.py checks what it installed).

Three of MONAI Label's imports are not carried: ITK (itk-core + itk-io wheels: 109 MB; MONAI Label's Writer
imports it and writes the .nrrd and .nii.gz click results with it), SimpleITK (53 MB; imported by MONAI Label's
DICOM conversion and by pydicom-seg, used only for DICOM) and, on Python >= 3.12 without setuptools, distutils.
The stand-ins of scripts/gpu_shims/ replace them where the real ones do not import (see its README.md).

`fallback/` holds the small pure-Python packages that the target machine is expected to have, in the versions the
carried packages need at least (pydantic: typing_extensions >= 4.16; fastapi, starlette: anyio >= 4): one is
installed only where the machine's own is missing or older.

    python3 scripts/build_server_wheels.py                                  # cp312 into .whl-server/
    python3 scripts/build_server_wheels.py --python-version 3.11 --dest /tmp/whl311   # the CPU rehearsal
"""

from __future__ import annotations

import argparse
import base64
import csv
import fnmatch
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# What the server, the app and the two benchmarks import beyond COMMON, with what those import in turn; the
# versions `pip install -r requirements.txt` installs (2026-12-01). Found by starting the server and running both
# benchmarks in a venv holding COMMON only (scripts/bench_gpu_server.sh's CPU rehearsal, see its docstring).
# MONAI Label also requires, but never imports on this path, and so they are left out: pynetdicom, expiringdict,
# numpymaxflow, ninja, shapely, scikit-learn, sam2, monai's extras (itk, ignite, mlflow, ...), pyasn1-modules.
PACKAGES = {
    "monailabel": "0.8.5",
    "monai": "1.6.1",
    "nibabel": "5.4.2",
    "pynrrd": "1.1.3",
    "medim": "0.1.2",
    "appdirs": "1.4.4",
    # the web server
    "fastapi": "0.165.0",
    "starlette": "1.10.0",
    "annotated-doc": "0.0.7",
    "opentelemetry-api": "1.45.2",  # fastapi's telemetry module imports it
    "uvicorn": "0.54.0",
    "python-multipart": "0.0.34",
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "pydantic-settings": "2.16.3",
    "python-dotenv": "1.2.4",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    # imported by MONAI Label's modules at start (datastores, auth, the scheduler of its background jobs)
    "pydicom": "2.4.4",
    "pydicom-seg": "0.4.1",
    "jsonschema": "3.2.0",
    "attrs": "26.1.0",
    "pyrsistent": "0.20.0",
    "dicomweb-client": "0.59.1",
    "retrying": "1.4.2",
    # dicomweb-client's GCP session module, which MONAI Label imports at start, imports google.auth
    "google-auth": "2.63.0",
    "cryptography": "50.0.2",
    "cffi": "2.1.1",
    "girder-client": "5.0.21",
    "requests-toolbelt": "1.0.0",
    "diskcache": "5.6.3",
    "schedule": "1.2.2",
    "timeloop": "1.0.2",
    "expiring-dict": "1.1.2",
    "sortedcontainers": "2.4.0",
    "cachetools": "7.3.3",
    "watchdog": "7.1.0",
    "passlib": "1.7.4",
    "pyjwt": "2.15.1",
}

# Installed by bench_gpu_server.sh only where the machine's own copy is missing or too old for PACKAGES.
FALLBACK = {
    "typing-extensions": "4.16.0",
    "anyio": "4.16.0",
}

# What the target machine is expected to have already (not carried); the CPU rehearsal's venv holds these.
COMMON = (
    "numpy torch torchvision scipy scikit-image requests httpx anyio click h11 pyyaml filelock psutil tqdm "
    "matplotlib pillow packaging typing-extensions jinja2 uvloop urllib3 idna certifi six python-dateutil networkx "
    "sympy pandas werkzeug rich typer prometheus-client einops safetensors huggingface-hub timm"
).split()

# Paths (fnmatch patterns) dropped from a wheel: nothing the server imports or reads. Every wheel named here is
# also repacked at zlib level 9 (the two large binaries only for that: 0.1 MB).
SLIM = {
    "monailabel": [
        "monailabel/endpoints/static/ohif/*",  # the OHIF viewer bundle (51 MB unpacked)
        "*.data/*",  # the `monailabel apps` / `plugins` copies of sample apps and viewer plugins
        "tests/*",  # MONAI Label's own tests, installed as a top-level `tests` package
    ],
    "nibabel": ["*/tests/*"],
    # pydicom.sr: the structured-report code dictionaries (0.7 MB), imported by nothing else here; palettes and
    # charset test files: read only by pydicom's colour-palette and test-data helpers
    "pydicom": [
        "pydicom/tests/*",
        "pydicom/sr/*",
        "pydicom/data/test_files/*",
        "pydicom/data/charset_files/*",
        "pydicom/data/palettes/*",
    ],
    "passlib": ["passlib/tests/*", "passlib/_data/wordsets/*"],  # word lists of its password generator
    "cryptography": [],
    "pydantic-core": [],
}

# Not on the registry as a wheel: built from its sdist here (pure Python).
SDIST_ONLY = {"timeloop"}


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download(name: str, version: str, python_version: str, dest: Path) -> None:
    if name in SDIST_ONLY:
        with tempfile.TemporaryDirectory() as tmp:
            pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", tmp, f"{name}=={version}")
            pip("wheel", "-q", "--no-deps", "-w", str(dest), *map(str, Path(tmp).iterdir()))
        return
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    platforms.append("manylinux1_x86_64")
    pip(
        "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
        "--implementation", "cp", *(f"--platform={p}" for p in platforms), "-d", str(dest), f"{name}=={version}",
    )  # fmt: skip


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim(wheel: Path, patterns: list[str]) -> tuple[int, int]:
    """Rewrite `wheel` in place without the files matching `patterns`, with a RECORD of the files kept; returns
    (files dropped, files kept)."""
    with zipfile.ZipFile(wheel) as source:
        entries = source.infolist()
        record = next(e.filename for e in entries if e.filename.endswith(".dist-info/RECORD"))
        kept = [
            e for e in entries if e.filename != record and not any(fnmatch.fnmatch(e.filename, p) for p in patterns)
        ]
        contents = {e.filename: source.read(e) for e in kept}
    lines = io.StringIO()
    writer = csv.writer(lines, lineterminator="\n")
    for entry in kept:
        if not entry.is_dir():
            data = contents[entry.filename]
            writer.writerow([entry.filename, record_hash(data), len(data)])
    writer.writerow([record, "", ""])
    slimmed = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as target:
        for entry in kept:
            target.writestr(entry, contents[entry.filename], zipfile.ZIP_DEFLATED, 9)
        target.writestr(record, lines.getvalue())
    slimmed.replace(wheel)
    return len(entries) - 1 - len(kept), len(kept)


def wheel_of(dest: Path, name: str) -> Path:
    stem = name.replace("-", "_").lower()
    matches = [w for w in dest.glob("*.whl") if w.name.lower().startswith(stem + "-")]
    if len(matches) != 1:
        raise SystemExit(f"expected one wheel of {name} in {dest}, found {[m.name for m in matches]}")
    return matches[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--dest", type=Path, default=REPO_ROOT / ".whl-server")
    args = parser.parse_args()

    if args.dest.exists():
        shutil.rmtree(args.dest)
    (args.dest / "fallback").mkdir(parents=True)
    for name, version in PACKAGES.items():
        download(name, version, args.python_version, args.dest)
    for name, version in FALLBACK.items():
        download(name, version, args.python_version, args.dest / "fallback")
    for name, patterns in SLIM.items():
        wheel = wheel_of(args.dest, name)
        before = wheel.stat().st_size
        dropped, kept = slim(wheel, patterns)
        print(f"slimmed {wheel.name}: {before / 1e6:.2f} -> {wheel.stat().st_size / 1e6:.2f} MB ({dropped} files out)")

    wheels = sorted(args.dest.rglob("*.whl"))
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 1e3:9.1f} kB  {wheel.relative_to(args.dest)}")
    print(f"{sum(w.stat().st_size for w in wheels) / 2**20:9.2f} MiB in {len(wheels)} wheels, {args.dest}")


if __name__ == "__main__":
    main()
