#!/usr/bin/env bash
# Fuzzes berth's parsers of untrusted input with cargo-fuzz (libFuzzer + AddressSanitizer), each
# target for a bounded time: image references, WWW-Authenticate challenges, manifests and
# indexes, the CLI's service YAML, and the unix socket's HTTP/2 front (targets in
# fuzz/fuzz_targets, entry points in `berth::fuzzing`). Not run by CI.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, every target)
#
# The machines have only the stable toolchain; cargo-fuzz's nightly-only flags (-Z sanitizer,
# coverage instrumentation) are let through with RUSTC_BOOTSTRAP=1. The first run builds berth
# and its dependencies instrumented, in fuzz/target (several minutes on 2 cores).
#
# Seeds are in fuzz/corpus/<target> (kept in the repository, read only here); what a run
# discovers goes to fuzz/target/corpus/<target>. A crash is saved under fuzz/artifacts/<target>/
# and reported at the end (exit status 1); reproduce it with
#   (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> artifacts/<target>/<file>)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT/fuzz"

for dir in "${HOME:-/root}/.cargo/bin" /usr/local/bin; do
    case ":$PATH:" in *":$dir:"*) ;; *) [[ -d "$dir" ]] && PATH="$dir:$PATH" ;; esac
done
export PATH

ALL_TARGETS=(image_ref www_authenticate manifest service_yaml openbao_created_time unix_front)
seconds="${1:-60}"
if [[ $# -gt 0 ]]; then shift; fi
if [[ $# -gt 0 ]]; then targets=("$@"); else targets=("${ALL_TARGETS[@]}"); fi
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [[ "$seconds" -eq 0 ]]; then
    echo "fuzz.sh: SECONDS_PER_TARGET must be a positive number, not '$seconds'" >&2
    exit 64
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz (cargo install --locked cargo-fuzz)"
    cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1

# The longest input per target: references and challenges are short, documents are not.
max_len() {
    case "$1" in
        image_ref | openbao_created_time) echo 1024 ;;
        www_authenticate) echo 16384 ;;
        *) echo 65536 ;;
    esac
}

echo "==> building the fuzz targets"
cargo fuzz build --sanitizer address

failed=()
for target in "${targets[@]}"; do
    echo "==> fuzzing $target for ${seconds}s"
    work="target/corpus/$target"
    mkdir -p "$work" "artifacts/$target"
    if ! cargo fuzz run --sanitizer address "$target" "$work" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len="$(max_len "$target")" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1; then
        failed+=("$target")
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo
    echo "fuzz.sh: crashes in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    ls -l "${failed[@]/#/artifacts/}" >&2 || true
    exit 1
fi
echo
echo "fuzz.sh: no crash in ${targets[*]} (${seconds}s each)"
