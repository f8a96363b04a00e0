#!/usr/bin/env bash
# The cosign CLI the signature tests sign and verify with (the oracle berth is held to).
#
#   scripts/cosign.sh path    prints the path of the cosign binary, fetching it on first use
#
# cosign comes from Debian unstable's package (3.x), extracted with scripts/debian-extract.sh into
# $BERTH_TOOLS_CACHE/cosign (default /var/cache/berth-tools) and never installed; it is a static
# Go binary that runs on Debian 12.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${BERTH_TOOLS_CACHE:-/var/cache/berth-tools}"
dir="$cache/cosign"
binary="$dir/usr/bin/cosign"

die() {
    printf 'cosign.sh: error: %s\n' "$*" >&2
    exit 1
}

# The Debian version debian-extract.sh recorded ("3.1.1-2" -> 3); Debian's build reports its
# own GitVersion as "devel".
major() {
    [[ -f "$dir/VERSION" ]] && cut -d. -f1 "$dir/VERSION"
}

case "${1:-}" in
path)
    if [[ ! -x "$binary" || "$(major)" != 3 ]]; then
        printf 'cosign.sh: fetching cosign from Debian sid\n' >&2
        bash "$here/debian-extract.sh" sid cosign "$dir" >/dev/null
    fi
    [[ -x "$binary" ]] || die "$binary is missing after the fetch"
    [[ "$(major)" == 3 ]] || die "$dir holds cosign $(cat "$dir/VERSION"), not 3.x"
    printf '%s\n' "$binary"
    ;;
*)
    echo "usage: $0 path" >&2
    exit 2
    ;;
esac
