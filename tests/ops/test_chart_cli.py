"""The chart and the CLI cannot drift: every container command the chart renders
must parse with the real `tenax` argument parser, for every value set."""

import re

import pytest

from cli.main import build_parser
from tests.ops.test_chart import VALUE_SETS, container, find, rendered

_ENV_REF = re.compile(r"\$\(([A-Z_]+)\)")


def _parse(args: list[str]):
    # Kubernetes expands $(VAR) from the pod env; any plausible value will do here.
    concrete = [_ENV_REF.sub("10.0.0.7" if "IP" in a else "pod-0", a) for a in args]
    try:
        return build_parser().parse_args(concrete)
    except SystemExit as exc:  # argparse reports the offending flag on stderr
        pytest.fail(f"`tenax {' '.join(concrete)}` does not parse (exit {exc.code})")


def _workload_args(docs, kind, component, name):
    workloads = find(docs, kind, component)
    return [container(w, name).get("args", []) for w in workloads]


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_controller_args_parse_and_choose_transport_security(value_set):
    docs = rendered(value_set)
    all_args = _workload_args(docs, "Deployment", "controller", "controller")
    assert all_args, "no controller Deployment rendered"
    for args in all_args:
        parsed = _parse(args)
        assert parsed.command == "controller"
        # The controller refuses to start without an explicit transport choice.
        assert parsed.tls in ("tls", "mtls", "plaintext"), parsed.tls
        if parsed.tls in ("tls", "mtls"):
            assert parsed.tls_cert and parsed.tls_key


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_agent_args_parse(value_set):
    docs = rendered(value_set)
    for args in _workload_args(docs, "DaemonSet", "agent", "agent"):
        parsed = _parse(args)
        assert parsed.command == "agent"
        assert parsed.node_id == "pod-0"  # from $(NODE_NAME) via the downward API


def test_default_install_generates_the_api_certificate_it_mounts():
    docs = rendered("defaults")
    secrets = {d["metadata"]["name"]: d for d in find(docs, "Secret")}
    deployment = find(docs, "Deployment", "controller")[0]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    secret_name = volumes["api-tls"]["secret"]["secretName"]
    assert secret_name in secrets, f"controller mounts {secret_name}, which the chart does not create"
    assert {"ca.crt", "tls.crt", "tls.key"} <= set(secrets[secret_name]["data"])
