#!/usr/bin/env bash
# Builds the runtime stage of deploy/container/Containerfile for real and runs the daemon in it.
# NOT part of CI: it debootstraps a Debian rootfs and copies image layers (vfs), minutes of work.
#
# Where no registry image can be pulled (only package registries reachable), the two FROM images
# of the real Containerfile are out of reach, so this script:
#   1. builds the release binary on the host (bookworm glibc, like the builder stage would);
#   2. makes a local stand-in for debian:bookworm-slim with debootstrap (minbase, ca-certificates)
#      and imports it as localhost/debian:bookworm-local;
#   3. takes the runtime stage of deploy/container/Containerfile verbatim, swapping only its FROM
#      for the stand-in and its COPY --from=builder for the host-built binary, and builds it
#      (buildah, docker format so HEALTHCHECK is kept);
#   4. runs `timport run --until-idle --ingest /examples` against the built-in simulator
#      (config/local.toml mounted at /etc/timport/local.toml) and expects exit 0;
#   5. runs the daemon detached the way compose.yaml does (read-only root, all capabilities
#      dropped, a bind-mounted spool owned by uid 10001, the key as a secret), expects the image's
#      HEALTHCHECK to pass, drops a job into the spool, waits for `timport status --json` to show
#      it imported, reads /metrics, stops it with `podman stop` (SIGTERM) and expects exit 0.
# The builder stage (rust:1.95-bookworm, cargo build --release --locked) is only linted
# (scripts/check-deploy.sh), never built here.
#
# Runs as root on Debian bookworm; installs podman, buildah, runc and debootstrap when missing.
# The default runtime (crun) and default ulimits fail in this kind of sandbox, hence
# `--runtime runc` and explicit `--ulimit`. DEBIAN_MIRROR overrides debootstrap's default mirror.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
WORK="$ROOT/target/container-smoke"
BASE_IMAGE="localhost/debian:bookworm-local"
IMAGE="localhost/timport:smoke"
NAME="timport-smoke"
PODMAN=(podman --storage-driver vfs --runtime runc)
LIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)

log() { printf '== %s\n' "$*"; }
fail() { printf 'container-smoke: FAIL: %s\n' "$*" >&2; exit 1; }

missing=()
for tool in podman buildah runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
podman --version
buildah --version

log "release binary"
if [ ! -x target/release/timport ]; then
    cargo build --release --locked --bin timport
fi

mkdir -p "$WORK"
if ! "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    log "debootstrap a minbase bookworm rootfs (stand-in for debian:bookworm-slim)"
    rm -rf "$WORK/rootfs"
    # shellcheck disable=SC2086 # an empty DEBIAN_MIRROR means debootstrap's default
    debootstrap --variant=minbase --include=ca-certificates bookworm "$WORK/rootfs" ${DEBIAN_MIRROR:-} \
        >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; fail debootstrap; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
fi

log "runtime stage of deploy/container/Containerfile, FROM $BASE_IMAGE"
CTX="$WORK/ctx"
rm -rf "$CTX"
mkdir -p "$CTX"
install -m 0755 target/release/timport "$CTX/timport"
from='FROM debian:bookworm-slim AS runtime'
copy='COPY --from=builder /out/timport /usr/local/bin/timport'
grep -qxF "$from" deploy/container/Containerfile || fail "no line '$from' in the Containerfile"
grep -qxF "$copy" deploy/container/Containerfile || fail "no line '$copy' in the Containerfile"
sed -n "\|^$from\$|,\$p" deploy/container/Containerfile \
    | sed -e "s|^$from\$|FROM $BASE_IMAGE AS runtime|" \
          -e "s|^$copy\$|COPY timport /usr/local/bin/timport|" >"$CTX/Containerfile"
buildah --storage-driver vfs bud --isolation chroot --runtime runc "${LIMITS[@]}" \
    --network host --format docker --layers=false -t "$IMAGE" -f "$CTX/Containerfile" "$CTX" \
    >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; fail "image build"; }
"${PODMAN[@]}" image inspect --format '{{.Config.User}} {{.Config.Entrypoint}} {{.Config.Cmd}} {{.Config.StopSignal}} {{.Config.Healthcheck.Test}}' "$IMAGE"

log "one-shot: run --config /etc/timport/local.toml --until-idle --ingest /examples"
out="$("${PODMAN[@]}" run --rm --network none "${LIMITS[@]}" \
    -v "$ROOT/config/local.toml:/etc/timport/local.toml:ro" \
    -v "$ROOT/examples:/examples:ro" \
    "$IMAGE" run --config /etc/timport/local.toml --until-idle --ingest /examples 2>"$WORK/oneshot.err")" \
    || { tail -20 "$WORK/oneshot.err"; printf '%s\n' "$out" | tail -20; fail "one-shot run exited non-zero"; }
printf '%s\n' "$out" | grep -E '^(accepted|import finished)' || true
printf '%s\n' "$out" | grep -qE '^import finished: [1-9][0-9]* imported, 0 failed, 0 blocked' \
    || fail "one-shot run did not import everything"

log "daemon: compose-like run, healthcheck, spool job, status, metrics, podman stop"
"${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
SPOOL="$WORK/spool"
rm -rf "$SPOOL"
install -d -o 10001 -g 10001 -m 0700 "$SPOOL"
# The key as compose passes a file secret: a read-only bind mount at /run/secrets/NAME, owned by
# the image's user. (podman's own --secret cannot be combined with --read-only here: podman
# 4.3.1 with runc fails to create the mount point on the read-only root.)
printf 'smoke-test-key\n' >"$WORK/secret_key"
chown 10001:10001 "$WORK/secret_key"
chmod 0400 "$WORK/secret_key"
cleanup() {
    "${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
}
trap cleanup EXIT
"${PODMAN[@]}" run -d --name "$NAME" --network none "${LIMITS[@]}" \
    --read-only --cap-drop ALL --security-opt no-new-privileges \
    --health-interval=disable \
    -v "$WORK/secret_key:/run/secrets/timport_secret_key:ro" \
    -v "$ROOT/config/local.toml:/etc/timport/local.toml:ro" \
    -v "$SPOOL:/var/lib/timport/spool" \
    "$IMAGE" run --config /etc/timport/local.toml >/dev/null

healthy=""
for _ in $(seq 1 60); do
    if "${PODMAN[@]}" healthcheck run "$NAME" >/dev/null 2>&1; then healthy=yes; break; fi
    sleep 1
done
[ -n "$healthy" ] || { "${PODMAN[@]}" logs "$NAME" 2>&1 | tail -20; fail "HEALTHCHECK never passed"; }
echo "healthcheck: healthy"

metrics() {
    "${PODMAN[@]}" exec "$NAME" bash -c \
        'exec 3<>/dev/tcp/127.0.0.1/9464; printf "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" >&3; cat <&3'
}
expected="$(grep -c . examples/support-history.ndjson)"
install -o 10001 -g 10001 -m 0600 examples/support-history.ndjson "$SPOOL/.incoming.tmp"
mv "$SPOOL/.incoming.tmp" "$SPOOL/support-history.ndjson"
imported=""
for _ in $(seq 1 180); do
    imported="$(metrics 2>/dev/null | sed -n 's/^timport_messages_imported_total \([0-9]*\)$/\1/p' || true)"
    [ "$imported" = "$expected" ] && break
    sleep 1
done
[ "$imported" = "$expected" ] \
    || { "${PODMAN[@]}" logs "$NAME" 2>&1 | tail -20; fail "imported ${imported:-0} of $expected"; }
[ -f "$SPOOL/done/support-history.ndjson" ] || fail "job file not moved to spool/done"
echo "spool job: $imported of $expected messages imported, file moved to done/"
m="$(metrics)"
for name in timport_requests_total timport_job_files_total timport_request_duration_seconds_bucket; do
    printf '%s\n' "$m" | grep -m1 "^$name" || fail "/metrics lacks $name"
done
"${PODMAN[@]}" exec "$NAME" timport status --config /etc/timport/local.toml \
    || fail "timport status inside the container"

"${PODMAN[@]}" stop -t 45 "$NAME" >/dev/null
code="$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$NAME")"
[ "$code" = 0 ] || { "${PODMAN[@]}" logs "$NAME" 2>&1 | tail -20; fail "exit code $code after podman stop"; }
"${PODMAN[@]}" logs "$NAME" 2>&1 | grep -c '"level":"INFO"' >/dev/null || fail "no JSON log lines"
echo "podman stop (SIGTERM): exit 0"

log "container-smoke: all passed"
