#!/usr/bin/env bash
# Installs berth on a host: the berthd and berth binaries, the systemd unit, and a default
# config. Builds release binaries first (cargo build --release --locked) unless BERTH_BIN_DIR
# names a dir holding already-built ones.
#
# Environment:
#   DESTDIR        staging root prepended to every path (packaging); default: empty
#   PREFIX         where binaries and the unit go; default: /usr/local
#   BINDIR         default: $PREFIX/bin
#   UNITDIR        default: $PREFIX/lib/systemd/system (systemd reads /usr/local/lib/systemd/system;
#                  use /etc/systemd/system for another PREFIX outside systemd's search path)
#   SYSCONFDIR     default: /etc (the config goes to $SYSCONFDIR/berth/berthd.toml)
#   BERTH_BIN_DIR  install berthd and berth from here instead of building
#
# Modes: binaries 0755, unit 0644, $SYSCONFDIR/berth 0700, berthd.toml 0600 (berthd runs as
# root and the file may name key and token files). An existing berthd.toml is never
# overwritten; the shipped one is then left beside it as berthd.toml.dist.
#
# Nothing is started. With DESTDIR empty on a systemd host, run afterwards:
#   systemctl daemon-reload && systemctl enable --now berthd
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/usr/local}"
BINDIR="${BINDIR:-$PREFIX/bin}"
UNITDIR="${UNITDIR:-$PREFIX/lib/systemd/system}"
SYSCONFDIR="${SYSCONFDIR:-/etc}"
CONFIG_DIR="$SYSCONFDIR/berth"

log() { printf 'install: %s\n' "$*" >&2; }
die() {
    printf 'install: error: %s\n' "$*" >&2
    exit 1
}

for path in "$PREFIX" "$BINDIR" "$UNITDIR" "$SYSCONFDIR"; do
    [[ "$path" == /* ]] || die "$path is not an absolute path"
done

if [[ -n "${BERTH_BIN_DIR:-}" ]]; then
    bin_dir="$BERTH_BIN_DIR"
else
    # cargo lives here on every machine; a sudo PATH may lack it.
    for dir in "${HOME:-/root}/.cargo/bin" /usr/local/bin; do
        case ":$PATH:" in *":$dir:"*) ;; *) [[ -d "$dir" ]] && PATH="$dir:$PATH" ;; esac
    done
    command -v cargo >/dev/null || die "cargo not found (or set BERTH_BIN_DIR to prebuilt binaries)"
    log "cargo build --release --locked -p berth --bins"
    (cd "$REPO_ROOT" && cargo build --release --locked -p berth --bins)
    bin_dir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release"
fi
for binary in berthd berth; do
    [[ -x "$bin_dir/$binary" ]] || die "$bin_dir/$binary is missing or not executable"
done

log "binaries -> $DESTDIR$BINDIR"
install -d -m 0755 "$DESTDIR$BINDIR"
install -m 0755 "$bin_dir/berthd" "$DESTDIR$BINDIR/berthd"
install -m 0755 "$bin_dir/berth" "$DESTDIR$BINDIR/berth"

log "unit -> $DESTDIR$UNITDIR/berthd.service"
install -d -m 0755 "$DESTDIR$UNITDIR"
unit_tmp="$(mktemp)"
trap 'rm -f "$unit_tmp"' EXIT
# The unit names the installed binary and config (the repository's names /usr/local/bin and /etc).
sed -e "s|^ExecStart=.*|ExecStart=$BINDIR/berthd --config $CONFIG_DIR/berthd.toml|" \
    -e "s|/etc/berth|$CONFIG_DIR|g" \
    -e "s|/usr/local/bin/berthd|$BINDIR/berthd|g" \
    "$REPO_ROOT/systemd/berthd.service" >"$unit_tmp"
grep -q "^ExecStart=$BINDIR/berthd " "$unit_tmp" || die "could not set ExecStart in the unit"
install -m 0644 "$unit_tmp" "$DESTDIR$UNITDIR/berthd.service"

install -d -m 0700 "$DESTDIR$CONFIG_DIR"
if [[ -e "$DESTDIR$CONFIG_DIR/berthd.toml" ]]; then
    log "keeping the existing $DESTDIR$CONFIG_DIR/berthd.toml; the shipped one is berthd.toml.dist"
    install -m 0600 "$REPO_ROOT/config/berthd.toml" "$DESTDIR$CONFIG_DIR/berthd.toml.dist"
else
    log "config -> $DESTDIR$CONFIG_DIR/berthd.toml"
    install -m 0600 "$REPO_ROOT/config/berthd.toml" "$DESTDIR$CONFIG_DIR/berthd.toml"
fi

if [[ -z "$DESTDIR" && -d /run/systemd/system ]]; then
    log "done; now: systemctl daemon-reload && systemctl enable --now berthd"
else
    log "done"
fi
