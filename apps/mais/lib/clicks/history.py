"""Match the full click history a client resends with the history a session has already applied.

Slicer and OHIF send every click of the segment with every request and no interaction id. New clicks are the
ones not yet applied; clicks that disappeared from the request mean the user removed them (undo). The request
carries the order within its positive and within its negative list, not between them: a session's applied clicks
give that order as far as the request begins with them (`common_prefix`, for the session store and a session
alike); beyond that, positives come first, as for a newcomer sending the same request.
"""

from __future__ import annotations

from collections.abc import Sequence

from lib.clicks.simulator import NEGATIVE, POSITIVE, Click

# A click's coord here is an [i, j, k] voxel index of the original image.
Voxel = tuple[int, int, int]


def common_prefix(
    applied: Sequence[Click], positives: Sequence[Voxel], negatives: Sequence[Voxel]
) -> tuple[list[Click], list[Click]]:
    """(prefix, rest): the longest prefix of the applied clicks (arrival order) that the request carries, and the
    request's other clicks, positives first. The request's history in the applied clicks' order is prefix + rest;
    it extends them when the prefix is all of them."""
    remaining = {POSITIVE: list(positives), NEGATIVE: list(negatives)}
    prefix = []
    for click in applied:
        if click.coord not in remaining[click.label]:
            break
        remaining[click.label].remove(click.coord)
        prefix.append(click)
    rest = [Click(coord, POSITIVE) for coord in remaining[POSITIVE]]
    rest += [Click(coord, NEGATIVE) for coord in remaining[NEGATIVE]]
    return prefix, rest
