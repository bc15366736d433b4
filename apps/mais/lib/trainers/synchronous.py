"""`POST /train/{model}?run_sync=true` without freezing the server: the run goes to a subprocess, as every other run.

MONAI Label 0.8.5 answers run_sync by calling the trainer inside its `async def` endpoint
(monailabel/endpoints/train.py -> AsyncTask.run(force_sync=True) -> app.train): the training runs on the event
loop's own thread, so no other request (`/info`, clicks, `DELETE /train/`) is answered until it ends, and
`DELETE /train/` has no process to kill. Here the endpoint starts the run exactly as MONAI Label starts an
asynchronous one (a `monailabel.interfaces.utils.app -m train` subprocess, in MONAI Label's task list, that
`DELETE /train/` kills), awaits its end with asyncio.sleep, which leaves the event loop free, and answers what a
synchronous run answered: the trainer's result (the `train_stats.json` it writes last and returns), or the
trainer's refusal (422) before the run starts. A stopped run is 409, a failed one 500.

The route goes in front of MONAI Label's when the app enters server mode (MaisApp.server_mode), which only the
server's start does: the training subprocess, which loads the app too, never adds it. Requests without run_sync
go to MONAI Label's own code unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from fastapi import Depends, HTTPException
from fastapi.concurrency import run_in_threadpool
from monailabel.config import settings
from monailabel.endpoints import train as monai_label_train
from monailabel.endpoints.user.auth import RBAC
from monailabel.interfaces.utils.app import app_instance

logger = logging.getLogger(__name__)

# How often the waiting request looks at the run's status: a run takes tens of seconds at least (the subprocess
# imports torch), so this adds little to its answer.
POLL_S = 0.5
# MONAI Label's status of a task that has not ended (monailabel/utils/async_tasks/utils.py)
UNFINISHED = ("SUBMITTED", "RUNNING")


async def api_run_model(model: str, params: dict | None = None, run_sync: bool = False, enqueue: bool = False):
    """MONAI Label's endpoint, with the same parameters and the same admin role (install); only run_sync is answered
    differently."""
    if not run_sync:
        return monai_label_train.run_model(model, params, run_sync, enqueue)
    instance = app_instance()
    trainer = instance.trainer(model)
    if trainer is None:
        raise HTTPException(status_code=404, detail=f"no trainer {model!r}")
    # the refusals the run would make at its start, answered here: the subprocess's exception never reaches the
    # request. In a worker thread: a DICOMweb datalist asks the PACS.
    await run_in_threadpool(trainer.check, {"model": model, **(params or {})}, instance.datastore())
    # MONAI Label's asynchronous start: the same request, the same task list, 429 if a run is going and not enqueue
    task = monai_label_train.run_model(model, params, run_sync=False, enqueue=enqueue)
    while task["status"] in UNFINISHED:
        await asyncio.sleep(POLL_S)
    return finished_run(task, trainer.stats())


def finished_run(task: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """The answer to a run_sync request once MONAI Label's `task` has ended; `stats` is the trainer's last record.

    MONAI Label runs one training at a time, so after a run that ended well the record is that run's result."""
    if task["status"] == "DONE":
        return stats
    if task["status"] == "STOPPED":
        raise HTTPException(status_code=409, detail=f"the training run {task['id']} was stopped (DELETE /train/)")
    # The traceback may be missing: MONAI Label stops reading the process's output once it has exited.
    last_lines = " | ".join(list(task.get("details", []))[-3:])
    raise HTTPException(
        status_code=500,
        detail=f"the training run {task['id']} failed (GET /train/ shows its log; the server log has all of it): "
        f"{last_lines}",
    )


def install() -> None:
    """Put `api_run_model` in front of MONAI Label's `POST /train/{model}` route in the server's FastAPI app."""
    server = sys.modules.get("monailabel.app")  # the module uvicorn serves (start_server's default app)
    if server is None:
        logger.warning("MAIS: no monailabel.app in this process: run_sync training blocks the server")
        return
    app = server.app
    if any(getattr(route, "endpoint", None) is api_run_model for route in app.router.routes):
        return  # a second app instance (POST /reload) finds it there
    app.add_api_route(
        f"{settings.MONAI_LABEL_API_STR}/train/{{model}}",
        api_run_model,
        methods=["POST"],
        dependencies=[Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))],
        # MONAI Label's route, with the same parameters, stays in /docs
        include_in_schema=False,
    )
    # Starlette answers with the first route that matches: first, so MONAI Label's own is never reached
    app.router.routes.insert(0, app.router.routes.pop())
