#!/usr/bin/env bash
# berth benchmark: berthd against containerd's own `ctr`, side by side, on this machine.
#
# Usage: bench/run.sh [--quick] [--pairs N] [--only LIST] [--cold-images L] [--downloads N]
#                     [--work-dir DIR] [--no-build] [--fresh-images] [--gzip-level L]
#                     [--debug-logs] [--containerd VERSION] [--help]
#   --quick          small images and 2 pairs: a smoke run of every scenario (a few minutes)
#   --pairs N        A/B pairs per comparison (default: 5 full, 2 quick)
#   --only LIST      comma-separated subset of: cold,warm,concurrent,rss
#   --cold-images L  images of the cold scenario (default medium,small,many)
#   --downloads N    berthd's registry.max_concurrent_downloads (default: berthd's default)
#   --work-dir DIR   images, registry and results (default /var/tmp/berth-bench)
#   --no-build       use target/release/{berthd,berth} as they are
#   --fresh-images   generate the random images again even when a cached layout exists
#   --gzip-level L   gzip level of the generated layers (default 0; see bench/mkimage.py)
#   --debug-logs     run berthd with BERTH_LOG=debug (timestamps for a breakdown; slower)
#   --discard-layer-blobs  berthd with [containerd] keep_layer_blobs = false
#   --perf           profile every cold pull, and the 1 and 20 concurrent orders, system-wide
#                    (perf record -a -g, 999 Hz): where the CPU goes, per process and per
#                    function, in results/<time>/perf/
#   --containerd V   measure on containerd V (1.6, 1.7 or 2.1; scripts/containerd.sh fetches
#                    it): its containerd, ctr and shim come first on PATH, for berth and ctr
#                    alike; the default is the system containerd
#
# What it does (needs root, Debian 12, the packages of scripts/provision.sh, python3):
#   1. cargo build --release --bins
#   2. writes OCI layouts (bench/mkimage.py), cached in the work dir: random, incompressible
#      layers, and `real`, tars of /usr/lib/gcc, /usr/include and /usr/lib/python3.11 of this
#      machine at gzip -6 (about 300 MiB uncompressed, a realistic compressible image); the
#      random ones are a busybox layer + N random layers:
#        full:  small 1x8 MiB, medium 4x64 MiB, many 16x16 MiB, large 16x64 MiB (1 GiB),
#               biglayer 2x512 MiB (1 GiB in two layers)
#        quick: small 1x1, medium 4x4, many 8x1, large 8x8, biglayer 1x64 (MiB)
#   3. starts docker-registry on 127.0.0.1 (plain HTTP, htpasswd auth) and pushes them (skopeo)
#   4. measures, alternating A/B (berth first on odd pairs, ctr first on even ones), every
#      measurement on a fresh containerd (own temp root, state and socket):
#        cold   `berth pull` vs `ctr images pull` (fetch + unpack into overlayfs), small,
#               medium and many; plus the floor: curl | sha256sum of the same blobs,
#               sequential and 4-way
#        warm   image present: `berth service create`, and StartContainer IF_NOT_PRESENT sent
#               with curl (order -> RUNNING) vs `ctr run -d`; berth_start_duration_seconds read
#               from berthd's metrics for each order; berthd's CPU per order
#        concurrent  20 StartContainer orders at once for one uncached image (medium) vs one
#               order; blob GETs counted in the registry log; for scale, `ctr images pull` then
#               20 `ctr run -d` at once; also 10 orders at once for 10 tags of that image, and
#               20 concurrent PullImage (`berth pull`)
#        rss    berthd VmHWM after pulling medium, large and biglayer
#   5. prints medians, ratios and the targets (bench/report.py), saved with the raw figures
#      under WORK_DIR/results/<time>/.
# Figures are only as good as the machine is quiet: the load average is printed with them.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="$REPO_ROOT/bench"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
BERTHD_BIN="$TARGET_DIR/release/berthd"
BERTH_BIN="$TARGET_DIR/release/berth"

for dir in "${HOME:-/root}/.cargo/bin" /usr/local/bin /usr/sbin /sbin; do
    case ":$PATH:" in *":$dir:"*) ;; *) [[ -d "$dir" ]] && PATH="$dir:$PATH" ;; esac
done
export PATH

mode=full
pairs=""
only="cold,warm,concurrent,rss"
cold_images="medium,real,small,many"
# The realistic image: real files of this machine, gzip -6 (about 300 MiB uncompressed).
REAL_DIRS="/usr/lib/gcc,/usr/include,/usr/lib/python3.11"
max_downloads=""
work_dir=/var/tmp/berth-bench
build=1
fresh_images=0
gzip_level=0
berth_log=info
perf=0
keep_layer_blobs=true
containerd_version=""
while (($#)); do
    case "$1" in
        --quick) mode=quick ;;
        --pairs) pairs="$2"; shift ;;
        --only) only="$2"; shift ;;
        --cold-images) cold_images="$2"; shift ;;
        --downloads) max_downloads="$2"; shift ;;
        --work-dir) work_dir="$2"; shift ;;
        --no-build) build=0 ;;
        --fresh-images) fresh_images=1 ;;
        --gzip-level) gzip_level="$2"; shift ;;
        --debug-logs) berth_log=debug ;;
        --perf) perf=1 ;;
        --discard-layer-blobs) keep_layer_blobs=false ;;
        --containerd) containerd_version="$2"; shift ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            printf 'bench: unknown argument %s (see --help)\n' "$1" >&2
            exit 64
            ;;
    esac
    shift
done

if [[ -n "$containerd_version" ]]; then
    containerd_bin="$(bash "$REPO_ROOT/scripts/containerd.sh" dir "$containerd_version")" ||
        { echo "bench: no containerd $containerd_version" >&2; exit 64; }
    PATH="$containerd_bin:$PATH"
    export PATH
fi
# containerd 2.x reads config version 3 (2 is migrated with a warning); its CRI is three plugins.
ctrd_config_version=2
ctrd_disabled='"io.containerd.grpc.v1.cri"'
if [[ "$(containerd --version | awk '{ sub(/^v/, "", $3); print $3 }')" == 2.* ]]; then
    ctrd_config_version=3
    ctrd_disabled='"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.nri.v1.nri"'
fi
if [[ $mode == quick ]]; then
    pairs="${pairs:-2}"
    concurrent_reps=1
    # name layers MiB-per-layer
    images=("small 1 1" "medium 4 4" "many 8 1" "large 8 8" "biglayer 1 64" "real dirs $REAL_DIRS")
else
    pairs="${pairs:-5}"
    concurrent_reps=3
    images=("small 1 8" "medium 4 64" "many 16 16" "large 16 64" "biglayer 2 512" "real dirs $REAL_DIRS")
fi
[[ $pairs =~ ^[1-9][0-9]*$ ]] || { echo "bench: --pairs wants a positive number" >&2; exit 64; }
CONCURRENT_ORDERS=20
warm_pairs=$((pairs + 2))

say() { printf '    %s\n' "$*"; }
step() { printf '\n==> %s\n' "$*"; }
die() {
    printf 'bench: error: %s\n' "$*" >&2
    exit 1
}
has() { [[ ",$only," == *",$1,"* ]]; }

[[ $(id -u) -eq 0 ]] || die "run as root: containerd and berthd need it"
for tool in containerd ctr runc docker-registry skopeo htpasswd curl python3 jq protoc sha256sum /usr/bin/time; do
    command -v "$tool" >/dev/null || die "missing $tool (scripts/provision.sh installs the Debian packages)"
done
[[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1 || die "/bin/busybox must be static (busybox-static)"

mkdir -p "$work_dir"
RESULTS="$work_dir/results/$(date +%Y%m%d-%H%M%S)-$mode"
mkdir -p "$RESULTS/logs"
RAW="$RESULTS/raw.tsv"
: >"$RAW"
RUN_DIR="$work_dir/run"
rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"

# ------------------------------------------------------------------------------------------
# processes started here: recorded by pid, stopped by pid
# ------------------------------------------------------------------------------------------
registry_pid=""
perf_pid=""
ctrd_pid=""
ctrd_dir=""
ctrd_ns=""
berthd_pid=""

pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

stop_pid() { # PID [SECONDS]: SIGTERM, then SIGKILL
    local pid="$1" limit="${2:-15}"
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + limit))
    while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.05; done
    pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

wait_until() { # SECONDS COMMAND...: poll until it succeeds
    local limit="$1"
    shift
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.05
    done
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

now() { printf '%s' "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.6f", b - a }'; }
diff_of() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", b - a }'; }

record() { # SCENARIO IMAGE SIDE REP METRIC VALUE
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RAW"
}

loadavg() { cut -d' ' -f1 /proc/loadavg; }

cpu_seconds() { # PID -> utime+stime of the process, seconds
    local ticks
    ticks="$(getconf CLK_TCK)"
    awk -v hz="$ticks" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$1/stat" 2>/dev/null || printf '0'
}

cpu_ns() { # PID -> CPU time of all its live threads, ns (schedstat)
    cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ sum += $1 } END { printf "%d", sum }'
}

hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || printf '0'; }

timed_cpu() { # OUTFILE COMMAND...: runs it under /usr/bin/time; OUTFILE gets "user+sys"
    local out="$1"
    shift
    /usr/bin/time -f '%U %S' -o "$out.time" "$@"
    local status=$?
    awk '{ printf "%.2f", $1 + $2 }' "$out.time" >"$out"
    return $status
}

# --- containerd, fresh per measurement -----------------------------------------------------
ctrd_start() { # LABEL
    ctrd_dir="$RUN_DIR/containerd-$1-$RANDOM$RANDOM"
    ctrd_ns="bench-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
    mkdir -p "$ctrd_dir"
    cat >"$ctrd_dir/config.toml" <<EOF
version = $ctrd_config_version
root = "$ctrd_dir/root"
state = "$ctrd_dir/state"
disabled_plugins = [$ctrd_disabled]

[grpc]
  address = "$ctrd_dir/containerd.sock"

[ttrpc]
  address = "$ctrd_dir/containerd.sock.ttrpc"

[debug]
  address = "$ctrd_dir/debug.sock"
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "$ctrd_dir/opt"
EOF
    setsid containerd --config "$ctrd_dir/config.toml" >"$ctrd_dir/containerd.log" 2>&1 </dev/null &
    ctrd_pid=$!
    wait_until 30 ctr --address "$ctrd_dir/containerd.sock" --connect-timeout 1s version ||
        die "containerd did not answer; see $ctrd_dir/containerd.log"
}

ctr_() { ctr --address "$ctrd_dir/containerd.sock" -n "$ctrd_ns" "$@"; }

ctrd_stop() {
    [[ -n "$ctrd_dir" ]] || return 0
    local sock="$ctrd_dir/containerd.sock" ns task container pid
    if pid_alive "$ctrd_pid"; then
        for ns in $(ctr --address "$sock" --timeout 20s namespaces ls -q 2>/dev/null); do
            for task in $(ctr --address "$sock" -n "$ns" tasks ls -q 2>/dev/null); do
                ctr --address "$sock" -n "$ns" --timeout 20s tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true
            done
            for task in $(ctr --address "$sock" -n "$ns" tasks ls -q 2>/dev/null); do
                ctr --address "$sock" -n "$ns" --timeout 20s tasks rm -f "$task" >/dev/null 2>&1 || true
            done
            for container in $(ctr --address "$sock" -n "$ns" containers ls -q 2>/dev/null); do
                ctr --address "$sock" -n "$ns" --timeout 20s containers rm "$container" >/dev/null 2>&1 || true
            done
        done
    fi
    stop_pid "$ctrd_pid" 20
    # Shims started by this containerd name its socket (its own dir) on their command line.
    for pid in $(grep -l -F -- "$ctrd_dir/" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do
        [[ $pid != "$$" ]] && stop_pid "$pid" 5
    done
    awk -v prefix="$ctrd_dir/" 'index($5, prefix) == 1 { print length($5), $5 }' /proc/self/mountinfo |
        sort -rn | cut -d' ' -f2- | while read -r mount_point; do
        umount -l "$(printf '%b' "$mount_point")" 2>/dev/null || true
    done
    rm -rf "/run/containerd/runc/$ctrd_ns" "$ctrd_dir"
    ctrd_pid=""
    ctrd_dir=""
}

# --- berthd on the current containerd -------------------------------------------------------
berthd_start() { # LABEL; sets berthd_sock, berthd_metrics, secret_id
    local dir="$ctrd_dir/berthd"
    mkdir -p "$dir"
    berthd_label="$1"
    berthd_sock="$dir/berthd.sock"
    berthd_metrics="127.0.0.1:$(free_port)"
    cat >"$dir/berthd.toml" <<EOF
listen = "unix://$berthd_sock"
state_dir = "$dir/state"
metrics_listen = "$berthd_metrics"

[containerd]
socket = "$ctrd_dir/containerd.sock"
namespace = "$ctrd_ns"
keep_layer_blobs = $keep_layer_blobs

[secrets]
key_file = "$dir/secrets.key"

[registry]
plain_http = ["$REGISTRY"]
${max_downloads:+max_concurrent_downloads = $max_downloads}
EOF
    # MALLOC_ARENA_MAX as systemd/berthd.service sets it.
    BERTH_LOG="$berth_log" MALLOC_ARENA_MAX=2 setsid "$BERTHD_BIN" --config "$dir/berthd.toml" >"$dir/berthd.log" 2>&1 </dev/null &
    berthd_pid=$!
    wait_until 30 berth_ ps || die "berthd did not answer; see $dir/berthd.log"
    secret_id="$(printf '%s' "$REGISTRY_PASSWORD" | berth_ secret docker create --name bench \
        --server "$REGISTRY" --username "$REGISTRY_USER" --password-stdin)"
    [[ $secret_id == secret-* ]] || die "berth secret docker create printed: $secret_id"
}

berth_() { "$BERTH_BIN" --address "$berthd_sock" "$@"; }

berthd_stop() {
    [[ -n "$berthd_pid" ]] || return 0
    stop_pid "$berthd_pid" 20
    cp "$ctrd_dir/berthd/berthd.log" "$RESULTS/logs/$berthd_label.berthd.log" 2>/dev/null || true
    berthd_pid=""
}

start_seconds_sum() { # berth_start_duration_seconds_sum from berthd's metrics
    curl -s --max-time 5 "http://$berthd_metrics/metrics" |
        awk '$1 == "berth_start_duration_seconds_sum" { print $2; found = 1 } END { if (!found) print 0 }'
}

# StartContainer over berthd's socket with curl (HTTP/2, gRPC framing by hand): a client that
# costs next to no CPU, unlike 20 grpcurl processes at once on a small machine.
start_order_message() { # FILE ORDER_ID NAME IMAGE: writes the gRPC-framed StartContainerRequest
    printf 'order_id: "%s"\nname: "%s"\ncontainer { image: "%s" pull_secret: "%s" command: "/bin/sleep" command: "30" pull_policy: IF_NOT_PRESENT }\n' \
        "$2" "$3" "$4" "$secret_id" |
        protoc -I "$REPO_ROOT/proto" --encode=berth.v1.StartContainerRequest berth/v1/agent.proto >"$1.pb"
    python3 -c 'import struct, sys; data = open(sys.argv[1], "rb").read(); sys.stdout.buffer.write(b"\0" + struct.pack(">I", len(data)) + data)' \
        "$1.pb" >"$1"
}

start_order() { # FILE: sends it; succeeds when berthd answers grpc-status 0
    curl -sS --http2-prior-knowledge --unix-socket "$berthd_sock" -H 'content-type: application/grpc' \
        -H 'te: trailers' --data-binary "@$1" -D "$1.headers" -o "$1.reply" \
        http://localhost/berth.v1.Agent/StartContainer &&
        grep -q '^grpc-status: 0' "$1.headers"
}

on_exit() {
    local status=$?
    berthd_stop 2>/dev/null || true
    ctrd_stop 2>/dev/null || true
    stop_pid "$perf_pid" 5 2>/dev/null || true
    stop_pid "$registry_pid" 10 2>/dev/null || true
    if [[ $status -ne 0 ]]; then
        printf '\nbench: FAILED (exit %s). Results so far: %s; run dir: %s\n' "$status" "$RESULTS" "$RUN_DIR" >&2
    else
        rm -rf "$RUN_DIR" # the registry's copy of the images; the layouts stay cached
    fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------------------------------
step "machine"
{
    printf 'mode\t%s\n' "$mode"
    printf 'pairs\t%s\n' "$pairs"
    printf 'nproc\t%s\n' "$(nproc)"
    printf 'cpu\t%s\n' "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    printf 'kernel\t%s\n' "$(uname -r)"
    printf 'memory\t%s\n' "$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    printf 'containerd\t%s\n' "$(containerd --version | awk '{ print $3 }')"
    printf 'runc\t%s\n' "$(runc --version | awk 'NR == 1 { print $3 }')"
    printf 'registry\t%s\n' "$(docker-registry --version 2>/dev/null | awk '{ print $NF }')"
    printf 'berth_commit\t%s%s\n' "$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
        "$(git -C "$REPO_ROOT" diff --quiet HEAD -- agent 2>/dev/null || echo ' (+ uncommitted changes in agent/)')"
    printf 'filesystem\t%s\n' "$(df -T "$work_dir" | awk 'NR == 2 { print $2 }')"
    printf 'load_start\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf 'gzip_level\t%s\n' "$gzip_level"
    printf 'keep_layer_blobs\t%s\n' "$keep_layer_blobs"
} >"$RESULTS/machine.tsv"
sed 's/\t/: /' "$RESULTS/machine.tsv" | sed 's/^/    /'

if ((build)); then
    step "cargo build --release --bins"
    (cd "$REPO_ROOT" && cargo build --release --bins)
fi
[[ -x $BERTHD_BIN && -x $BERTH_BIN ]] || die "no $BERTHD_BIN / $BERTH_BIN (drop --no-build)"

# ------------------------------------------------------------------------------------------
step "images (random layers; cached in $work_dir/images)"
declare -A IMAGE_DIR IMAGE_LAYERS IMAGE_BYTES
for spec in "${images[@]}"; do
    read -r name layers mib <<<"$spec"
    if [[ $layers == dirs ]]; then
        # mib holds the directory list; real files compress: gzip -6 as image builders do.
        dir="$work_dir/images/$name-$(printf '%s' "$mib" | sha256sum | cut -c1-8)-gz6"
        args=(--dirs "$mib" --gzip-level 6)
        what="tars of $mib, gzip -6"
        layer_count="$(awk -F, '{ print NF }' <<<"$mib")"
    else
        dir="$work_dir/images/$name-${layers}x${mib}MiB-gz$gzip_level"
        args=(--layers "$layers" --layer-mib "$mib" --gzip-level "$gzip_level")
        what="${layers} x ${mib} MiB"
        layer_count="$layers"
    fi
    if ((fresh_images)) || [[ ! -f $dir/bench-image.json ]]; then
        started="$(now)"
        python3 "$BENCH_DIR/mkimage.py" "$dir" "${args[@]}" >/dev/null
        say "$name: $what written in $(since "$started") s"
    else
        say "$name: $what (cached layout)"
    fi
    IMAGE_DIR[$name]="$dir"
    IMAGE_LAYERS[$name]=$((layer_count + 1))
    IMAGE_BYTES[$name]="$(jq '[.blobs[].size] | add' "$dir/bench-image.json")"
done

step "registry (docker-registry, htpasswd, plain HTTP on 127.0.0.1)"
REGISTRY="127.0.0.1:$(free_port)"
REGISTRY_USER=bench
REGISTRY_PASSWORD="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
mkdir -p "$RUN_DIR/registry"
htpasswd -Bbn "$REGISTRY_USER" "$REGISTRY_PASSWORD" >"$RUN_DIR/registry/htpasswd"
cat >"$RUN_DIR/registry/config.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $RUN_DIR/registry/storage
  delete:
    enabled: true
http:
  addr: $REGISTRY
  secret: $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
health:
  storagedriver:
    enabled: false
auth:
  htpasswd:
    realm: berth-bench
    path: $RUN_DIR/registry/htpasswd
EOF
REGISTRY_LOG="$RUN_DIR/registry/registry.log"
setsid docker-registry serve "$RUN_DIR/registry/config.yml" >"$REGISTRY_LOG" 2>&1 </dev/null &
registry_pid=$!
registry_answers() { [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$REGISTRY/v2/")" == 401 ]]; }
wait_until 30 registry_answers || die "the registry did not answer; see $REGISTRY_LOG"
say "$REGISTRY, user $REGISTRY_USER"
for spec in "${images[@]}"; do
    read -r name _ <<<"$spec"
    started="$(now)"
    skopeo --insecure-policy copy --quiet --dest-tls-verify=false \
        --dest-creds "$REGISTRY_USER:$REGISTRY_PASSWORD" \
        "oci:${IMAGE_DIR[$name]}:latest" "docker://$REGISTRY/bench/$name:latest"
    pushed="$(skopeo inspect --raw --tls-verify=false --creds "$REGISTRY_USER:$REGISTRY_PASSWORD" \
        "docker://$REGISTRY/bench/$name:latest" | sha256sum | cut -d' ' -f1)"
    [[ "sha256:$pushed" == "$(jq -r .manifest "${IMAGE_DIR[$name]}/bench-image.json")" ]] ||
        die "the registry serves another manifest for bench/$name than the layout holds"
    say "pushed bench/$name ($(awk -v b="${IMAGE_BYTES[$name]}" 'BEGIN { printf "%.1f", b / 1048576 }') MiB) in $(since "$started") s"
done
TAGS=10
if has concurrent; then
    # The medium image again under tags t1..t10 (same manifest, same blobs): orders for different
    # names of one image.
    for ((i = 1; i <= TAGS; i++)); do
        skopeo --insecure-policy copy --quiet --dest-tls-verify=false \
            --dest-creds "$REGISTRY_USER:$REGISTRY_PASSWORD" \
            "oci:${IMAGE_DIR[medium]}:latest" "docker://$REGISTRY/bench/medium:t$i"
    done
    say "pushed bench/medium again as t1..t$TAGS"
fi
image_ref() { printf '%s/bench/%s:latest' "$REGISTRY" "$1"; }

# GET .../blobs/<digest> answered 200/206 since log line FROM: "<total> <max per blob> <blobs>"
blob_gets_since() { # FROM REPOSITORY
    tail -n +"$(($1 + 1))" "$REGISTRY_LOG" | python3 -c '
import collections, re, sys
repo = sys.argv[1]
counts = collections.Counter()
for line in sys.stdin:
    if "response completed" not in line or "http.request.method=GET" not in line:
        continue
    uri = re.search(r"http\.request\.uri=\"?(/v2/[^\" ]+)", line)
    status = re.search(r"http\.response\.status=(\d+)", line)
    if uri and status and status.group(1) in ("200", "206") and uri.group(1).startswith(f"/v2/{repo}/blobs/"):
        counts[uri.group(1)] += 1
print(sum(counts.values()), max(counts.values(), default=0), len(counts))
' "$2"
}
log_lines() { wc -l <"$REGISTRY_LOG"; }

# berthd log (plain format): "<seconds from the first 'start order received' to the last
# 'container started'> <... to the first 'container started'>"
order_span() {
    python3 - "$1" <<'PY'
import datetime, sys
received, started = [], []
for line in open(sys.argv[1], errors="replace"):
    stamp = line.split(" ", 1)[0]
    try:
        at = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        continue
    if "start order received" in line:
        received.append(at)
    elif "container started" in line:
        started.append(at)
if received and started:
    print(f"{max(started) - min(received):.6f} {min(started) - min(received):.6f}")
else:
    print("nan nan")
PY
}

snapshot_count() { ctr_ snapshots ls 2>/dev/null | grep -c Committed || true; }

# ------------------------------------------------------------------------------------------
# scenarios
# ------------------------------------------------------------------------------------------
# With --perf: the whole machine sampled while one pull runs; the report keeps the top of the
# profile by process, by shared object and by function.
perf_start() { # NAME
    ((perf)) || return 0
    mkdir -p "$RESULTS/perf"
    perf_name="$1"
    perf record -a -g -F 999 -o "$RUN_DIR/$perf_name.perf.data" >/dev/null 2>&1 &
    perf_pid=$!
    sleep 0.3 # perf's own start-up is not part of the pull
}

perf_stop() {
    ((perf)) || return 0
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
    local data="$RUN_DIR/$perf_name.perf.data" out="$RESULTS/perf/$perf_name.txt"
    (
        set +o pipefail # head closes the pipe early
        printf '# %s: share of CPU samples, by process\n' "$perf_name"
        perf report -i "$data" --stdio --no-children --sort comm -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -15
        printf '\n# by process and shared object\n'
        perf report -i "$data" --stdio --no-children --sort comm,dso -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -30
        # berthd's threads are tokio-rt-worker; containerd's Go symbols are stripped in Debian.
        for comm in tokio-rt-worker containerd docker-registry; do
            printf '\n# %s by function (share of all samples)\n' "$comm"
            perf report -i "$data" --stdio --no-children --comms "$comm" --sort symbol -g none 2>/dev/null |
                grep -v '^#' | grep -v '^$' | head -40
        done
    ) >"$out"
    rm -f "$data"
}

cold_berth() { # IMAGE REP
    local image="$1" rep="$2" started cpu0 cpud0 wall
    ctrd_start "cold-berth-$image-$rep"
    berthd_start "cold-$image-$rep"
    record cold "$image" berth "$rep" load "$(loadavg)"
    cpu0="$(cpu_seconds "$berthd_pid")"
    cpud0="$(cpu_seconds "$ctrd_pid")"
    perf_start "cold-$image-berth-$rep"
    started="$(now)"
    timed_cpu "$RUN_DIR/cli-cpu" "$BERTH_BIN" --address "$berthd_sock" pull "$(image_ref "$image")" \
        --pull-secret "$secret_id" >/dev/null ||
        die "berth pull $image failed; see $ctrd_dir/berthd/berthd.log"
    wall="$(since "$started")"
    perf_stop
    record cold "$image" berth "$rep" seconds "$wall"
    record cold "$image" berth "$rep" cpu_client "$(awk -v a="$cpu0" -v b="$(cpu_seconds "$berthd_pid")" -v c="$(cat "$RUN_DIR/cli-cpu")" 'BEGIN { printf "%.2f", b - a + c }')"
    record cold "$image" berth "$rep" cpu_containerd "$(diff_of "$cpud0" "$(cpu_seconds "$ctrd_pid")")"
    record cold "$image" berth "$rep" hwm_kib "$(hwm_kib "$berthd_pid")"
    [[ "$(snapshot_count)" -ge "${IMAGE_LAYERS[$image]}" ]] || die "berth pull left fewer than ${IMAGE_LAYERS[$image]} committed snapshots"
    say "cold $image #$rep berth: ${wall} s"
    berthd_stop
    ctrd_stop
}

cold_ctr() { # IMAGE REP
    local image="$1" rep="$2" started cpud0 wall
    ctrd_start "cold-ctr-$image-$rep"
    record cold "$image" ctr "$rep" load "$(loadavg)"
    cpud0="$(cpu_seconds "$ctrd_pid")"
    perf_start "cold-$image-ctr-$rep"
    started="$(now)"
    timed_cpu "$RUN_DIR/cli-cpu" ctr --address "$ctrd_dir/containerd.sock" -n "$ctrd_ns" images pull --plain-http --user "$REGISTRY_USER:$REGISTRY_PASSWORD" \
        "$(image_ref "$image")" >/dev/null || die "ctr images pull $image failed"
    wall="$(since "$started")"
    perf_stop
    record cold "$image" ctr "$rep" seconds "$wall"
    record cold "$image" ctr "$rep" cpu_client "$(cat "$RUN_DIR/cli-cpu")"
    record cold "$image" ctr "$rep" cpu_containerd "$(diff_of "$cpud0" "$(cpu_seconds "$ctrd_pid")")"
    [[ "$(snapshot_count)" -ge "${IMAGE_LAYERS[$image]}" ]] || die "ctr pull left fewer than ${IMAGE_LAYERS[$image]} committed snapshots"
    say "cold $image #$rep ctr:   ${wall} s"
    ctrd_stop
}

floor_blob() { # REPOSITORY DIGEST: fetch, hash, compare
    local hash
    hash="$(curl -sS -f -u "$REGISTRY_USER:$REGISTRY_PASSWORD" "http://$REGISTRY/v2/$1/blobs/$2" | sha256sum | cut -d' ' -f1)"
    [[ "sha256:$hash" == "$2" ]] || { echo "floor: $2 hashed to $hash" >&2; return 1; }
}
export -f floor_blob
export REGISTRY REGISTRY_USER REGISTRY_PASSWORD

floor() { # IMAGE REP
    local image="$1" rep="$2" started digests wall
    digests="$(jq -r '.blobs[].digest' "${IMAGE_DIR[$image]}/bench-image.json")"
    started="$(now)"
    for digest in $digests; do floor_blob "bench/$image" "$digest" || die "floor fetch failed"; done
    wall="$(since "$started")"
    record cold "$image" floor_seq "$rep" seconds "$wall"
    started="$(now)"
    printf '%s\n' $digests | xargs -P 4 -I{} bash -c 'floor_blob "$0" "$1"' "bench/$image" {} || die "floor fetch failed"
    record cold "$image" floor_4way "$rep" seconds "$(since "$started")"
    say "cold $image #$rep floor: ${wall} s sequential, $(awk -F'\t' -v i="$image" -v r="$rep" '$1 == "cold" && $2 == i && $3 == "floor_4way" && $4 == r { print $6 }' "$RAW") s 4-way"
}

warm_service_file() { # FILE NAME IMAGE POLICY
    cat >"$1" <<EOF
version: v1
kind: Service
metadata:
  name: $2
container:
  image: $3
  pull_secret: $secret_id
  command: ["/bin/sleep", "30"]
  pull_policy: $4
EOF
}

warm_berth_order() { # REP NAME POLICY METRIC-PREFIX
    local rep="$1" name="$2" policy="$3" prefix="$4" file="$ctrd_dir/$2.yaml" m0 started wall server state
    warm_service_file "$file" "$name" "$(image_ref small)" "$policy"
    m0="$(start_seconds_sum)"
    started="$(now)"
    berth_ service create --file "$file" >/dev/null 2>&1 || die "berth service create $name failed; see $ctrd_dir/berthd/berthd.log"
    wall="$(since "$started")"
    server="$(diff_of "$m0" "$(start_seconds_sum)")"
    state="$(berth_ get "$name" --output json | jq -r .state)"
    [[ $state == RUNNING ]] || die "container $name is $state, not RUNNING"
    record warm small berth "$rep" "${prefix}_cli" "$wall"
    record warm small berth "$rep" "${prefix}_server" "$server"
    say "warm #$rep berth $prefix: ${wall} s (berthd order->RUNNING ${server} s)"
}

warm_berth_grpc() { # REP NAME METRIC-PREFIX
    local rep="$1" name="$2" prefix="$3" message="$ctrd_dir/$2.msg" m0 started wall server
    start_order_message "$message" "bench-warm-$rep-$name" "$name" "$(image_ref small)"
    m0="$(start_seconds_sum)"
    started="$(now)"
    start_order "$message" || die "StartContainer $name failed: $(cat "$message.headers" 2>/dev/null)"
    wall="$(since "$started")"
    server="$(diff_of "$m0" "$(start_seconds_sum)")"
    protoc -I "$REPO_ROOT/proto" --decode=berth.v1.Container berth/v1/agent.proto \
        < <(tail -c +6 "$message.reply") | grep -q '^state: RUNNING' || die "container $name is not RUNNING"
    record warm small berth "$rep" "${prefix}_cli" "$wall"
    record warm small berth "$rep" "${prefix}_server" "$server"
    say "warm #$rep berth $prefix: ${wall} s (berthd order->RUNNING ${server} s)"
}

warm_berth() { # REP
    local rep="$1"
    ctrd_start "warm-berth-$rep"
    berthd_start "warm-$rep"
    berth_ pull "$(image_ref small)" --pull-secret "$secret_id" >/dev/null || die "berth pull failed"
    record warm small berth "$rep" load "$(loadavg)"
    local cpu0
    cpu0="$(cpu_ns "$berthd_pid")"
    # pull_policy Never: the CLI sends StartContainer alone; with the image present berthd takes
    # the same branch as IF_NOT_PRESENT. The pull counts as the registry access check, so the
    # first order does not ask the registry again (within access_check_ttl_seconds).
    warm_berth_order "$rep" w1 Never first
    warm_berth_order "$rep" w2 Never cached
    # The scheduler's path: StartContainer IF_NOT_PRESENT straight to the API (curl).
    warm_berth_grpc "$rep" w3 grpc
    # IfNotPresent through the CLI: it calls PullImage (which asks the registry) first.
    warm_berth_order "$rep" w4 IfNotPresent cli_ifnotpresent
    record warm small berth "$rep" berthd_cpu_per_order "$(awk -v a="$cpu0" -v b="$(cpu_ns "$berthd_pid")" 'BEGIN { printf "%.6f", (b - a) / 4e9 }')"
    berthd_stop
    ctrd_stop
}

warm_ctr() { # REP
    local rep="$1" started wall id
    ctrd_start "warm-ctr-$rep"
    ctr_ images pull --plain-http --user "$REGISTRY_USER:$REGISTRY_PASSWORD" "$(image_ref small)" >/dev/null ||
        die "ctr images pull failed"
    record warm small ctr "$rep" load "$(loadavg)"
    for id in c1 c2 c3; do
        touch "$ctrd_dir/$id.log"
        started="$(now)"
        ctr_ run -d --log-uri "file://$ctrd_dir/$id.log" "$(image_ref small)" "$id" /bin/sleep 30 >/dev/null ||
            die "ctr run -d $id failed"
        wall="$(since "$started")"
        ctr_ tasks ls | awk -v id="$id" '$1 == id && $3 == "RUNNING" { found = 1 } END { exit !found }' ||
            die "ctr task $id is not RUNNING"
        record warm small ctr "$rep" "run_$id" "$wall"
        say "warm #$rep ctr run -d $id: ${wall} s"
    done
    ctrd_stop
}

concurrent_one() { # REP KIND(single|orders|pulls)
    local rep="$1" kind="$2" n=1 i from started total first ok gets server_total="" server_first=""
    case "$kind" in
        single) n=1 ;;
        tags) n=$TAGS ;;
        *) n=$CONCURRENT_ORDERS ;;
    esac
    ctrd_start "concurrent-$kind-$rep"
    berthd_start "concurrent-$kind-$rep"
    record concurrent medium "$kind" "$rep" load "$(loadavg)"
    from="$(log_lines)"
    local out="$ctrd_dir/orders"
    mkdir -p "$out"
    local order_pids=() image
    image="$(image_ref medium)"
    for ((i = 1; i <= n; i++)); do
        if [[ $kind == tags ]]; then
            start_order_message "$out/$i.msg" "bench-$kind-$rep-$i" "c$i" "$REGISTRY/bench/medium:t$i"
        else
            start_order_message "$out/$i.msg" "bench-$kind-$rep-$i" "c$i" "$image"
        fi
    done
    [[ $kind == orders || $kind == single ]] && perf_start "concurrent-$kind-$rep"
    started="$(now)"
    for ((i = 1; i <= n; i++)); do
        (
            if [[ $kind == pulls ]]; then
                "$BERTH_BIN" --address "$berthd_sock" pull "$image" --pull-secret "$secret_id" >"$out/$i.out" 2>&1 && status=0 || status=$?
            else
                start_order "$out/$i.msg" >"$out/$i.out" 2>&1 && status=0 || status=$?
                cat "$out/$i.msg.headers" >>"$out/$i.out" 2>/dev/null || true
            fi
            printf '%s %s\n' "$EPOCHREALTIME" "$status" >"$out/$i.done"
        ) &
        order_pids+=($!)
    done
    wait "${order_pids[@]}"
    total="$(since "$started")"
    [[ $kind == orders || $kind == single ]] && perf_stop
    first="$(cat "$out"/*.done | awk -v a="$started" 'NR == 1 || $1 < min { min = $1 } END { printf "%.6f", min - a }')"
    ok="$(cat "$out"/*.done | awk '$2 == 0' | wc -l)"
    read -r gets max_per_blob distinct <<<"$(blob_gets_since "$from" bench/medium)"
    record concurrent medium "$kind" "$rep" seconds "$total"
    record concurrent medium "$kind" "$rep" first_done "$first"
    record concurrent medium "$kind" "$rep" ok "$ok"
    record concurrent medium "$kind" "$rep" requests "$n"
    record concurrent medium "$kind" "$rep" blob_gets "$gets"
    record concurrent medium "$kind" "$rep" max_gets_per_blob "$max_per_blob"
    record concurrent medium "$kind" "$rep" blobs "$distinct"
    if [[ $kind != pulls ]]; then
        # berthd's own view, from its log: first order received -> first/last container started
        # (the client side also counts starting 20 curl processes on this machine).
        read -r server_total server_first <<<"$(order_span "$ctrd_dir/berthd/berthd.log")"
        record concurrent medium "$kind" "$rep" server_seconds "$server_total"
        record concurrent medium "$kind" "$rep" server_first_done "$server_first"
        record concurrent medium "$kind" "$rep" running "$(berth_ ps --output json | jq '[.. | objects | select(.state? == "RUNNING")] | length')"
    fi
    if ((ok < n)); then
        say "concurrent $kind #$rep: $((n - ok)) of $n failed; first failure:"
        for i in $(seq 1 "$n"); do
            if ! grep -q ' 0$' "$out/$i.done"; then sed 's/^/        /' "$out/$i.out" | head -5; break; fi
        done
    fi
    say "concurrent $kind #$rep: $n in ${total} s (first done ${first} s${server_total:+; berthd: ${server_total} s, first ${server_first} s}), $ok ok, blob GETs $gets for $distinct blobs (max $max_per_blob per blob)"
    berthd_stop
    ctrd_stop
}

# The container-start part of the 20 orders, without berth: 20 `ctr run -d` at once with the
# image present (after one `ctr images pull`, also timed).
concurrent_ctr() { # REP
    local rep="$1" i started pull_wall total ok=0 run_pids=() status
    ctrd_start "concurrent-ctr-$rep"
    record concurrent medium ctr "$rep" load "$(loadavg)"
    started="$(now)"
    ctr_ images pull --plain-http --user "$REGISTRY_USER:$REGISTRY_PASSWORD" "$(image_ref medium)" >/dev/null ||
        die "ctr images pull failed"
    pull_wall="$(since "$started")"
    started="$(now)"
    for ((i = 1; i <= CONCURRENT_ORDERS; i++)); do
        ctr_ run -d --log-uri "file://$ctrd_dir/c$i.log" "$(image_ref medium)" "c$i" /bin/sleep 30 >/dev/null 2>&1 &
        run_pids+=($!)
    done
    for i in "${run_pids[@]}"; do
        if wait "$i"; then ok=$((ok + 1)); fi
    done
    total="$(since "$started")"
    record concurrent medium ctr "$rep" pull_seconds "$pull_wall"
    record concurrent medium ctr "$rep" runs_seconds "$total"
    record concurrent medium ctr "$rep" runs_ok "$ok"
    say "concurrent ctr #$rep: ctr images pull ${pull_wall} s; then $CONCURRENT_ORDERS ctr run -d at once ${total} s ($ok ok)"
    ctrd_stop
}

rss_one() { # IMAGE REP
    local image="$1" rep="$2" idle sampled=0 rss pull_pid
    ctrd_start "rss-$image-$rep"
    berthd_start "rss-$image-$rep"
    idle="$(hwm_kib "$berthd_pid")"
    berth_ pull "$(image_ref "$image")" --pull-secret "$secret_id" >/dev/null &
    pull_pid=$!
    while pid_alive "$pull_pid"; do
        rss="$(awk '/^VmRSS:/ { print $2 }' "/proc/$berthd_pid/status")"
        ((rss > sampled)) && sampled=$rss
        sleep 0.02
    done
    wait "$pull_pid" || die "berth pull $image failed"
    record rss "$image" berth "$rep" hwm_idle_kib "$idle"
    record rss "$image" berth "$rep" hwm_kib "$(hwm_kib "$berthd_pid")"
    record rss "$image" berth "$rep" rss_sampled_max_kib "$sampled"
    say "rss $image: berthd VmHWM $(hwm_kib "$berthd_pid") KiB after the pull ($idle KiB before; sampled RSS max $sampled KiB)"
    berthd_stop
    ctrd_stop
}

# ------------------------------------------------------------------------------------------
if has cold; then
    for image in ${cold_images//,/ }; do
        [[ -n "${IMAGE_LAYERS[$image]:-}" ]] || die "--cold-images: no image $image"
        step "cold pull + unpack: $image ($pairs pairs, alternating)"
        for ((rep = 1; rep <= pairs; rep++)); do
            if ((rep % 2)); then cold_berth "$image" "$rep"; cold_ctr "$image" "$rep"
            else cold_ctr "$image" "$rep"; cold_berth "$image" "$rep"; fi
            floor "$image" "$rep"
        done
    done
fi

if has warm; then
    step "warm start to RUNNING: small image present ($warm_pairs pairs, alternating)"
    for ((rep = 1; rep <= warm_pairs; rep++)); do
        if ((rep % 2)); then warm_berth "$rep"; warm_ctr "$rep"
        else warm_ctr "$rep"; warm_berth "$rep"; fi
    done
fi

if has concurrent; then
    step "$CONCURRENT_ORDERS concurrent orders for one uncached image (medium), $concurrent_reps rounds"
    for ((rep = 1; rep <= concurrent_reps; rep++)); do
        if ((rep % 2)); then concurrent_one "$rep" single; concurrent_one "$rep" orders
        else concurrent_one "$rep" orders; concurrent_one "$rep" single; fi
        concurrent_ctr "$rep"
        if ((rep == 1)); then
            # Different names, same blobs: berthd's per-image lock does not cover these.
            concurrent_one "$rep" tags
            concurrent_one "$rep" pulls
        fi
    done
fi

if has rss; then
    step "berthd peak RSS while pulling"
    for image in medium large biglayer; do rss_one "$image" 1; done
fi

printf 'load_end\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS/machine.tsv"
for spec in "${images[@]}"; do
    read -r name layers mib <<<"$spec"
    if [[ $layers == dirs ]]; then
        printf 'image_%s\ttars of %s (gzip -6) + busybox layer, %s bytes\n' "$name" "$mib" "${IMAGE_BYTES[$name]}" >>"$RESULTS/machine.tsv"
    else
        printf 'image_%s\t%s x %s MiB + busybox layer, %s bytes\n' "$name" "$layers" "$mib" "${IMAGE_BYTES[$name]}" >>"$RESULTS/machine.tsv"
    fi
done
cp "$REGISTRY_LOG" "$RESULTS/logs/registry.log"

step "results"
python3 "$BENCH_DIR/report.py" "$RESULTS" | tee "$RESULTS/summary.txt"
printf '\nraw figures: %s\n' "$RAW"
