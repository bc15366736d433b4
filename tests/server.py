"""Start and stop a real `monailabel start_server` process with the MAIS app, for the tests.

The server runs exactly as a user starts it (same CLI, same app folder), on 127.0.0.1 and a free port, against a
temporary copy of the sample data so that tests never write into the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "mais"
SAMPLE_DATA = REPO_ROOT / "sample-data"

# First start on a cold CI machine imports torch, monai and monailabel: allow for slow disks.
STARTUP_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def copy_sample_data(target: Path) -> Path:
    """Copy the shipped datastore, without the index MONAI Label writes into it at run time."""
    shutil.copytree(SAMPLE_DATA, target, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
    return target


def server_command(studies: Path | str, port: int, conf: dict[str, str] | None = None) -> list[str]:
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR)]
    command += ["--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)]
    for key, value in (conf or {}).items():
        command += ["--conf", key, value]
    return command


class MonaiLabelServer:
    """A running server; use as a context manager or call start()/stop()."""

    def __init__(
        self, studies: Path | str, log_path: Path, conf: dict[str, str] | None = None, env: dict[str, str] | None = None
    ):
        self.studies = studies
        self.env = env or {}
        # training runs and the weights they publish stay in the test's folder, never in the app's
        self.conf = {"train_dir": str(log_path.parent / "train"), **(conf or {})}
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> MonaiLabelServer:
        env = dict(os.environ, PYTHONUNBUFFERED="1", MONAI_LABEL_TRACKING_ENABLED="false", **self.env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                server_command(self.studies, self.port, self.conf),
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # so stop() can end the training subprocesses it spawns too
            )
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> MonaiLabelServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_until_exit(studies: Path | str, conf: dict[str, str] | None, timeout_s: float = STARTUP_TIMEOUT_S):
    """Run a server start that is expected to fail; returns (exit code, combined output)."""
    result = subprocess.run(
        server_command(studies, free_port(), conf),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dict(os.environ, MONAI_LABEL_TRACKING_ENABLED="false"),
    )
    return result.returncode, result.stdout + result.stderr


def server_benchmark_parser(description: str) -> argparse.ArgumentParser:
    """The parser of a benchmark that drives a server over HTTP, with --url and --studies (see `serving`); the
    benchmark adds its own options."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one on a copy of sample-data)")
    parser.add_argument("--studies", type=Path, default=SAMPLE_DATA, help="its datastore folder")
    parser.add_argument(
        "--weights", type=Path, help="without --url: the server serves these weights (default: the shipped ones)"
    )
    return parser


@contextlib.contextmanager
def serving(
    url: str | None,
    scratch: Path,
    prepare: Callable[[Path], object] | None = None,
    weights: Path | None = None,
) -> Iterator[tuple[str, Path | None]]:
    """(URL to benchmark, its studies folder when this started the server): `url` and None when given, else a
    server started for the block on a copy of sample-data under `scratch` (its log there too; `prepare` adds to
    the copy first; `weights` served instead of the shipped ones) and stopped after it."""
    if url is not None:
        if weights is not None:
            raise ValueError("--weights is for a server the benchmark starts, not one at --url")
        yield url, None
        return
    studies = copy_sample_data(scratch / "studies")
    if prepare is not None:
        prepare(studies)
    conf = {"weights": str(weights.resolve())} if weights is not None else None
    server = MonaiLabelServer(studies, scratch / "server.log", conf=conf).start()
    try:
        yield server.url, studies
    finally:
        server.stop()


class Cut(Exception):
    """SIGTERM arrived (a time limit such as `timeout`'s): a benchmark prints what it measured before it."""


def raise_cut_on_sigterm() -> None:
    """From now on SIGTERM raises `Cut` in the main thread."""

    def cut(signum, frame):
        raise Cut

    signal.signal(signal.SIGTERM, cut)
