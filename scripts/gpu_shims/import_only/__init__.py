"""Stand-in for a package that MONAI Label imports at start but only its DICOM paths call (see ../README.md):
installed as `itk` and as `SimpleITK`, it names itself after the name it is imported under. Any attribute is a
placeholder (pydicom-seg evaluates `SimpleITK.Image` and `SimpleITK.sitkUInt8` at import), and calling or using
one raises an error that names the stand-in."""

from __future__ import annotations

__version__ = "0+mais.stand.in"
IS_MAIS_STAND_IN = True
_PACKAGE = __name__.partition(".")[0]


class _Missing:
    def __init__(self, name: str):
        self._name = name

    def _fail(self, *args, **kwargs):
        raise RuntimeError(
            f"{_PACKAGE}.{self._name}: this is the MAIS stand-in for {_PACKAGE} (scripts/gpu_shims), which cannot do "
            f"anything; the DICOM paths need the real {_PACKAGE}"
        )

    __call__ = _fail

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(f"{self._name}.{name}")

    def __repr__(self) -> str:
        return f"<MAIS stand-in {_PACKAGE}.{self._name}>"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Missing(name)
