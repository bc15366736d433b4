"""Click simulation shared by training and evaluation (see `simulator`)."""

from lib.clicks.simulator import (
    CLICK_PRESETS,
    NEGATIVE,
    PADDING,
    POSITIVE,
    Click,
    ClickConfig,
    ClickNoise,
    first_click,
    next_click,
    sample_clicks,
)

__all__ = [
    "CLICK_PRESETS",
    "NEGATIVE",
    "PADDING",
    "POSITIVE",
    "Click",
    "ClickConfig",
    "ClickNoise",
    "first_click",
    "next_click",
    "sample_clicks",
]
