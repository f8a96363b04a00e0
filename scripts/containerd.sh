#!/usr/bin/env bash
# The containerd builds berth is tested on, side by side on one Debian 12 machine.
#
#   scripts/containerd.sh dir VERSION   prints the directory holding that build's containerd, ctr
#                                       and containerd-shim-runc-v2, fetching it on first use
#   scripts/containerd.sh versions      prints the versions berth claims, one per line
#
# VERSION is 1.6 (Debian 12's own package, /usr/bin), 1.7 (Debian 13's package) or 2.1 (Debian
# unstable's); 1.4 (Debian 11's) is one berth refuses, for the test that says so. 1.7 and 2.1 are fetched with scripts/debian-extract.sh into
# $BERTH_TOOLS_CACHE/containerd-VERSION (default /var/cache/berth-tools) and never installed over
# the system's containerd; their Go binaries need only libc and run on Debian 12.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${BERTH_TOOLS_CACHE:-/var/cache/berth-tools}"

die() {
    printf 'containerd.sh: error: %s\n' "$*" >&2
    exit 1
}

# version -> Debian suite that carries it
suite_of() {
    case "$1" in
    1.4) echo bullseye ;;
    1.7) echo trixie ;;
    2.1) echo sid ;;
    *) return 1 ;;
    esac
}

# "containerd github.com/containerd/containerd/v2 2.1.9+unknown ..." -> 2.1
major_minor() {
    "$1/containerd" --version 2>/dev/null | awk '{ sub(/^v/, "", $3); split($3, v, /[^0-9]/); print v[1] "." v[2] }'
}

build_dir() {
    local version="$1" suite dir
    if [[ "$version" == 1.6 ]]; then
        dir=/usr/bin
        [[ -x $dir/containerd ]] || die "the system containerd is missing (run scripts/provision.sh)"
    else
        suite="$(suite_of "$version")" || die "unknown containerd version '$version' (known: $(versions | tr '\n' ' '))"
        dir="$cache/containerd-$version/usr/bin"
        if [[ ! -x "$dir/containerd" || "$(major_minor "$dir")" != "$version" ]]; then
            printf 'containerd.sh: fetching containerd %s from Debian %s\n' "$version" "$suite" >&2
            bash "$here/debian-extract.sh" "$suite" containerd "$cache/containerd-$version" >/dev/null
        fi
    fi
    local found
    found="$(major_minor "$dir")"
    [[ "$found" == "$version" ]] ||
        die "$dir/containerd is $found, not $version (Debian moved on? pick the new version in scripts/containerd.sh)"
    for binary in containerd ctr containerd-shim-runc-v2; do
        [[ -x "$dir/$binary" ]] || die "$dir/$binary is missing"
    done
    printf '%s\n' "$dir"
}

versions() { printf '%s\n' 1.6 1.7 2.1; }

case "${1:-}" in
dir)
    [[ $# -eq 2 ]] || die "usage: $0 dir VERSION"
    build_dir "$2"
    ;;
versions) versions ;;
*)
    echo "usage: $0 dir VERSION | versions" >&2
    exit 2
    ;;
esac
