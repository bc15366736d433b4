"""One server behind Debian's haproxy with TLS and a login (docs/haproxy-auth.cfg), as docs/DEPLOY.md's "TLS and
authentication" sets it up: without the login nothing is answered, not even the list of studies; with it, MONAI
Label's own client gets a mask; plain HTTP gets no answer; only the listed web origins (and the site's own pages)
may call the server from a browser."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from clicking import BRAIN1_LESION_MIN_DICE, dice, load
from server import REPO_ROOT, SAMPLE_DATA, MonaiLabelServer, copy_sample_data, free_port

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
HAPROXY_CONFIG = REPO_ROOT / "docs" / "haproxy-auth.cfg"

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy; .ci/run does)"),
]

USER, PASSWORD = "annotator", "correct horse battery staple"
# a viewer served from another site (an OHIF of the hospital's own) that the proxy is told to let in
VIEWER_ORIGIN = "https://viewer.example.org"
LESION = 1
BRAIN1_LESION_CLICK = [192, 98, 14]  # inside brain1's lesion (i 162-208, j 84-153, k 11-17)


def openssl(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(["openssl", *args], input=stdin, capture_output=True, text=True, check=True)
    return result.stdout


class Proxy:
    """Debian's haproxy running docs/haproxy-auth.cfg in the foreground, in front of `server`, its log in `folder`.

    Its certificate is self-signed for 127.0.0.1 and made here; `ca` is what a client must trust to verify it."""

    def __init__(self, server: MonaiLabelServer, folder: Path):
        self.ca = folder / "cert.pem"
        key = folder / "key.pem"
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(self.ca))  # fmt: skip
        # haproxy takes the certificate and its key from one file
        pem = folder / "mais.pem"
        pem.write_text(self.ca.read_text() + key.read_text())
        self.port = free_port()
        self.origin = f"https://127.0.0.1:{self.port}"
        self.log_path = folder / "haproxy.log"
        env = dict(
            os.environ,
            MAIS_PROXY=f"127.0.0.1:{self.port}",
            MAIS_TLS_PEM=str(pem),
            MAIS_SERVER=f"127.0.0.1:{server.port}",
            MAIS_USER=USER,
            # as DEPLOY.md has a site make it: the password on stdin, never on a command line
            MAIS_PASSWORD_HASH=openssl("passwd", "-6", "-stdin", stdin=PASSWORD).strip(),
            MAIS_CORS_ORIGINS=VIEWER_ORIGIN,
        )
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(HAPROXY_CONFIG)], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        try:
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_until_listening(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, f"haproxy exited with {self.process.returncode}:\n{self.log()}"
            try:
                requests.get(f"{self.origin}/info/", verify=self.ca, timeout=10)
                return
            except requests.ConnectionError:
                assert time.monotonic() < deadline, f"haproxy not listening after {timeout_s} s:\n{self.log()}"
                time.sleep(0.2)

    def get(self, path: str, **kwargs) -> requests.Response:
        """A request as a browser or script makes it: over TLS, verifying the certificate."""
        return requests.get(f"{self.origin}{path}", verify=self.ca, timeout=60, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server of its own (not conftest's shared one): the proxy's log then shows this module's requests only."""
    folder = tmp_path_factory.mktemp("auth-server")
    running = MonaiLabelServer(copy_sample_data(folder / "studies"), folder / "server.log")
    with running:
        yield running
        print(running.log()[-3000:])


@pytest.fixture(scope="module")
def proxy(server, tmp_path_factory):
    running = Proxy(server, tmp_path_factory.mktemp("auth-proxy"))
    try:
        yield running
    finally:
        running.stop()
        print(running.log())


def logged_in_client(proxy: Proxy, tmpdir: Path) -> MONAILabelClient:
    """MONAI Label's client with the login: update_auth is its one way to send an Authorization header."""
    client = MONAILabelClient(proxy.origin, tmpdir=str(tmpdir), client_id=USER)
    login = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    client.update_auth({"token_type": "Basic", "access_token": login})
    return client


def test_without_the_login_nothing_is_answered(proxy):
    for path in ("/info/", "/datastore/?output=all"):
        for auth in (None, (USER, "wrong password"), ("someone", PASSWORD)):
            response = proxy.get(path, auth=auth)
            assert response.status_code == 401, f"GET {path} with {auth}: {response.status_code}"
            # a browser (OHIF) asks the user for the login on this header
            assert response.headers.get("WWW-Authenticate") == 'Basic realm="MAIS"'
            assert "brain1" not in response.text
    with pytest.raises(MONAILabelClientException) as refused:
        MONAILabelClient(proxy.origin).info()
    assert refused.value.status_code == 401


def test_the_official_client_with_the_login_gets_a_mask(proxy, tmp_path):
    client = logged_in_client(proxy, tmp_path)
    assert client.info()["name"] == "MAIS"
    assert "brain1" in client.datastore()["objects"]
    params = {"lesion": [BRAIN1_LESION_CLICK], "label": "lesion", "result_extension": ".nrrd", "result_dtype": "uint8"}
    result_file, _ = client.infer("mais", "brain1", params)
    mask = load(result_file)[0] == LESION
    truth = load(SAMPLE_DATA / "labels" / "final" / "brain1.nrrd")[0] == LESION
    assert mask[tuple(BRAIN1_LESION_CLICK)], "the clicked voxel is not in the mask"
    assert dice(mask, truth) > BRAIN1_LESION_MIN_DICE


def test_plain_http_gets_no_answer(proxy):
    # the TLS port is the only one: a client set to http:// fails at once instead of sending studies in the clear
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{proxy.port}/info/", timeout=10)


def test_only_the_listed_origins_and_the_sites_own_pages_may_call_it(proxy):
    login = (USER, PASSWORD)
    listed = proxy.get("/info/", auth=login, headers={"Origin": VIEWER_ORIGIN})
    assert listed.status_code == 200
    # named, not `*`: a browser hands a page the answer to a request that carried the login only then
    assert listed.headers.get("Access-Control-Allow-Origin") == VIEWER_ORIGIN

    # MONAI Label's OHIF at /ohif/ is a page of the proxy's own origin, and its POSTs name it
    own = proxy.get("/info/", auth=login, headers={"Origin": proxy.origin})
    assert own.status_code == 200

    # a page of another site, in the browser of an annotator who has logged in, gets nothing
    foreign = proxy.get("/datastore/?output=all", auth=login, headers={"Origin": "https://elsewhere.example.com"})
    assert foreign.status_code == 403
    assert "Access-Control-Allow-Origin" not in foreign.headers
    assert "brain1" not in foreign.text

    # The browser's permission request before a click (a multipart POST from another origin) carries no login: the
    # listed origin gets its permission, any other is refused.
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    allowed = requests.options(
        f"{proxy.origin}/infer/mais?image=brain1", headers={"Origin": VIEWER_ORIGIN, **preflight}, verify=proxy.ca
    )
    assert allowed.status_code == 200
    assert allowed.headers.get("Access-Control-Allow-Origin") == VIEWER_ORIGIN
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"].split(", ")
    refused = requests.options(
        f"{proxy.origin}/infer/mais?image=brain1",
        headers={"Origin": "https://elsewhere.example.com", **preflight},
        verify=proxy.ca,
    )
    assert refused.status_code == 403
