"""Reconcile the full click history a client resends with the history a session has already applied.

Slicer and OHIF send every click of the segment with every request and no interaction id. New clicks are the
ones not yet applied; clicks that disappeared from the request mean the user removed them (undo). The request
carries the order within its positive and within its negative list, not between them: a session's applied clicks
give that order (`reconcile` for one session, `common_prefix` to compare the request with any session).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lib.clicks.simulator import NEGATIVE, POSITIVE, Click

# A click's coord here is an [i, j, k] voxel index of the original image.
Voxel = tuple[int, int, int]


@dataclass(frozen=True)
class HistoryUpdate:
    """What to do with a session: append `new` to the applied clicks, or rebuild from `replay` if it is set."""

    new: list[Click]
    replay: list[Click] | None


def reconcile(applied: Sequence[Click], positives: Sequence[Voxel], negatives: Sequence[Voxel]) -> HistoryUpdate:
    """Compare the applied clicks (arrival order) with the request's lists.

    Applied clicks still in the request keep their arrival order; request clicks beyond them are new and come
    after, positives first (a request normally adds one click). If any applied click is gone, the session is
    rebuilt from the clicks that remain plus the new ones.
    """
    remaining = {POSITIVE: list(positives), NEGATIVE: list(negatives)}
    kept = []
    for click in applied:
        if click.coord in remaining[click.label]:
            remaining[click.label].remove(click.coord)
            kept.append(click)
    new = [Click(coord, POSITIVE) for coord in remaining[POSITIVE]]
    new += [Click(coord, NEGATIVE) for coord in remaining[NEGATIVE]]
    if len(kept) == len(applied):
        return HistoryUpdate(new=new, replay=None)
    return HistoryUpdate(new=[], replay=kept + new)


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
