#!/usr/bin/env bash
# The test command: provisions the machine, then runs every check CI runs, in order:
# format, lints, build, unit + component + integration tests, docs.
# The integration tests start their own containerd and registries (as root).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

# cargo lives here on every machine; CI's PATH may lack it.
for dir in "${HOME:-/root}/.cargo/bin" /usr/local/bin; do
    case ":$PATH:" in *":$dir:"*) ;; *) [[ -d "$dir" ]] && PATH="$dir:$PATH" ;; esac
done
export PATH
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

current_step="provision"
report_failure() {
    local status=$?
    if [[ $status -ne 0 ]]; then
        printf '\ntest.sh: FAILED at %s (exit %s)\n' "$current_step" "$status" >&2
    fi
}
trap report_failure EXIT

step() {
    current_step="$1"
    printf '\n==> %s\n' "$1"
}

step "provision (scripts/provision.sh)"
bash scripts/provision.sh

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build --workspace --bins"
cargo build --workspace --bins

if cargo nextest --version >/dev/null 2>&1; then
    step "cargo nextest run --workspace --no-fail-fast"
    cargo nextest run --workspace --no-fail-fast
else
    step "cargo test --workspace --no-fail-fast (cargo-nextest not installed)"
    cargo test --workspace --no-fail-fast
fi

step "cargo doc --workspace --no-deps (RUSTDOCFLAGS=-D warnings)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

current_step="done"
printf '\ntest.sh: all checks passed (fmt, clippy, build, tests, doc)\n'
