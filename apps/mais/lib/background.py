"""Background work yields the CPU to clicks.

MONAI Label runs training and scoring (active learning) in a process of their own, `python -m
monailabel.interfaces.utils.app -m train|scoring ...`, which builds the app again. On a CPU server that process
competes with the server's clicks for the same cores: the start-up scoring run took a first click to 10 s. So the
app, when it is built inside that runner, drops the runner's scheduling priority to the lowest (nice 19): an idle
server lends it every core, and a click takes them back as soon as it arrives.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

BACKGROUND_RUNNER = "monailabel.interfaces.utils.app"
BACKGROUND_NICENESS = 19


def in_background_runner() -> bool:
    """Whether this process is MONAI Label's runner of a training or scoring task (not the server)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name == BACKGROUND_RUNNER


def yield_cpu_to_the_server() -> None:
    """In the background runner, lower every thread of this process to BACKGROUND_NICENESS; elsewhere nothing."""
    if not in_background_runner():
        return
    # Linux keeps a niceness per thread, and a thread takes its creator's: every thread started so far is
    # lowered, so the ones torch starts later are low too.
    threads = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for thread in threads:
        os.setpriority(os.PRIO_PROCESS, int(thread), BACKGROUND_NICENESS)
    logger.info("background task: CPU priority lowered to nice %d, clicks go first", BACKGROUND_NICENESS)
