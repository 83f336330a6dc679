#!/usr/bin/env bash
# Build the vCenter simulator (tests/vcsim/main.go) into a cache outside the clone and print the
# binary's path. The cache key is the hash of main.go, so a rebuild happens only when it changes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
hash="$(sha256sum "$here/main.go" | cut -c1-16)"
out_dir="${XDG_CACHE_HOME:-$HOME/.cache}/zerfaux/vcsim-$hash"
bin="$out_dir/vcsim"

if [[ -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    echo "build.sh: 'go' not found: apt-get install golang-go golang-github-vmware-govmomi-dev" >&2
    exit 2
fi
gopath="${ZERFAUX_GOPATH:-/usr/share/gocode}"
if [[ ! -d "$gopath/src/github.com/vmware/govmomi/simulator" ]]; then
    echo "build.sh: govmomi not found under $gopath: apt-get install golang-github-vmware-govmomi-dev" >&2
    exit 2
fi

mkdir -p "$out_dir"
# Build in a scratch dir and rename, so a concurrent or interrupted build never leaves half a binary.
tmp="$(mktemp -d "$out_dir/build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
cp "$here/main.go" "$tmp/main.go"
(
    cd "$tmp"
    GOPATH="$gopath" GO111MODULE=off GOFLAGS= GOCACHE="${GOCACHE:-$out_dir/../go-build}" \
        go build -o "$tmp/vcsim" main.go
) >&2
mv -f "$tmp/vcsim" "$bin"
echo "$bin"
