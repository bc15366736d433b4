"""Two replicas behind Debian's haproxy (docs/haproxy.cfg: round robin, no affinity), as docs/DEPLOY.md lays them
out: any replica answers any click with the mask a single server gives, and a replica killed mid-session costs no
click. Only HTTP behaviour is checked: the same clicks must give the same masks, whichever replica answers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from monailabel.client.client import MONAILabelUtils

from clicking import RESULTS_DIR, load, slicer_click
from lib.configs.labels import SAMPLE_LABELS
from server import REPO_ROOT, MonaiLabelServer, copy_sample_data, free_port

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
HAPROXY_CONFIG = REPO_ROOT / "docs" / "haproxy.cfg"

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy; .ci/run does)"),
]

IMAGE, LABEL, LESION = "brain1", "lesion", 1
POSITIVE, NEGATIVE = "+", "-"
# Two annotators on the same image and label (where a mix-up of their sessions would show), clicking in and
# around brain1's lesion (i 162-208, j 84-153, k 11-17). Slicer's request lists positives and negatives apart, so
# the order of a positive and a negative click that a replica has not seen yet is lost: it runs the positives
# first (lib/clicks/history.py). Under the routing below no replica misses a negative click followed by a
# positive one (bob's [+, -] replayed is in its true order; alice's negatives come last), so the masks must match
# bit for bit. Where one does (alice +, +, -, + with her last two clicks new to the survivor), about 100 of the
# 1.6 M voxels differ: docs/DEPLOY.md's affinity by image keeps a user's clicks on one replica.
CLICKS = {
    "alice": [
        (POSITIVE, [192, 98, 14]),
        (POSITIVE, [175, 125, 14]),
        (NEGATIVE, [205, 80, 14]),
        (NEGATIVE, [165, 95, 16]),
    ],
    "bob": [
        (POSITIVE, [180, 140, 15]),
        (NEGATIVE, [150, 100, 14]),
        (POSITIVE, [195, 105, 13]),
        (POSITIVE, [170, 110, 12]),
    ],
}
# The order the clicks reach haproxy: (user, how many of their clicks the request carries). Round robin alternates
# the replicas, so each user's consecutive clicks land on different ones until the kill.
BEFORE_KILL = [("alice", 1), ("alice", 2), ("bob", 1), ("bob", 2), ("alice", 3), ("bob", 3)]
AFTER_KILL = [("alice", 4), ("bob", 4)]


def history(user: str, count: int) -> tuple[list, list]:
    """(positives, negatives) of the user's first `count` clicks: Slicer resends the whole history every time."""
    clicks = CLICKS[user][:count]
    return [c for kind, c in clicks if kind == POSITIVE], [c for kind, c in clicks if kind == NEGATIVE]


def click_through(url: str, user: str, count: int) -> tuple[np.ndarray, str]:
    """Slicer's request (as slicer_click sends it, through MONAI Label's client code) and the mask it gets back,
    with the replica haproxy says answered it."""
    positives, negatives = history(user, count)
    params = {name: [] for name in SAMPLE_LABELS}
    params.update({LABEL: positives, "background": negatives, "label": LABEL, "client_id": user})
    params.update({"result_extension": ".nrrd", "result_dtype": "uint8"})
    status, form, files, headers = MONAILabelUtils.http_multipart(
        "POST", url, f"/infer/mais?image={IMAGE}", {"params": json.dumps(params)}, {}, headers={}
    )
    assert status == 200, f"{user}'s click {count} through haproxy: HTTP {status}: {form!r}"
    return load(MONAILabelUtils.save_result(files, RESULTS_DIR))[0], headers.get("X-Served-By")


class Haproxy:
    """Debian's haproxy running docs/haproxy.cfg in the foreground, its log in `log_path`."""

    def __init__(self, replicas: dict[str, MonaiLabelServer], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # docs/haproxy.cfg's server replicaN is at $MAIS_REPLICA_N
        addresses = {f"MAIS_REPLICA_{name[-1]}": f"127.0.0.1:{server.port}" for name, server in replicas.items()}
        env = dict(os.environ, MAIS_LB=f"127.0.0.1:{self.port}", **addresses)
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(HAPROXY_CONFIG)], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self._wait_for(set(replicas))

    def _wait_for(self, names: set[str], timeout_s: float = 30) -> None:
        """Until haproxy has sent a request to each replica (both passed their health checks)."""
        seen, deadline = set(), time.monotonic() + timeout_s
        while seen != names:
            assert self.process.poll() is None, f"haproxy exited with {self.process.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"haproxy reached only {seen} of {names}:\n{self.log()}"
            try:
                response = requests.get(f"{self.url}/info/", timeout=10)
                if response.ok:
                    seen.add(response.headers.get("X-Served-By"))
            except requests.ConnectionError:
                time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture()
def replicas(tmp_path):
    """Two servers on one studies folder and one train_dir (as DEPLOY.md shares them), started in parallel."""
    studies = copy_sample_data(tmp_path / "studies")
    servers = {name: MonaiLabelServer(studies, tmp_path / f"{name}.log") for name in ("replica1", "replica2")}
    try:
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(MonaiLabelServer.start, servers.values()))
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture()
def haproxy(replicas, tmp_path):
    running = Haproxy(replicas, tmp_path / "haproxy.log")
    yield running
    running.stop()
    print(running.log())


def test_any_replica_answers_any_click_and_a_killed_one_costs_no_click(replicas, haproxy):
    masks, served_by = {}, {}
    for user, count in BEFORE_KILL:
        masks[user, count], served_by[user, count] = click_through(haproxy.url, user, count)
    routes = [served_by[key] for key in BEFORE_KILL]
    assert all(a != b for a, b in zip(routes, routes[1:])), (
        f"round robin did not alternate (CLICKS relies on it): {routes}"
    )
    for user in CLICKS:
        replicas_seen = {served_by[key] for key in served_by if key[0] == user}
        assert replicas_seen == set(replicas), f"{user}'s clicks did not land on both replicas: {served_by}"

    # SIGKILL, no goodbye, the one round robin picks next: the next click reaches haproxy before any health check
    # has failed, so it is haproxy's retry on the refused connection that must send it to the other replica.
    survivor = served_by[BEFORE_KILL[-1]]
    killed = next(name for name in replicas if name != survivor)
    os.killpg(replicas[killed].process.pid, signal.SIGKILL)
    replicas[killed].process.wait()
    for user, count in AFTER_KILL:
        masks[user, count], served_by[user, count] = click_through(haproxy.url, user, count)
        assert served_by[user, count] == survivor, f"{user}'s click {count} after the kill: {served_by}"

    # The reference: each user alone on one server, click by click, straight to the survivor.
    for user, count in sorted(masks):
        positives, negatives = history(user, count)
        alone, _, _ = slicer_click(replicas[survivor].url, f"{user}-alone", IMAGE, LABEL, positives, negatives)
        np.testing.assert_array_equal(masks[user, count], alone, err_msg=f"{user} after {count} clicks")

    # masks that a mix-up of the users' sessions, or a lost click, would change
    assert masks["alice", 1][tuple(CLICKS["alice"][0][1])] == LESION
    assert not np.array_equal(masks["alice", 4], masks["bob", 4])
    for user in CLICKS:
        distinct = {masks[user, count].tobytes() for count in range(1, len(CLICKS[user]) + 1)}
        assert len(distinct) == len(CLICKS[user]), f"some click of {user}'s left the mask unchanged"
