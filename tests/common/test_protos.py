"""The generated code is committed; regenerating it must change nothing."""

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = ["tenax_pb2.py", "tenax_pb2.pyi", "tenax_pb2_grpc.py"]


def test_regenerating_protos_changes_nothing(tmp_path):
    (tmp_path / "protos").mkdir()
    shutil.copy(REPO / "protos" / "tenax.proto", tmp_path / "protos" / "tenax.proto")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", "protos/tenax.proto"],
        cwd=tmp_path, check=True, timeout=60,
    )
    stale = [name for name in GENERATED
             if not filecmp.cmp(tmp_path / "protos" / name, REPO / "protos" / name, shallow=False)]
    assert not stale, f"generated code is stale, run `make protos`: {stale}"


def test_generated_module_has_services():
    from protos import tenax_pb2, tenax_pb2_grpc

    assert "SubmitJob" in tenax_pb2.DESCRIPTOR.services_by_name["JobService"].methods_by_name
    assert "DrainNode" in tenax_pb2.DESCRIPTOR.services_by_name["NodeService"].methods_by_name
    assert hasattr(tenax_pb2_grpc, "JobServiceServicer")
