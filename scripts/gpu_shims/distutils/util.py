"""`strtobool` exactly as Python 3.11's distutils.util has it: all that MONAI Label uses of distutils."""


def strtobool(val: str) -> int:
    """Convert a string representation of truth to 1 or 0; raise ValueError for anything else."""
    val = val.lower()
    if val in ("y", "yes", "t", "true", "on", "1"):
        return 1
    if val in ("n", "no", "f", "false", "off", "0"):
        return 0
    raise ValueError(f"invalid truth value {val!r}")
