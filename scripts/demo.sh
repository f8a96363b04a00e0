#!/usr/bin/env bash
# berth end to end on this machine: a private image in a local registry that needs
# a password, a pull secret holding that password, and a container started from
# the image by berthd through containerd. Then it checks that the password is in
# none of the places it must never reach.
#
# Usage: scripts/demo.sh [--keep | --registry-only | --stop | --help] [--containerd VERSION]
#   (none)           run the demo, then remove its container and stop what it started
#   --keep           leave berthd, the registry, containerd and the container running
#   --registry-only  start containerd and the registry and push the image; no berth
#   --stop           stop what an earlier --keep or --registry-only run left running
#   --containerd V   run on containerd V (1.6, 1.7 or 2.1; scripts/containerd.sh fetches it)
#                    started here with its own root, state and socket under
#                    /tmp/berth-demo/containerd-V; the default is the system containerd
#
# Needs root and Debian 12 (scripts/provision.sh installs the rest). Uses:
#   /tmp/berth-demo/                  registry data, image build, configs, logs
#   127.0.0.1:5000                    the demo registry (plain HTTP, htpasswd auth)
#   /run/containerd/containerd.sock   containerd; started here when it does not answer
#   /run/berth/berthd.sock, /var/lib/berth, /etc/berth/secrets.key   berthd's defaults
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEMO_DIR=/tmp/berth-demo
REGISTRY_ADDR=127.0.0.1:5000
REGISTRY_USER=demo
IMAGE="$REGISTRY_ADDR/my-team/private-app:latest"
SERVICE_NAME=private-image-demo
SECRET_NAME=demo-registry
CONTAINERD_SOCKET=/run/containerd/containerd.sock
CONTAINERD_NAMESPACE=berth
BERTH_SOCKET=/run/berth/berthd.sock
BERTH_STATE_DIR=/var/lib/berth
BERTH_KEY_FILE=/etc/berth/secrets.key
BERTH_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/berth"
BERTHD_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/berthd"
PASSWORD_FILE="$DEMO_DIR/registry-password"
WAIT_SECONDS=60

# cargo lives here on every machine; a minimal PATH may lack it.
for dir in "${HOME:-/root}/.cargo/bin" /usr/local/bin; do
    case ":$PATH:" in *":$dir:"*) ;; *) [[ -d "$dir" ]] && PATH="$dir:$PATH" ;; esac
done
export PATH

mode=run
containerd_version=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --keep) mode=keep ;;
        --registry-only) mode=registry-only ;;
        --stop) mode=stop ;;
        --containerd)
            [[ $# -ge 2 ]] || {
                printf 'demo: --containerd needs a version (1.6, 1.7 or 2.1)\n' >&2
                exit 64
            }
            containerd_version="$2"
            shift
            ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            printf 'demo: unknown argument %s (see --help)\n' "$1" >&2
            exit 64
            ;;
    esac
    shift
done
# ctr of the chosen build (the system's by default).
CONTAINERD_BIN=/usr/bin
ctr() { "$CONTAINERD_BIN/ctr" "$@"; }

step() { printf '\n==> %s\n' "$*"; }
say() { printf '    %s\n' "$*"; }
show() { printf '+ %s\n' "$*"; }
die() {
    printf 'demo: error: %s\n' "$*" >&2
    exit 1
}
# The CLI under its own name, so the commands printed read as a user types them.
berth() { "$BERTH_BIN" "$@"; }

# --- processes this script starts: pid files, checked against the program name ---
pid_of() { # NAME -> pid of the live process in $DEMO_DIR/NAME.pid, or nothing
    local name="$1" pid
    [[ -f "$DEMO_DIR/$name.pid" ]] || return 0
    pid="$(cat "$DEMO_DIR/$name.pid")"
    if [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]; then
        printf '%s\n' "$pid"
    fi
}

start_background() { # NAME LOG COMMAND... ; detached, so --keep outlives this shell
    local name="$1" log="$2"
    shift 2
    setsid "$@" >"$log" 2>&1 </dev/null &
    printf '%s\n' "$!" >"$DEMO_DIR/$name.pid"
}

stop_process() { # NAME: SIGTERM the recorded process, SIGKILL it after 20 s
    local name="$1" pid
    pid="$(pid_of "$name")"
    if [[ -n "$pid" ]]; then
        say "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 20))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name did not stop in 20 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$DEMO_DIR/$name.pid"
}

# Polls COMMAND until it succeeds. Fails after $WAIT_SECONDS, or at once when the
# process started here as NAME (if not empty) has exited.
wait_for() { # NAME DESCRIPTION COMMAND...
    local name="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + WAIT_SECONDS))
    until "$@" >/dev/null 2>&1; do
        if [[ -n "$name" && -z "$(pid_of "$name")" ]]; then
            printf 'demo: %s exited; the end of its log, %s/%s.log:\n' "$name" "$DEMO_DIR" "$name" >&2
            tail -n 15 "$DEMO_DIR/$name.log" >&2 || true
            return 1
        fi
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
    say "$what"
}

stop_everything() {
    if [[ -x "$BERTH_BIN" && -n "$(pid_of berthd)" ]]; then
        if berth get "$SERVICE_NAME" >/dev/null 2>&1; then
            show "berth rm --force $SERVICE_NAME"
            berth rm --force "$SERVICE_NAME" >/dev/null || true
        fi
    fi
    stop_process berthd
    stop_process docker-registry
    stop_process containerd
}

# On any failure: say where the logs are, and stop what this run started.
on_exit() {
    local status=$?
    if [[ $status -ne 0 ]]; then
        printf '\ndemo: FAILED (exit %s). Logs: %s/*.log\n' "$status" "$DEMO_DIR" >&2
        if [[ -f "$DEMO_DIR/berthd.log" ]]; then
            printf '\nlast lines of %s/berthd.log:\n' "$DEMO_DIR" >&2
            # The password is hex; mask it in case the failure is that it leaked.
            local mask=''
            [[ -s "$PASSWORD_FILE" ]] && mask="s/$(cat "$PASSWORD_FILE")/****/g"
            tail -n 20 "$DEMO_DIR/berthd.log" | sed -e "$mask" >&2 || true
        fi
        stop_everything >&2
    fi
}

if [[ $mode == stop ]]; then
    step "stopping what an earlier demo run left running"
    stop_everything
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "run as root: berthd and containerd manage containers"
trap on_exit EXIT

# --- 1. packages --------------------------------------------------------------------
step "provisioning (scripts/provision.sh: installs what is missing)"
bash "$REPO_ROOT/scripts/provision.sh"

mkdir -p "$DEMO_DIR"
chmod 0700 "$DEMO_DIR"

# Anything an earlier run left behind is stopped, so this run starts clean.
if [[ -n "$(pid_of berthd)$(pid_of docker-registry)" ]]; then
    step "stopping the berthd and registry of an earlier run"
    stop_process berthd
    stop_process docker-registry
fi

rm -f "$DEMO_DIR/berthd.log"

# --- 2. containerd --------------------------------------------------------------------
if [[ -n "$containerd_version" ]]; then
    # A build of its own beside the system one: own root, state, socket and config.
    CONTAINERD_BIN="$(bash "$REPO_ROOT/scripts/containerd.sh" dir "$containerd_version")"
    containerd_dir="$DEMO_DIR/containerd-$containerd_version"
    CONTAINERD_SOCKET="$containerd_dir/containerd.sock"
    mkdir -p "$containerd_dir"
    config_version=2
    disabled='"io.containerd.grpc.v1.cri"'
    if [[ "$containerd_version" == 2.* ]]; then
        config_version=3 # 2.x reads version 3; its CRI is three plugins
        disabled='"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"'
    fi
    cat >"$containerd_dir/config.toml" <<EOF
version = $config_version
root = "$containerd_dir/root"
state = "$containerd_dir/state"
disabled_plugins = [$disabled]

[grpc]
  address = "$CONTAINERD_SOCKET"

[ttrpc]
  address = "$CONTAINERD_SOCKET.ttrpc"
EOF
fi
step "containerd ${containerd_version:-(system)} at $CONTAINERD_SOCKET"
if [[ -n "$containerd_version" ]] && ctr --address "$CONTAINERD_SOCKET" version >/dev/null 2>&1; then
    say "already answering (an earlier --keep run); using it"
elif [[ -n "$containerd_version" ]]; then
    say "starting containerd $containerd_version from $CONTAINERD_BIN (log: $DEMO_DIR/containerd.log)"
    show "containerd --config $containerd_dir/config.toml &"
    # Its own shim first on PATH: containerd finds containerd-shim-runc-v2 there.
    start_background containerd "$DEMO_DIR/containerd.log" \
        env "PATH=$CONTAINERD_BIN:$PATH" "$CONTAINERD_BIN/containerd" --config "$containerd_dir/config.toml"
    wait_for containerd "containerd answers (ctr version)" ctr --address "$CONTAINERD_SOCKET" version ||
        die "containerd did not answer (waited up to ${WAIT_SECONDS}s); see $DEMO_DIR/containerd.log"
elif ctr --address "$CONTAINERD_SOCKET" version >/dev/null 2>&1; then
    say "already answering; using it"
else
    say "not answering; starting containerd with its default config (log: $DEMO_DIR/containerd.log)"
    show "containerd &"
    start_background containerd "$DEMO_DIR/containerd.log" containerd
    wait_for containerd "containerd answers (ctr version)" ctr --address "$CONTAINERD_SOCKET" version ||
        die "containerd did not answer (waited up to ${WAIT_SECONDS}s); see $DEMO_DIR/containerd.log"
fi

# --- 3. registry ----------------------------------------------------------------------
step "a private registry at $REGISTRY_ADDR (htpasswd auth, plain HTTP)"
if curl -s -o /dev/null --max-time 2 "http://$REGISTRY_ADDR/v2/"; then
    die "something already listens on $REGISTRY_ADDR; stop it first (a system docker-registry: systemctl stop docker-registry)"
fi
(umask 077 && openssl rand -hex 16 | tr -d '\n' >"$PASSWORD_FILE")
say "user $REGISTRY_USER, a fresh random password in $PASSWORD_FILE"
htpasswd -Bbn "$REGISTRY_USER" "$(cat "$PASSWORD_FILE")" >"$DEMO_DIR/htpasswd"
mkdir -p "$DEMO_DIR/registry"
cat >"$DEMO_DIR/registry.yml" <<EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $DEMO_DIR/registry
  delete:
    enabled: true
http:
  addr: $REGISTRY_ADDR
  secret: $(openssl rand -hex 16)
auth:
  htpasswd:
    realm: berth-demo
    path: $DEMO_DIR/htpasswd
EOF
show "docker-registry serve $DEMO_DIR/registry.yml &"
start_background docker-registry "$DEMO_DIR/registry.log" docker-registry serve "$DEMO_DIR/registry.yml"
registry_answers() { [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$REGISTRY_ADDR/v2/")" == 401 ]]; }
wait_for docker-registry "registry answers, and asks for credentials (GET /v2/ -> 401)" registry_answers ||
    die "the registry did not answer (waited up to ${WAIT_SECONDS}s); see $DEMO_DIR/docker-registry.log"

# --- 4. image ---------------------------------------------------------------------------
step "building a tiny image with umoci (static busybox, prints one line) and pushing it"
busybox_path="$(command -v busybox)"
if ldd "$busybox_path" >/dev/null 2>&1; then
    die "$busybox_path is dynamically linked; the image needs busybox-static"
fi
layout="$DEMO_DIR/image"
bundle="$DEMO_DIR/bundle"
rm -rf "$layout" "$bundle"
show "umoci init --layout $layout && umoci new --image $layout:latest"
umoci init --layout "$layout"
umoci new --image "$layout:latest"
show "umoci unpack --image $layout:latest $bundle"
umoci unpack --image "$layout:latest" "$bundle" >/dev/null
mkdir -p "$bundle/rootfs/bin"
cp "$busybox_path" "$bundle/rootfs/bin/busybox"
for applet in sh echo cat ls; do ln -sf busybox "$bundle/rootfs/bin/$applet"; done
show "umoci repack --image $layout:latest $bundle"
umoci repack --image "$layout:latest" "$bundle" >/dev/null
show "umoci config --image $layout:latest --config.env PATH=/bin --config.cmd sh --config.cmd=-c --config.cmd 'echo hello from private image'"
umoci config --image "$layout:latest" --config.env PATH=/bin \
    --config.cmd sh --config.cmd=-c --config.cmd "echo hello from private image"
show "skopeo copy --dest-creds $REGISTRY_USER:**** --dest-tls-verify=false oci:$layout:latest docker://$IMAGE"
skopeo --insecure-policy copy --quiet --dest-creds "$REGISTRY_USER:$(cat "$PASSWORD_FILE")" \
    --dest-tls-verify=false "oci:$layout:latest" "docker://$IMAGE"
if skopeo inspect --raw --tls-verify=false "docker://$IMAGE" >/dev/null 2>&1; then
    die "the registry serves $IMAGE without credentials; the demo needs a private image"
fi
say "pushed; an anonymous read of $IMAGE is refused"

if [[ $mode == registry-only ]]; then
    trap - EXIT
    step "registry ready"
    say "image:    $IMAGE"
    say "user:     $REGISTRY_USER, password in $PASSWORD_FILE"
    say "stop it:  scripts/demo.sh --stop"
    exit 0
fi

# --- 5. berth ---------------------------------------------------------------------------
step "building berth (cargo build --bins, debug)"
show "cargo build -p berth --bins"
(cd "$REPO_ROOT" && cargo build --quiet -p berth --bins)

step "starting berthd"
if [[ -S "$BERTH_SOCKET" ]] && berth ps >/dev/null 2>&1; then
    die "a berthd not started by this script already serves $BERTH_SOCKET; stop it first (systemctl stop berthd)"
fi
cat >"$DEMO_DIR/berthd.toml" <<EOF
# Written by scripts/demo.sh. Every key left out has its embedded default
# (config/berthd.toml lists them all); the registry of the demo speaks plain HTTP.
listen = "unix://$BERTH_SOCKET"
state_dir = "$BERTH_STATE_DIR"

[secrets]
key_file = "$BERTH_KEY_FILE"

[containerd]
socket = "$CONTAINERD_SOCKET"

[registry]
plain_http = ["$REGISTRY_ADDR"]
EOF
say "config $DEMO_DIR/berthd.toml:"
sed 's/^/      /' "$DEMO_DIR/berthd.toml"
install -d -m 0700 "$(dirname "$BERTH_KEY_FILE")"
install -d -m 0750 "$(dirname "$BERTH_SOCKET")"
show "BERTH_LOG=info berthd --config $DEMO_DIR/berthd.toml &   (log: $DEMO_DIR/berthd.log)"
start_background berthd "$DEMO_DIR/berthd.log" env BERTH_LOG=info "$BERTHD_BIN" --config "$DEMO_DIR/berthd.toml"
wait_for berthd "berthd answers (berth ps)" berth ps ||
    die "berthd did not answer on $BERTH_SOCKET (waited up to ${WAIT_SECONDS}s); see $DEMO_DIR/berthd.log"
show "berth version"
berth version | sed 's/^/      /'

# --- 6. the seed flow: secret, service, ps, logs ----------------------------------------
step "clearing what an earlier run left in berthd"
if berth get "$SERVICE_NAME" >/dev/null 2>&1; then
    show "berth rm --force $SERVICE_NAME"
    berth rm --force "$SERVICE_NAME"
fi
old_secret_ids="$(berth secret list --output json | jq -r --arg name "$SECRET_NAME" '
    if type == "array" then .[] elif type == "object" and has("secrets") then .secrets[] else . end
    | select(.name? == $name) | .id')"
for old_id in $old_secret_ids; do
    show "berth secret delete $old_id"
    berth secret delete "$old_id"
done

step "storing the registry password as a pull secret"
show "berth secret docker create --name $SECRET_NAME --server $REGISTRY_ADDR --username $REGISTRY_USER --password-stdin < $PASSWORD_FILE"
secret_id="$(berth secret docker create --name "$SECRET_NAME" --server "$REGISTRY_ADDR" \
    --username "$REGISTRY_USER" --password-stdin <"$PASSWORD_FILE")"
[[ "$secret_id" == secret-* ]] || die "expected a secret id (secret-...), got: $secret_id"
say "secret id: $secret_id"
show "berth secret list"
berth secret list

step "starting a service from the private image"
cat >"$DEMO_DIR/service.yaml" <<EOF
version: v1
kind: Service
metadata:
  name: $SERVICE_NAME
container:
  image: $IMAGE
  pull_secret: $secret_id
EOF
say "$DEMO_DIR/service.yaml:"
sed 's/^/      /' "$DEMO_DIR/service.yaml"
show "berth service create --file $DEMO_DIR/service.yaml"
berth service create --file "$DEMO_DIR/service.yaml"

logs_have_hello() { berth logs "$SERVICE_NAME" | grep -q 'hello from private image'; }
wait_for "" "the container wrote its line" logs_have_hello ||
    die "no 'hello from private image' in the logs of $SERVICE_NAME within ${WAIT_SECONDS}s"
show "berth ps"
berth ps
show "berth logs $SERVICE_NAME"
berth logs "$SERVICE_NAME"

# --- 7. where the password must not be ----------------------------------------------------
step "checking that the registry password reached none of: container, image records, state dir, berthd log"
password="$(cat "$PASSWORD_FILE")"
container_id="$(berth get "$SERVICE_NAME" --output json | jq -r '.id // .container.id // empty')"
[[ -n "$container_id" ]] || die "berth get $SERVICE_NAME --output json gave no container id"
ctr_ns=(ctr --address "$CONTAINERD_SOCKET" --namespace "$CONTAINERD_NAMESPACE")
container_info="$("${ctr_ns[@]}" containers info "$container_id")"
image_records="$("${ctr_ns[@]}" images ls)"
content_records="$("${ctr_ns[@]}" content ls)"
leaks=()
if grep -qF "$password" <<<"$container_info"; then leaks+=("containerd container $container_id (spec, labels)"); fi
if grep -qF "$password" <<<"$image_records"; then leaks+=("containerd image records"); fi
if grep -qF "$password" <<<"$content_records"; then leaks+=("containerd content labels"); fi
if grep -rqsaF "$password" "$BERTH_STATE_DIR"; then leaks+=("$BERTH_STATE_DIR (plaintext)"); fi
if grep -qaF "$password" "$DEMO_DIR/berthd.log"; then leaks+=("$DEMO_DIR/berthd.log"); fi
if [[ ${#leaks[@]} -gt 0 ]]; then
    die "the registry password was found in: ${leaks[*]}"
fi
say "not found in containerd container $container_id, the image and content records, $BERTH_STATE_DIR, or the berthd log"

# --- 8. the end ---------------------------------------------------------------------------
trap - EXIT
if [[ $mode == keep ]]; then
    step "left running (--keep)"
    say "berthd:     pid $(pid_of berthd), socket $BERTH_SOCKET, log $DEMO_DIR/berthd.log"
    say "registry:   pid $(pid_of docker-registry), $REGISTRY_ADDR"
    if [[ -n "$(pid_of containerd)" ]]; then say "containerd: pid $(pid_of containerd)"; fi
    say "try:        $BERTH_BIN ps; grpcurl -plaintext -unix $BERTH_SOCKET list"
    say "stop it:    scripts/demo.sh --stop"
else
    step "cleaning up (scripts/demo.sh --keep leaves everything running)"
    stop_everything
fi
printf '\ndemo: OK — %s ran from the private image %s, pulled with secret %s\n' \
    "$SERVICE_NAME" "$IMAGE" "$secret_id"
