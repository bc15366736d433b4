#!/usr/bin/env bash
# The test command (README "Two commands"; CI runs it through .ci/run): installs what the tests need, system
# packages included, then runs every test. Run from anywhere; it works in the repository's root.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages, from Debian: the PACS tests (tests/test_dicomweb.py) start a real Orthanc with its DICOMweb
# plugin; the OHIF test (tests/test_ohif.py) drives the OHIF bundled with MONAI Label in chromium through
# Playwright (tests/ohif/package-lock.json; no browser download). Debian's nodejs (18) is enough for the pinned
# playwright-core. The replica test (tests/test_replicas.py) puts Debian's haproxy in front of two servers; the
# proxy test (tests/test_auth_proxy.py) puts it in front of one, with a certificate and a password hash made by
# openssl (not in a minimal Debian). Orthanc and haproxy install to /usr/sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
missing=()
command -v Orthanc >/dev/null || missing+=(orthanc orthanc-dicomweb)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v openssl >/dev/null || missing+=(openssl)
command -v chromium >/dev/null || missing+=(chromium)
command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi
[ -d tests/ohif/node_modules/playwright-core ] || (cd tests/ohif && npm ci --no-audit --no-fund)

python3 -m venv .venv && . .venv/bin/activate && pip install -q -r requirements-test.txt && python -m pytest -v "$@"
