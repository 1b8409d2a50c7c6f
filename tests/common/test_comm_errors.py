"""Classifying a survivor's communication failure (common/comm_errors.py) over real message texts."""

from __future__ import annotations

import pytest

from common.comm_errors import NCCL_ERROR, OTHER, PEER_DIED, TIMEOUT, classify, most_telling

# gloo on torch 2.13, measured: the survivor of a kill -9 in an all_reduce, an irecv and an isend
GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[127.0.0.1]:39660. This is typically caused by a remote worker crashing. Check the logs of the "
               "remote worker before reporting an error. GLHF! \U0001f3d6\ufe0f")
GLOO_RESET = "[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Read error [10.0.0.3]:27418: Connection reset by peer"
GLOO_TIMEOUT = ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for "
                "recv operation to complete")
# what a pipeline neighbour of the failed rank reads from the abort key (trainer/abort.py)
ABORTED_BY_PEER = ("pipeline receive: abort key set: rank 0: pipeline receive failed: "
                   "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                   "[127.0.0.1]:39660. This is typically caused by a remote worker crashing.")
OWN_TIMEOUT = "gradient all-reduce did not complete within 60.0 s"
# ProcessGroupNCCL (torch 2.x) and NCCL's own error strings
NCCL_WATCHDOG = ("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=2079, OpType=ALLREDUCE, "
                 "NumelIn=25690112, NumelOut=25690112, Timeout(ms)=600000) ran for 600047 milliseconds before "
                 "timing out.")
NCCL_STUCK = ("ProcessGroupNCCL's watchdog got stuck for 480 seconds without making progress in monitoring "
              "enqueued collectives.")
NCCL_REMOTE = ("NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:275, remote process exited or there "
               "was a network error, NCCL version 2.18.1\nncclRemoteError: A call failed possibly due to a network "
               "error or a remote process exiting prematurely.\nLast error:\nNET/IB : Got completion from peer "
               "10.0.0.2<56789> with error 12, opcode 0, len 0, vendor err 129 (Recv)")
NCCL_SYSTEM = ("NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1275, unhandled system error "
               "(run with NCCL_DEBUG=INFO for details), NCCL version 2.14.3\nncclSystemError: System call (e.g. "
               "socket, malloc) or external library call failed or device error.")
NCCL_INTERNAL = ("NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1269, internal error - please "
                 "report this issue to the NCCL developers, NCCL version 2.19.3\nncclInternalError: Internal check "
                 "failed.")
NCCL_CUDA = ("NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1191, unhandled cuda error (run "
             "with NCCL_DEBUG=INFO for details), NCCL version 2.18.5\nncclUnhandledCudaError: Call to CUDA function "
             "failed.")


@pytest.mark.parametrize("text,expected", [
    (GLOO_CLOSED, PEER_DIED), (GLOO_RESET, PEER_DIED), (ABORTED_BY_PEER, PEER_DIED), (NCCL_REMOTE, PEER_DIED),
    (GLOO_TIMEOUT, TIMEOUT), (OWN_TIMEOUT, TIMEOUT), (NCCL_WATCHDOG, TIMEOUT), (NCCL_STUCK, TIMEOUT),
    (NCCL_SYSTEM, NCCL_ERROR), (NCCL_INTERNAL, NCCL_ERROR), (NCCL_CUDA, NCCL_ERROR),
    ("RuntimeError: expected scalar type Float but found Half", OTHER),
])
def test_real_messages_are_classified(text, expected):
    name, evidence = classify(text)
    assert name == expected
    assert evidence and len(evidence) <= 160 and "\n" not in evidence


def test_evidence_holds_the_matching_words():
    assert "Connection closed by peer" in classify(GLOO_CLOSED)[1]
    assert "Watchdog caught collective operation timeout" in classify(NCCL_WATCHDOG)[1]


def test_the_most_telling_class_of_several_ranks_wins():
    assert most_telling([TIMEOUT, PEER_DIED, OTHER]) == PEER_DIED
    assert most_telling([OTHER, NCCL_ERROR]) == NCCL_ERROR
    assert most_telling(["", "plan"]) == "" and most_telling([]) == ""
