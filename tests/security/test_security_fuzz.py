"""Property-based fuzzing of every RPC through real gRPC (TLS, tokens), plus malformed bytes on the wire.

One in-process real controller (controller/server.py, module scope) takes thousands of random and
adversarial messages from callers of every role and none. Properties:

* the service never crashes or hangs: every call ends within its deadline with
  OK or a clear, expected error code (never UNKNOWN/INTERNAL from a handler);
* etcd holds nothing from refused calls: the only jobs, cancels and cordons
  in etcd are those of calls that returned OK;
* the audit log holds exactly one record per mutating call, with its result code.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller import auth
from common.embedded_etcd import start_etcd
from controller.limits import Limits
from controller.security import SecuritySettings
from controller.tls import ensure_dev_pki
from protos import tenax_pb2 as pb
from protos.records import NodeRecord
from tests.helpers.security_helpers import start_real_controller, tiny_spec

pytestmark = pytest.mark.timeout(180)

CALL_TIMEOUT_S = 5.0
FUZZ_MAX_REQUEST_BYTES = 64 << 10
SERVICES = ("JobService", "NodeService", "AuditService", "ChaosService")
METHODS = {f"/{pb.DESCRIPTOR.services_by_name[s].full_name}/{m.name}": m
           for s in SERVICES for m in pb.DESCRIPTOR.services_by_name[s].methods}
MUTATING = {m for m in METHODS if auth.rule_for(m).mutating}
HEALTH = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
STREAMING = {m for m, d in METHODS.items() if d.server_streaming} | {HEALTH[1]}
CALLERS = ("anonymous", "forged", "vera", "sam", "olga", "ada")  # none, bad token, viewer, 2 submitters, admin
ROLES = {"vera": "viewer", "sam": "submitter", "olga": "submitter", "ada": "admin"}
# Errors a well-behaved handler may answer with; UNKNOWN / INTERNAL / UNAVAILABLE mean a bug or a crash.
CLEAR_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OUT_OF_RANGE}
NODE = "fuzz-node-1"

HOSTILE = ["", " ", "$(rm -rf /)", "`reboot`", "; id", "../../etc/passwd", "/tenax/jobs/x/spec", "\x00",
           "a\nb", "\u202e\u0041", "%s%n", "{{7*7}}", "' OR 1=1 --", "\\", "名前", "x" * 5000, "-" * 70,
           NODE, "tiny", "job-000000"]
NAMES = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


# ------------------------------------------------------------------ message strategies
def _scalar(field_desc: FieldDescriptor):
    t = field_desc.type
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(HOSTILE), st.text(max_size=40), NAMES)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(st.sampled_from([0.0, -1.0, 1e308, -1e308, math.inf, -math.inf, math.nan, 5e-324]),
                         st.floats(allow_nan=True, allow_infinity=True, width=32 if t == FieldDescriptor.TYPE_FLOAT
                                   else 64))
    if t == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field_desc.enum_type.values]),
                         st.integers(-2**31, 2**31 - 1))
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.one_of(st.sampled_from([0, -1, 1, 2, 4, 2**63 - 1, -2**63]), st.integers(-2**63, 2**63 - 1))
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    return st.one_of(st.sampled_from([0, -1, 1, 2, 4, 2**31 - 1, -2**31]), st.integers(-2**31, 2**31 - 1))


def message_strategy(descriptor, depth: int = 0):
    """Any message of ``descriptor``: each field present or not, hostile values, bounded nesting."""
    cls = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw):
        msg = cls()
        for f in descriptor.fields:
            if not draw(st.booleans()):
                continue
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                for k, v in draw(st.dictionaries(_scalar(key_f), _scalar(value_f), max_size=3)).items():
                    getattr(msg, f.name)[k] = v
            elif f.message_type is not None:
                if depth >= 3:
                    continue
                sub = message_strategy(f.message_type, depth + 1)
                if _repeated(f):
                    getattr(msg, f.name).extend(draw(st.lists(sub, max_size=2)))
                else:
                    getattr(msg, f.name).CopyFrom(draw(sub))
            elif _repeated(f):
                getattr(msg, f.name).extend(draw(st.lists(_scalar(f), max_size=3)))
            else:
                setattr(msg, f.name, draw(_scalar(f)))
        return msg

    return build()


def _repeated(f: FieldDescriptor) -> bool:
    flag = getattr(f, "is_repeated", None)
    return bool(flag) if flag is not None else f.label == FieldDescriptor.LABEL_REPEATED


@st.composite
def mostly_valid_specs(draw):
    """Valid specs with one field made hostile at random: reaches deep validation, and sometimes succeeds."""
    spec = tiny_spec(draw(NAMES))
    choice = draw(st.integers(0, 5))
    if choice == 1:
        spec.name = draw(st.sampled_from(HOSTILE))
    elif choice == 2:
        spec.resources.workers = draw(st.integers(-2**31, 2**31 - 1))
    elif choice == 3:
        spec.optimizer.lr = draw(st.sampled_from([math.nan, -1.0, math.inf, 0.0]))
    elif choice == 4:
        spec.data.path = draw(st.sampled_from(HOSTILE))
        spec.data.kind = draw(st.sampled_from(["tokens", "synthetic", "$(id)"]))
    return spec


# ------------------------------------------------------------------ the server under test
@dataclass
class Ledger:
    """What the fuzzer did, to check etcd and the audit log against at the end."""

    calls: Counter = field(default_factory=Counter)
    """(method, code) -> calls that reached the service."""
    audited: Counter = field(default_factory=Counter)
    """(method, code) -> mutating calls among them: each must have one audit record."""
    created_jobs: set = field(default_factory=set)
    cordoned: bool = False
    chaos_injected: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture(scope="module")
def fuzz_api(tmp_path_factory):
    state = tmp_path_factory.mktemp("fuzz")
    etcd = start_etcd(state / "etcd-data", log_path=state / "etcd.log")
    pki = ensure_dev_pki(state)
    # Limits high enough that the fuzzer's own volume is not what gets refused.
    limits = Limits(calls_per_s=1e6, burst=10**6, max_active_jobs_per_user=10**6,
                    max_request_bytes=FUZZ_MAX_REQUEST_BYTES)
    api = None
    try:
        api = start_real_controller(etcd.url, state, SecuritySettings(tls=pki.server_tls(), limits=limits))
        for name, role in ROLES.items():
            api.make_token(name, role)
        api.tokens["forged"] = api.tokens["ada"][:-4] + "AAAA"
        api.run(api.etcd.put(api.keys.node(NODE), NodeRecord(id=NODE, hostname="h", slots=1).to_json()))
        channels = {name: api.channel(token=api.tokens.get(name)) for name in CALLERS}
        try:
            yield api, channels, Ledger()
        finally:
            for channel in channels.values():
                channel.close()
    finally:
        if api is not None:
            api.stop()
        etcd.kill()


def _invoke(channel: grpc.Channel, method: str, request_bytes: bytes) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Call ``method`` with raw request bytes; (code, details, raw replies). Streams are drained."""
    identity = lambda b: b  # noqa: E731 - send and receive raw bytes
    replies: list[bytes] = []
    try:
        if method in STREAMING:
            # A watch of a live job never ends by itself: take the first event, then hang up.
            call = channel.unary_stream(method, request_serializer=identity, response_deserializer=identity)
            stream = call(request_bytes, timeout=CALL_TIMEOUT_S)
            for reply in stream:
                replies.append(reply)
                stream.cancel()
                break
        else:
            call = channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)
            replies.append(call(request_bytes, timeout=CALL_TIMEOUT_S))
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED and replies:
            return grpc.StatusCode.OK, "", replies  # we hung up after the first event
        return exc.code(), exc.details() or "", replies
    return grpc.StatusCode.OK, "", replies


def _record(ledger: "Ledger", method: str, code: grpc.StatusCode, replies: list[bytes]) -> None:
    """Remember what a call did (it reached the service: it must be audited if it mutates)."""
    short = method.rsplit("/", 1)[-1]
    with ledger.lock:
        ledger.calls[(short, code.name)] += 1
        if method in MUTATING:
            ledger.audited[(short, code.name)] += 1
        if code != grpc.StatusCode.OK:
            return
        if short == "SubmitJob":
            ledger.created_jobs.add(pb.Job.FromString(replies[0]).id)
        elif short in ("CordonNode", "DrainNode"):
            ledger.cordoned = True
        elif short == "Inject":
            ledger.chaos_injected = True


def _fuzz_call(fuzz, caller: str, method: str, request_bytes: bytes) -> grpc.StatusCode:
    """One fuzzed call; asserts the properties of a single reply."""
    api, channels, ledger = fuzz
    code, details, replies = _invoke(channels[caller], method, request_bytes)
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{method} hung"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and len(request_bytes) > FUZZ_MAX_REQUEST_BYTES:
        return code  # refused by gRPC itself before any interceptor or handler ran: not a call, not audited
    assert code == grpc.StatusCode.OK or code in CLEAR_ERRORS, f"{method} by {caller}: {code} {details}"
    assert code == grpc.StatusCode.OK or details.strip(), f"{method}: {code} without a message"
    _record(ledger, method, code, replies)
    return code


# ------------------------------------------------------------------ properties
FUZZ = settings(deadline=None, database=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@settings(FUZZ, max_examples=400)
@given(caller=st.sampled_from(CALLERS),
       spec=st.one_of(mostly_valid_specs(), message_strategy(pb.JobSpec.DESCRIPTOR)))
def test_fuzz_submit_job(fuzz_api, caller, spec):
    _fuzz_call(fuzz_api, caller, "/tenax.v1.JobService/SubmitJob",
               pb.SubmitJobRequest(spec=spec).SerializeToString())


_OTHER_METHODS = sorted(m for m in METHODS if not m.endswith("/SubmitJob"))


@st.composite
def other_calls(draw):
    method = draw(st.sampled_from(_OTHER_METHODS))
    request = draw(message_strategy(METHODS[method].input_type))
    # Aim at things that exist half of the time, so the success paths get fuzzed too.
    if hasattr(request, "node_id") and draw(st.booleans()):
        request.node_id = NODE
    return method, request


@settings(FUZZ, max_examples=600)
@given(caller=st.sampled_from(CALLERS), call=other_calls(), pick_job=st.integers(0, 10**6))
def test_fuzz_every_other_rpc(fuzz_api, caller, call, pick_job):
    api, channels, ledger = fuzz_api
    method, request = call
    with ledger.lock:
        jobs = sorted(ledger.created_jobs)
    if hasattr(request, "job_id") and jobs and pick_job % 2:
        request.job_id = jobs[pick_job % len(jobs)]
    _fuzz_call(fuzz_api, caller, method, request.SerializeToString())


@settings(FUZZ, max_examples=400)
@given(caller=st.sampled_from(CALLERS), method=st.sampled_from(sorted(METHODS) + list(HEALTH)), payload=st.one_of(
    st.binary(max_size=512),
    st.sampled_from([b"", b"\xff" * 16, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x80\x80\x80\x80\x10",
                     b"\x0a\x05ab", b"\x08" + b"\xff" * 10, b"\x0a" + b"\x80" * 9 + b"\x01",
                     b"\x00" * (FUZZ_MAX_REQUEST_BYTES + 1)])))
def test_fuzz_malformed_bytes_on_the_wire(fuzz_api, caller, method, payload):
    _fuzz_call(fuzz_api, caller, method, payload)


_HEADER_VALUES = st.one_of(
    st.from_regex(r"[ -~]{0,200}", fullmatch=True),  # printable ASCII: what gRPC lets a client send
    st.sampled_from(["Bearer", "Bearer ", "Bearer tnx..", "bearer tnx.0000000000000000." + "A" * 43,
                     "Basic YWRtaW46YWRtaW4=", "Bearer " + "x" * 8000]),
)


@settings(FUZZ, max_examples=150)
@given(headers=st.lists(_HEADER_VALUES, min_size=1, max_size=3),
       method=st.sampled_from(["/tenax.v1.JobService/CancelJob", "/tenax.v1.JobService/ListJobs",
                               "/tenax.v1.NodeService/DrainNode"]))
def test_fuzz_authorization_headers(fuzz_api, headers, method):
    """Garbage credentials are refused as UNAUTHENTICATED (or too big), never crash, and are audited if mutating."""
    api, channels, ledger = fuzz_api
    call = channels["anonymous"].unary_unary(method, request_serializer=lambda b: b,
                                             response_deserializer=lambda b: b)
    try:
        call(b"", timeout=CALL_TIMEOUT_S, metadata=[("authorization", h) for h in headers])
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and sum(map(len, headers)) > 8000:
        return  # headers over gRPC's metadata limit: refused by gRPC before our code
    assert code == grpc.StatusCode.UNAUTHENTICATED, (headers, code)
    _record(ledger, method, code, [])


def test_unknown_methods_are_unimplemented(fuzz_api):
    api, channels, ledger = fuzz_api
    for method in ("/tenax.v1.JobService/Nope", "/tenax.v1.Nope/SubmitJob", "/x/../y"):
        code, _, _ = _invoke(channels["ada"], method, b"")
        assert code == grpc.StatusCode.UNIMPLEMENTED


def test_zz_after_fuzzing_etcd_and_the_audit_log_are_consistent(fuzz_api):
    """Runs last in this module (tests run in file order): checks the state the fuzzers left."""
    api, channels, ledger = fuzz_api
    if sum(ledger.calls.values()) < 1000:  # selected on its own (-k): drive the fuzzers first
        for fuzzer in (test_fuzz_submit_job, test_fuzz_every_other_rpc, test_fuzz_malformed_bytes_on_the_wire):
            fuzzer(fuzz_api)
    total = sum(ledger.calls.values())
    assert total >= 1000, f"only {total} calls fuzzed"
    assert ledger.calls[("SubmitJob", "OK")] > 0 and ledger.calls[("CancelJob", "OK")] > 0
    k = api.keys
    job_keys = api.etcd_keys(k.jobs())
    jobs_in_etcd = {k.parse_job_key(key)[0] for key in job_keys}
    assert jobs_in_etcd == ledger.created_jobs  # refused submits wrote nothing
    assert {key[len(k.owners()):] for key in api.etcd_keys(k.owners())} == jobs_in_etcd
    if not ledger.cordoned:
        assert api.etcd_keys(k.cordons()) == []
    chaos = k.prefix + "/chaos/"
    if not ledger.chaos_injected:
        assert api.etcd_keys(chaos) == []
    expected_prefixes = (k.jobs(), k.owners(), k.audit(), k.audit_refused(), k.tokens(), k.cordons(), k.nodes(),
                         k.registry(), k.leader(), chaos, k.prefix + "/auth/quota/", k.submit_requests())
    assert [key for key in api.etcd_keys() if not key.startswith(expected_prefixes)] == []
    audit = api.audit()
    counted: Counter = Counter()
    for r in audit:  # refused calls without valid credentials are one record per source and window
        counted[(r.method.rsplit("/", 1)[-1], r.code)] += r.count
    assert counted == ledger.audited
    code, _, _ = _invoke(channels["vera"], "/tenax.v1.JobService/ListJobs", b"")
    assert code == grpc.StatusCode.OK  # still serving
