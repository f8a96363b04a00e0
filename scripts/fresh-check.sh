#!/usr/bin/env bash
# Proves the README's set-up on a truly fresh machine: a minimal Debian 12 root made with
# `debootstrap --variant=minbase`, into which only what every machine of this kind already has is
# carried (the Rust toolchain in ~/.cargo and ~/.rustup with cargo-nextest, the system CA bundle, the proxy and
# certificate variables, /proc, /sys and /dev). Inside it, a clone of this checkout runs
# scripts/demo.sh (the README's first command: provision, build, the whole main job) and then one
# integration test against a real containerd and registry; `--full` runs scripts/test.sh (the
# README's second command) instead of the one test.
#
#   scripts/fresh-check.sh [--full] [--keep]
#
# Runs as root. Prints each step with its time and, on failure, the step that failed. The root
# lives in /var/tmp/berth-fresh.* and is removed at the end (--keep leaves it for a look).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
full=0
keep=0
for arg in "$@"; do
    case "$arg" in
    --full) full=1 ;;
    --keep) keep=1 ;;
    *)
        echo "usage: $0 [--full] [--keep]" >&2
        exit 2
        ;;
    esac
done

log() { printf 'fresh-check: %s\n' "$*" >&2; }
die() {
    printf 'fresh-check: FAILED: %s\n' "$*" >&2
    exit 1
}
[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap, mounts, chroot)"

export DEBIAN_FRONTEND=noninteractive
if ! command -v debootstrap >/dev/null; then
    log "apt-get install debootstrap"
    apt-get update -qq && apt-get install -y -qq --no-install-recommends debootstrap >/dev/null ||
        die "installing debootstrap"
fi
# shellcheck source=lib/debian.sh
source "$repo/scripts/lib/debian.sh"
mirror="$(debian_mirror | head -n 1)"
[[ -n "$mirror" ]] || die "no Debian archive in this machine's apt sources"

root="$(mktemp -d /var/tmp/berth-fresh.XXXXXX)"
chmod 0755 "$root"
step_name="setup"
step_started=$SECONDS
check_started=$SECONDS
step() {
    [[ "$step_name" == setup ]] || log "$step_name: done in $((SECONDS - step_started)) s"
    step_name="$1"
    step_started=$SECONDS
    log "$step_name ..."
}

# Every process whose root is the fresh root (containerd, shims, registries a failed step left).
kill_inside() {
    local pid link
    for pid in /proc/[0-9]*; do
        link="$(readlink "$pid/root" 2>/dev/null)" || continue
        [[ "$link" == "$root" ]] && kill -KILL "${pid#/proc/}" 2>/dev/null || true
    done
}

cleanup() {
    local status=$?
    if [[ $status -ne 0 ]]; then
        log "FAILED at step '$step_name' after $((SECONDS - check_started)) s"
    fi
    kill_inside
    # Everything mounted under the root, deepest first (lazily: a shim may hold one a moment).
    awk -v root="$root" '$5 == root || index($5, root "/") == 1 { print $5 }' /proc/self/mountinfo |
        sort -r | while read -r point; do umount -l "$point" 2>/dev/null || true; done
    if [[ $keep -eq 1 ]]; then
        log "root kept at $root"
    elif awk -v root="$root" '$5 == root || index($5, root "/") == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
        # A bind mount of ~/.cargo left in place would be deleted with the root: never.
        log "mounts are still under $root; not removing it"
    else
        rm -rf --one-file-system "$root"
    fi
    exit "$status"
}
trap cleanup EXIT

step "debootstrap --variant=minbase bookworm"
cache="${BERTH_TOOLS_CACHE:-/var/cache/berth-tools}/debootstrap"
mkdir -p "$cache"
debootstrap --variant=minbase --cache-dir="$cache" bookworm "$root" "$mirror" \
    >"$root.debootstrap.log" 2>&1 || {
    tail -n 20 "$root.debootstrap.log" >&2
    die "debootstrap (log: $root.debootstrap.log)"
}
rm -f "$root.debootstrap.log"

step "carry in the toolchain, CA bundle and mounts"
# runc wants the container's rootfs parents on a mount point: the root becomes one.
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys" # --rbind: the cgroup mounts come along
mount --make-rslave "$root/sys"
mount --rbind /dev "$root/dev"
mount --make-rslave "$root/dev"
home="${HOME:-/root}"
for dir in .cargo .rustup; do
    [[ -d "$home/$dir" ]] || die "$home/$dir is missing: the Rust toolchain is expected preinstalled"
    mkdir -p "$root/root/$dir"
    mount --bind "$home/$dir" "$root/root/$dir"
done
# cargo-nextest comes with the toolchain on machines of this kind, outside ~/.cargo here.
nextest="$(command -v cargo-nextest || true)"
if [[ -n "$nextest" && "$nextest" != "$home/.cargo/"* ]]; then
    cp "$nextest" "$root/usr/local/bin/cargo-nextest"
fi
for dir in /etc/ssl/certs /usr/local/share/ca-certificates; do
    [[ -d "$dir" ]] || continue
    mkdir -p "$root$dir"
    cp -a "$dir/." "$root$dir/"
done
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The root's apt uses the same archive as this machine; add the updates and security suites as
# a Debian 12 install has them.
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror" >"$root/etc/apt/sources.list"
security="${mirror%/debian}/debian-security"
[[ "$mirror" == */debian ]] && printf 'deb %s bookworm-security main\n' "$security" >>"$root/etc/apt/sources.list"

step "clone the checkout"
git clone --quiet "$repo" "$root/root/berth"

# The environment a machine of this kind starts with: PATH, HOME, proxies, certificates.
environment=(HOME=/root PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    LANG=C.UTF-8 TERM=dumb CI=true)
while IFS='=' read -r name value; do
    case "$name" in
    http_proxy | https_proxy | no_proxy | HTTP_PROXY | HTTPS_PROXY | NO_PROXY | all_proxy | ALL_PROXY | \
        SSL_CERT_FILE | SSL_CERT_DIR | CURL_CA_BUNDLE | REQUESTS_CA_BUNDLE | PIP_CERT | \
        NODE_EXTRA_CA_CERTS | GIT_SSL_CAINFO | CARGO_HTTP_CAINFO | PIP_INDEX_URL | PIP_EXTRA_INDEX_URL)
        environment+=("$name=$value")
        ;;
    esac
done < <(env)

inside() {
    chroot "$root" /usr/bin/env -i "${environment[@]}" /bin/bash -c "cd /root/berth && $1" </dev/null
}

step "scripts/demo.sh (provision, build, the main job end to end)"
inside "bash scripts/demo.sh" || die "scripts/demo.sh"

if [[ $full -eq 1 ]]; then
    step "scripts/test.sh (every check, the suite on each containerd)"
    inside "bash scripts/test.sh" || die "scripts/test.sh"
else
    step "one integration test (seed flow) against real containerd and registry"
    inside "cargo nextest run --workspace -E 'test(seed_flow_with_an_htpasswd_registry)'" ||
        die "the seed-flow integration test"
fi
step "done"
log "passed in $((SECONDS - check_started)) s"
