"""Complete an offline install target (`pip install --target SITE` of .whl-server/*.whl) for this interpreter.

Run with PYTHONPATH=SITE by scripts/bench_gpu_server.sh, after the wheels are installed (`--unzip SITE WHEELS`
installs them where this Python has no pip: a wheel without a `.data` folder is a zip of SITE's files):

1. each wheel of WHEELS/fallback/ (typing_extensions, anyio, ...) is installed into SITE when some package in
   SITE requires it and the interpreter's own copy is missing or too old;
2. each stand-in of scripts/gpu_shims/ (itk, SimpleITK, distutils) is copied into SITE when the real module cannot
   be imported;
3. the requirements of SITE's packages that are still unmet are listed (MONAI Label lists many that only other
   apps or commands use: that is expected), and the modules the server imports are imported once, so that a
   missing one stops here with its traceback instead of in the server's log.

    PYTHONPATH=/tmp/site python3 scripts/complete_offline_site.py /tmp/site .whl-server
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIMS = REPO_ROOT / "scripts" / "gpu_shims"
# module to import -> stand-in package, installed under the module's top-level name; `distutils.util` as MONAI
# Label imports it
SHIMMED = {"itk": "import_only", "SimpleITK": "import_only", "distutils.util": "distutils"}
# what the server process imports (the app's main module imports MONAI Label's app, datastores and endpoints)
SMOKE = (
    "import sys; sys.path[:0] = ['apps/mais', 'tests', 'benchmarks'];"
    "import monailabel.main, monailabel.app, main, requests_toolbelt, bench_server, bench_concurrency;"
    "import torch; print('smoke import ok: torch', torch.__version__, 'cuda', torch.cuda.is_available())"
)


def importable(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def requirements(site: Path) -> list[tuple[str, Requirement]]:
    """(requiring package, requirement) of every package installed in `site`, markers evaluated, no extras."""
    found = []
    for dist in metadata.distributions(path=[str(site)]):
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                found.append((dist.metadata["Name"], requirement))
    return found


def unmet(site: Path) -> list[tuple[str, Requirement, str | None]]:
    result = []
    for owner, requirement in requirements(site):
        version = installed_version(requirement.name)
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            result.append((owner, requirement, version))
    return result


def has_pip() -> bool:
    return importable("pip")


def unzip_install(site: Path, wheel: Path) -> None:
    """What `pip install --no-deps --target` does with these wheels, for a Python without pip: they hold no
    `.data` folder (build_server_wheels.py drops MONAI Label's) and no scripts the server needs."""
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.split("/")[0].endswith(".data"):
                raise SystemExit(f"{wheel.name} has {name}: install it with pip")
        stale = {name.split("/", 1)[0] for name in archive.namelist() if "/" in name}
        for top in stale:  # --upgrade: the old copy of each top-level folder goes first
            shutil.rmtree(site / top, ignore_errors=True)
        archive.extractall(site)


def pip_install(site: Path, wheel: Path) -> None:
    if not has_pip():
        unzip_install(site, wheel)
        return
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
         "--upgrade", "--target", str(site), str(wheel)],
        check=True,
    )  # fmt: skip


def main() -> None:
    if sys.argv[1] == "--unzip":  # the install step itself, where this Python has no pip
        site, wheels = Path(sys.argv[2]).resolve(), Path(sys.argv[3])
        site.mkdir(parents=True, exist_ok=True)
        for wheel in sorted(wheels.glob("*.whl")):
            unzip_install(site, wheel)
        print(f"no pip here: {len(list(wheels.glob('*.whl')))} wheels unzipped into {site}")
        return
    site, wheels = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    if str(site) not in [os.path.realpath(p) for p in sys.path if p]:
        raise SystemExit(f"run with PYTHONPATH={site}")

    fallbacks = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in (wheels / "fallback").glob("*.whl")}
    missing = {canonicalize_name(r.name) for _, r, _ in unmet(site)}
    for name, wheel in sorted(fallbacks.items()):
        if name in missing:
            print(f"fallback: {wheel.name} (this Python has {name} {installed_version(name)})")
            pip_install(site, wheel)
        else:
            print(f"fallback not needed: {name} {installed_version(name)} meets the requirements")

    for module, package in SHIMMED.items():
        if importable(module):
            print(f"stand-in not needed: {module} imports")
        else:
            target = site / module.partition(".")[0]
            print(f"stand-in: {module} does not import here: scripts/gpu_shims/{package} copied to {target}")
            shutil.copytree(SHIMS / package, target, dirs_exist_ok=True)

    print("requirements of the installed packages that this Python does not meet:")
    for owner, requirement, version in unmet(site):
        print(f"  {owner}: {requirement} (installed: {version})")
    print(f"python {sys.version.split()[0]}; packages in {site}:")
    for dist in sorted(metadata.distributions(path=[str(site)]), key=lambda d: d.metadata["Name"].lower()):
        print(f"  {dist.metadata['Name']} {dist.version}")
    subprocess.run([sys.executable, "-c", SMOKE], cwd=REPO_ROOT, check=True)


if __name__ == "__main__":
    main()
