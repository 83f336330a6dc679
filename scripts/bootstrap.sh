#!/usr/bin/env bash
# Installs what Zerfaux and its tests need on a fresh Debian machine, then the project into .venv.
# Usage: scripts/bootstrap.sh [run|test]. Safe to repeat; installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-run}

run_pkgs=(postgresql-client)
# Debian's own python3 needs python3-venv for `python3 -m venv` (a pyenv or upstream build has it).
python3 -c 'import ensurepip, venv' 2>/dev/null || run_pkgs+=(python3-venv)
test_pkgs=(zfs-fuse openssh-server openssh-client sanoid mbuffer pv zstd lz4 golang-go
           golang-github-vmware-govmomi-dev debootstrap qemu-system-x86 qemu-utils
           e2fsprogs cpio postgresql-15-pgtap libtap-parser-sourcehandler-pgtap-perl
           postgresql-15-plpgsql-check prometheus iproute2 nftables
           chromium chromium-driver fonts-dejavu-core)
pkgs=("${run_pkgs[@]}")
[ "$want" = test ] && pkgs+=("${test_pkgs[@]}")

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: missing system packages: ${missing[*]} (run as root to install them)" >&2
    [ "$want" = test ] && [ "${ZERFAUX_REQUIRE_REAL:-}" = 1 ] && exit 1
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.zerfaux-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test,bench]'
  touch "$stamp"
fi
