"""Stand-in for SimpleITK that can only be imported (see ../README.md): any name of it is a placeholder, and
calling or using one raises. MONAI Label and pydicom-seg import SimpleITK at start; only DICOM paths call it."""

from __future__ import annotations

__version__ = "0+mais.stand.in"
IS_MAIS_STAND_IN = True


class _Missing:
    def __init__(self, name: str):
        self._name = name

    def _fail(self, *args, **kwargs):
        raise RuntimeError(
            f"SimpleITK.{self._name}: this is the MAIS stand-in for SimpleITK (scripts/gpu_shims), which cannot do "
            "anything; the DICOM paths need the real SimpleITK"
        )

    __call__ = _fail

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(f"{self._name}.{name}")

    def __repr__(self) -> str:
        return f"<MAIS stand-in SimpleITK.{self._name}>"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Missing(name)
