#!/usr/bin/env bash
# The whole suite: make sure the services it needs are up, build the test peers, run pytest.
# Services a test needs beyond Postgres (zfs-fuse, sshd, vcsim, the OpenZFS guest) are started
# by the fixtures themselves, for the run, and torn down after.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
step() { printf '\n=== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

step "Postgres"
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start || true
    for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
fi
pg_isready -h 127.0.0.1 -p 5432 || { [ "${ZERFAUX_REQUIRE_REAL:-}" = 1 ] && echo "Postgres is required" >&2 && exit 1; }

if [ -x tests/vcsim/build.sh ]; then
  step "vCenter simulator (vcsim)"
  tests/vcsim/build.sh || { [ "${ZERFAUX_REQUIRE_REAL:-}" = 1 ] && exit 1; }
fi
if [ -x tests/openzfs/build-guest.sh ] && [ "${ZERFAUX_SKIP_OPENZFS:-}" != 1 ]; then
  step "OpenZFS guest image (cached after the first build)"
  tests/openzfs/build-guest.sh || { [ "${ZERFAUX_REQUIRE_REAL:-}" = 1 ] && exit 1; }
fi

step "pytest"
exec "$PY" -m pytest "$@"
