#!/usr/bin/env bash
# The test command: provisions the machine, then runs every check CI runs, in order:
# format, lints, crate layering, build, unit + component + integration tests, docs.
# The integration tests start their own containerd and registries (as root).
#
# The integration suite runs once per containerd berth claims, newest first: 2.1 (Debian
# unstable's), 1.6 (Debian 12's, the system one) and 1.7 (Debian 13's); the 1.7 and 2.1 builds are
# fetched by scripts/containerd.sh into a cache beside the system containerd, never over it.
#   scripts/test.sh                      every check, the suite on 2.1, 1.6 and 1.7
#   scripts/test.sh --containerd 2.1     the suite on one build (a comma list for several)
set -euo pipefail

containerd_versions="2.1,1.6,1.7"
while [[ $# -gt 0 ]]; do
    case "$1" in
    --containerd)
        [[ $# -ge 2 ]] || {
            echo "test.sh: --containerd needs a version list, e.g. 2.1 or 2.1,1.6" >&2
            exit 2
        }
        containerd_versions="$2"
        shift 2
        ;;
    *)
        echo "usage: $0 [--containerd VERSION[,VERSION...]]" >&2
        exit 2
        ;;
    esac
done

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

step "gRPC clients for the interop tests (scripts/interop-clients.sh)"
bash scripts/interop-clients.sh

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "crate layers and module imports (scripts/check-layers.py)"
python3 scripts/check-layers.py

step "cargo build --workspace --bins"
cargo build --workspace --bins

IFS=',' read -r -a versions <<<"$containerd_versions"
declare -A containerd_dirs=()
for version in "${versions[@]}"; do
    step "containerd $version (scripts/containerd.sh)"
    containerd_dirs[$version]="$(bash scripts/containerd.sh dir "$version")"
    "${containerd_dirs[$version]}/containerd" --version
done

# Unit and component tests do not touch containerd: they run with the first build only.
failed=()
first=1
for version in "${versions[@]}"; do
    export BERTH_TEST_CONTAINERD_DIR="${containerd_dirs[$version]}"
    started=$SECONDS
    status=0
    if cargo nextest --version >/dev/null 2>&1; then
        filter=()
        [[ $first -eq 1 ]] || filter=(-E 'binary(integration)')
        step "cargo nextest run --workspace --no-fail-fast ${filter[*]} (containerd $version)"
        cargo nextest run --workspace --no-fail-fast "${filter[@]}" || status=$?
    else
        step "cargo test --workspace --no-fail-fast (containerd $version; cargo-nextest not installed)"
        cargo test --workspace --no-fail-fast || status=$?
    fi
    printf 'test.sh: containerd %s: suite %s in %d s\n' "$version" \
        "$([[ $status -eq 0 ]] && echo passed || echo FAILED)" $((SECONDS - started))
    [[ $status -eq 0 ]] || failed+=("$version")
    first=0
done
unset BERTH_TEST_CONTAINERD_DIR
if [[ ${#failed[@]} -gt 0 ]]; then
    current_step="tests on containerd ${failed[*]}"
    false
fi

step "cargo doc --workspace --no-deps (RUSTDOCFLAGS=-D warnings)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

current_step="done"
printf '\ntest.sh: all checks passed (fmt, clippy, build, tests on containerd %s, doc)\n' "$containerd_versions"
