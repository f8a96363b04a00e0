#!/usr/bin/env bash
# Extracts one Debian package from another Debian suite into a directory, without installing it:
#   scripts/debian-extract.sh SUITE PACKAGE DEST
# e.g. `scripts/debian-extract.sh sid containerd /var/cache/berth-tools/containerd-2.1`.
#
# The package comes from the same Debian mirror this machine's apt uses, through a sources file and
# apt state of its own (under $BERTH_TOOLS_CACHE/apt), so the system's apt lists, preferences and
# installed packages are left exactly as they were. `apt-get download` + `dpkg -x`: no maintainer
# script runs, nothing lands outside DEST. Prints the version extracted.
set -euo pipefail

[[ $# -eq 3 ]] || {
    echo "usage: $0 SUITE PACKAGE DEST" >&2
    exit 2
}
suite="$1" package="$2" dest="$3"
cache="${BERTH_TOOLS_CACHE:-/var/cache/berth-tools}"
apt_dir="$cache/apt"

die() {
    printf 'debian-extract: error: %s\n' "$*" >&2
    exit 1
}

# shellcheck source=lib/debian.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/debian.sh"

mirror="$(debian_mirror | head -n 1)"
[[ -n "$mirror" ]] || die "no Debian archive found in /etc/apt/sources.list{,.d/}"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f "$keyring" ]] || die "$keyring is missing (package debian-archive-keyring)"

mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/etc/preferences.d"
sources="$apt_dir/etc/sources-$suite.list"
printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$mirror" "$suite" >"$sources"
apt_options=(
    -o "Dir::Etc::SourceList=$sources" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::Etc::PreferencesParts=$apt_dir/etc/preferences.d"
    -o "Dir::State::Lists=$apt_dir/lists/$suite" -o "Dir::Cache=$apt_dir"
    -o "Dir::Cache::archives=$apt_dir/archives" -o APT::Sandbox::User=root
)
mkdir -p "$apt_dir/lists/$suite/partial"
apt-get "${apt_options[@]}" update -qq >/dev/null ||
    die "apt-get update of $suite from $mirror failed"

version="$(apt-cache "${apt_options[@]}" show "$package/$suite" 2>/dev/null |
    awk '/^Version:/ { print $2; exit }')"
[[ -n "$version" ]] || die "$package is not in $suite"

work="$(mktemp -d "$apt_dir/download.XXXXXX")"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get "${apt_options[@]}" download -qq "$package=$version" >/dev/null) ||
    die "apt-get download $package=$version ($suite) failed"
deb="$(find "$work" -name '*.deb' | head -n 1)"
[[ -n "$deb" ]] || die "apt-get download $package=$version left no .deb"

rm -rf "$dest.partial"
mkdir -p "$dest.partial"
dpkg -x "$deb" "$dest.partial"
printf '%s\n' "$version" >"$dest.partial/VERSION"
rm -rf "$dest"
mv "$dest.partial" "$dest"
printf '%s\n' "$version"
