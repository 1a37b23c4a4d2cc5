#!/usr/bin/env bash
# Runs deploy/systemd/timport.service, verbatim, under a real systemd (PID 1 of a podman container)
# and checks what the unit promises. NOT part of CI: it builds an image with systemd in it (vfs
# layer copies, Debian packages), about two minutes plus a deliberate 30 s watchdog timeout.
#
# The container is a Debian bookworm rootfs made by debootstrap (the same local base image as
# scripts/container-smoke.sh) plus systemd, the host-built release binary at
# /usr/local/bin/timport, the unit and deploy/systemd/timport.toml as /etc/timport/timport.toml,
# a random key in /etc/timport/secret_key (root, 0600), and a second unit running
# `timport simulate` on 127.0.0.1:18080 with that key. A drop-in points tencent.base_url at it:
# the only change to the deployment; the simulator checks every UserSig against the key, so
# imports succeed only when the key reached the daemon through LoadCredential.
# Checks, in order:
#   1. the unit becomes active (Type=notify: only after READY=1), runs as a dynamic user, and
#      systemd records watchdog pings;
#   2. a job file dropped into /var/lib/timport/spool by root is imported (all lines), the
#      operator command `timport status` works as root, /readyz answers 200;
#   3. SIGSTOP on the daemon (a wedged engine): systemd's watchdog kills it after WatchdogSec and
#      Restart=on-failure starts it again;
#   4. `systemctl stop` (SIGTERM): exit 0, result success;
#   5. a configuration error (exit 2) is not restarted (RestartPreventExitStatus=2);
#   6. `systemd-analyze security` on the loaded unit.
# Runs as root on Debian bookworm; installs podman, buildah, runc and debootstrap when missing.
# DEBIAN_MIRROR overrides debootstrap's default mirror.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
WORK="$ROOT/target/systemd-smoke"
BASE_IMAGE="localhost/debian:bookworm-local"
IMAGE="localhost/timport-systemd:smoke"
NAME="timport-systemd-smoke"
PODMAN=(podman --storage-driver vfs --runtime runc)
LIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)

log() { printf '== %s\n' "$*"; }
fail() {
    printf 'systemd-smoke: FAIL: %s\n' "$*" >&2
    "${PODMAN[@]}" exec "$NAME" journalctl --no-pager -n 30 -u timport 2>/dev/null >&2 || true
    exit 1
}
in_ctr() { "${PODMAN[@]}" exec "$NAME" "$@"; }
prop() { in_ctr systemctl show -p "$1" --value timport.service; }

missing=()
for tool in podman buildah runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -x target/release/timport ] || cargo build --release --locked --bin timport

mkdir -p "$WORK"
if ! "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    log "debootstrap a minbase bookworm rootfs"
    rm -rf "$WORK/rootfs"
    # shellcheck disable=SC2086 # an empty DEBIAN_MIRROR means debootstrap's default
    debootstrap --variant=minbase --include=ca-certificates bookworm "$WORK/rootfs" ${DEBIAN_MIRROR:-} \
        >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; fail debootstrap; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
fi

log "image: $BASE_IMAGE + systemd + the unit, verbatim"
CTX="$WORK/ctx"
rm -rf "$CTX"
mkdir -p "$CTX"
install -m 0755 target/release/timport "$CTX/timport"
cp deploy/systemd/timport.service deploy/systemd/timport.toml "$CTX/"
KEY="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
printf '%s\n' "$KEY" >"$CTX/secret_key"
printf 'TIMPORT_SIM_SECRET_KEY=%s\n' "$KEY" >"$CTX/sim.env"
cat >"$CTX/timport-sim.service" <<'EOF'
[Unit]
Description=timport simulate (stand-in for Tencent's REST endpoints)
[Service]
EnvironmentFile=/etc/timport/sim.env
ExecStart=/usr/local/bin/timport simulate --listen 127.0.0.1:18080 --auto-create-groups
EOF
cat >"$CTX/simulator.conf" <<'EOF'
[Unit]
Wants=timport-sim.service
After=timport-sim.service
[Service]
Environment=TIMPORT__TENCENT__BASE_URL=http://127.0.0.1:18080
EOF
cat >"$CTX/Containerfile" <<EOF
FROM $BASE_IMAGE
RUN apt-get update && apt-get install -y --no-install-recommends systemd \\
    && rm -rf /var/lib/apt/lists/*
COPY timport /usr/local/bin/timport
COPY timport.service timport-sim.service /etc/systemd/system/
COPY simulator.conf /etc/systemd/system/timport.service.d/simulator.conf
COPY timport.toml /etc/timport/timport.toml
COPY secret_key sim.env /etc/timport/
RUN chmod 0600 /etc/timport/secret_key /etc/timport/sim.env && systemctl enable timport.service
CMD ["/lib/systemd/systemd"]
EOF
buildah --storage-driver vfs bud --isolation chroot --runtime runc "${LIMITS[@]}" \
    --network host --layers=false -t "$IMAGE" -f "$CTX/Containerfile" "$CTX" \
    >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; fail "image build"; }

"${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
trap '"${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true' EXIT
"${PODMAN[@]}" run -d --name "$NAME" --systemd=always --network none "${LIMITS[@]}" "$IMAGE" >/dev/null

log "1. started: Type=notify, dynamic user, watchdog pings"
state=""
for _ in $(seq 1 60); do
    state="$(prop ActiveState 2>/dev/null || true)"
    [ "$state" = active ] && break
    sleep 1
done
[ "$state" = active ] || fail "timport.service not active (state: $state)"
pid="$(prop MainPID)"
uid="$(in_ctr stat -c %u "/proc/$pid")"
echo "active, main pid $pid, uid $uid, status \"$(prop StatusText)\""
# DynamicUser= allocates from 61184..65519.
if [ "$uid" -lt 61184 ] || [ "$uid" -gt 65519 ]; then fail "uid $uid is not a dynamic user"; fi
sleep 3
wd="$(prop WatchdogTimestampMonotonic)"
[ "${wd:-0}" != 0 ] || fail "no WATCHDOG=1 recorded by systemd"
echo "watchdog ping recorded (WatchdogTimestamp=$(prop WatchdogTimestamp))"

log "2. spool job dropped by root, imported with the credential's key"
expected="$(grep -c . examples/support-history.ndjson)"
"${PODMAN[@]}" cp examples/support-history.ndjson "$NAME:/root/job.ndjson"
in_ctr bash -c 'chmod 0644 /root/job.ndjson && cp /root/job.ndjson /var/lib/timport/spool/.job.tmp \
    && mv /var/lib/timport/spool/.job.tmp /var/lib/timport/spool/support-history.ndjson'
status_cmd=(env TIMPORT__QUEUE__DATABASE=/var/lib/timport/timport.db timport status --config /etc/timport/timport.toml)
imported=""
for _ in $(seq 1 120); do
    imported="$(in_ctr "${status_cmd[@]}" --json 2>/dev/null \
        | sed -n '/"totals"/,/}/s/^ *"imported": *\([0-9]*\).*/\1/p' | head -1 || true)"
    [ "$imported" = "$expected" ] && break
    sleep 1
done
[ "$imported" = "$expected" ] || fail "imported ${imported:-0} of $expected"
in_ctr "${status_cmd[@]}" | head -4
# shellcheck disable=SC2016 # $code expands in the container's bash
in_ctr bash -c 'exec 3<>/dev/tcp/127.0.0.1/9464 && printf "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" >&3 && read -r _ code _ <&3 && [ "$code" = 200 ]' \
    || fail "/readyz is not 200"
echo "/readyz: 200"
if in_ctr journalctl -u timport --no-pager -o cat | grep -q 'spool scan failed'; then
    echo "WARNING: the daemon logged 'spool scan failed' for a job file owned by another user:"
    in_ctr journalctl -u timport --no-pager -o cat | grep 'spool scan failed' | head -2
fi

log "3. wedged engine (SIGSTOP): watchdog kill and restart"
in_ctr bash -c "kill -STOP $pid"
restarts=""
for _ in $(seq 1 120); do
    restarts="$(prop NRestarts)"
    [ "$restarts" = 1 ] && [ "$(prop ActiveState)" = active ] && break
    sleep 1
done
[ "$restarts" = 1 ] || fail "no restart after the watchdog period (NRestarts=$restarts)"
in_ctr journalctl -u timport --no-pager -o cat | grep -E 'Watchdog timeout|Failed with result' | head -2
echo "restarted: new main pid $(prop MainPID), NRestarts=$restarts"

log "4. systemctl stop: SIGTERM, exit 0"
in_ctr systemctl stop timport.service
if [ "$(prop ExecMainStatus)" != 0 ] || [ "$(prop Result)" != success ]; then
    fail "stop: status $(prop ExecMainStatus), result $(prop Result)"
fi
echo "exit status 0, result success"

log "5. configuration error: exit 2, not restarted"
in_ctr bash -c 'mkdir -p /run/systemd/system/timport.service.d \
    && printf "[Service]\nEnvironment=TIMPORT__IMPORT__BATCH_SIZE=99\n" >/run/systemd/system/timport.service.d/bad.conf \
    && systemctl daemon-reload && systemctl reset-failed timport.service'
in_ctr systemctl start timport.service >/dev/null 2>&1 || true
sleep 8 # longer than RestartSec=5s
[ "$(prop ExecMainStatus)" = 2 ] || fail "bad config: exit status $(prop ExecMainStatus)"
[ "$(prop NRestarts)" = 0 ] || fail "bad config was restarted ($(prop NRestarts) times)"
[ "$(prop ActiveState)" = failed ] || fail "bad config: state $(prop ActiveState)"
in_ctr journalctl -u timport --no-pager -o cat | grep -v '^{' | grep -m1 'batch_size' || true
echo "exit status 2, NRestarts 0, state failed"

log "6. systemd-analyze security (loaded unit)"
in_ctr systemd-analyze security timport.service | tail -1

log "systemd-smoke: all passed"
