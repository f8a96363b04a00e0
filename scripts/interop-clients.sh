#!/usr/bin/env bash
# Installs the gRPC clients that tests/interop.rs runs against berthd's unix socket, as root:
#   - Python grpcio + grpcio-tools (latest) in a venv:      $DIR/venv
#   - Node @grpc/grpc-js + @grpc/proto-loader (latest):     $DIR/node/node_modules
# grpcurl 1.8 comes from scripts/provision.sh.
#
# Idempotent: a second run checks, installs nothing and prints nothing.
#
# Environment:
#   BERTH_INTEROP_DIR  where to install (default /var/cache/berth-tools/interop); the tests
#                      read the same variable
#   PYTHON             the interpreter the venv is made from (default: python3)
set -euo pipefail

DIR="${BERTH_INTEROP_DIR:-/var/cache/berth-tools/interop}"
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export DEBIAN_FRONTEND=noninteractive

log() { printf 'interop-clients: %s\n' "$*" >&2; }
die() {
    printf 'interop-clients: error: %s\n' "$*" >&2
    exit 1
}

command -v "$PYTHON" >/dev/null || die "$PYTHON not found"
# Machines of this kind ship Node.js; elsewhere Debian's nodejs and npm do.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    command -v apt-get >/dev/null || die "node or npm missing and apt-get is missing"
    log "apt-get install nodejs npm"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null || die "apt-get install nodejs npm failed"
fi
mkdir -p "$DIR"

# --- Python: grpcio and grpcio-tools in a venv -------------------------------
venv="$DIR/venv"
python_ready() { "$venv/bin/python" -c 'import grpc, grpc_tools.protoc' >/dev/null 2>&1; }
if ! python_ready; then
    if ! "$venv/bin/python" -c '' >/dev/null 2>&1; then
        rm -rf "$venv"
        if ! "$PYTHON" -m venv "$venv" >/dev/null 2>&1; then
            # Debian's python3 keeps venv's ensurepip in a separate package.
            rm -rf "$venv"
            command -v apt-get >/dev/null || die "$PYTHON -m venv failed and apt-get is missing"
            log "apt-get install python3-venv"
            apt-get update -qq
            apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
            "$PYTHON" -m venv "$venv" || die "$PYTHON -m venv $venv failed"
        fi
    fi
    log "pip install grpcio grpcio-tools into $venv"
    "$venv/bin/python" -m pip install --quiet --upgrade grpcio grpcio-tools ||
        die "pip install grpcio grpcio-tools failed"
    python_ready || die "grpcio does not import from $venv"
fi

# --- Node: @grpc/grpc-js and @grpc/proto-loader --------------------------------
node_dir="$DIR/node"
node_ready() {
    (cd "$node_dir" 2>/dev/null &&
        node -e 'require("@grpc/grpc-js"); require("@grpc/proto-loader")' >/dev/null 2>&1)
}
if ! node_ready; then
    mkdir -p "$node_dir"
    [[ -f "$node_dir/package.json" ]] ||
        printf '{"name":"berth-interop-clients","private":true}\n' >"$node_dir/package.json"
    log "npm install @grpc/grpc-js @grpc/proto-loader into $node_dir"
    (cd "$node_dir" && npm install --silent --no-audit --no-fund @grpc/grpc-js @grpc/proto-loader) ||
        die "npm install @grpc/grpc-js @grpc/proto-loader failed"
    node_ready || die "@grpc/grpc-js does not load from $node_dir"
fi
