"""How long survivors stall at a growth switch (issue 4, two-phase growth).

    .venv/bin/python bench/growth_wait.py              # 1 trial (~1 min on 2 cores)
    .venv/bin/python bench/growth_wait.py --trials 3

A real local cluster (`tenax up`: embedded etcd, a controller, one agent with 2
slots) runs a dp1·pp2 job (examples/tiny-gpt.yaml, 400 steps, max_workers 4). At step 3 a
second agent joins; the controller grows the job to dp2·pp2. The script reads
the recovery records the workers wrote for the growth generation and prints,
per trial:

    survivor_wait   the slowest survivor's ``total_s``: from reaching the switch
                    step to being ready for the next step (rendezvous with the
                    joiners + state transfer); the time training stood still
    rebuild         its rendezvous + model-build part
    transfer        its inventory + resharding part
    prepare         controller: growth intent -> every joiner ready (0 when the
                    controller switched without waiting for the joiners)
    plan_to_switch  controller: plan written -> first step at the new generation
    first_step      the slowest survivor's first step after the switch (it runs with the
                    joiners, whose first step in a fresh process may be slow)
    step            the median step time of the survivors before the growth

Medians over trials are printed last.

Workers run with OMP_NUM_THREADS=1 (inherited through `tenax up` and the agents, as
in tests/helpers/elastic_harness.py): with torch's default of one thread per core in every
process, 4-6 processes on a 2-core host make a step take seconds, and the switch,
1.5 s of steps ahead at least 3 steps, then lies so far ahead that any joiner is
up before it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.e2e.test_e2e_cluster import job_file, local_cluster, submit, tenax, wait_until  # noqa: E402
from tests.e2e.test_e2e_elastic import extra_agent  # noqa: E402


def _job(info: dict, job_id: str) -> dict:
    out = tenax("job", job_id, "--json", "--controller", info["controller"], home=info["home"], timeout_s=30)
    return json.loads(out.stdout)


def _lines(state_dir: Path, job_id: str) -> dict[Path, list[dict]]:
    out = {}
    for path in state_dir.glob(f"agents/*/jobs/{job_id}/*.metrics.jsonl"):
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        out[path] = rows
    return out


def _records(state_dir: Path, job_id: str, generation: int) -> list[dict]:
    """Every worker's recovery record for ``generation`` (survivors and joiners)."""
    return [rec for rows in _lines(state_dir, job_id).values() for rec in rows
            if rec.get("event") == "recovery" and int(rec.get("new_generation", -1)) == generation]


def _survivor_steps(state_dir: Path, job_id: str, generation: int, switch: int) -> tuple[float, float]:
    """(slowest survivor's first step after the switch, median step time of generation 1)."""
    first, before = [], []
    for rows in _lines(state_dir, job_id).values():
        steps = [r for r in rows if "step" in r and "step_time" in r and "event" not in r]
        if not any(r.get("generation") == 1 for r in steps):
            continue  # a joiner
        before += [r["step_time"] for r in steps if r.get("generation") == 1 and r["step"] > 3]
        first += [r["step_time"] for r in steps if r.get("generation") == generation and r["step"] == switch + 1]
    return (max(first) if first else 0.0), (statistics.median(before) if before else 0.0)


def trial(tmp: Path) -> dict[str, float]:
    with local_cluster(tmp, agents=1) as info:
        path = job_file(tmp, steps=400, parallelism={"dp": 1, "pp": 2, "zero_stage": 1},
                        resources={"workers": 2, "device": "cpu"},
                        elastic={"min_workers": 1, "max_workers": 4, "snapshot_every": "1"})
        job_id = submit(info, path)
        wait_until(lambda: _job(info, job_id)["step"] >= 3, 120, "step 3", interval_s=0.3)
        with extra_agent(info, "node-1"):
            def grown():
                doc = _job(info, job_id)
                assert doc["phase"] not in ("FAILED", "CANCELLED"), doc["message"]
                done = [r for r in doc.get("recoveries", []) if r.get("cause") == "grow" and r.get("total_s", 0) > 0]
                return done[0] if done else None

            rec = wait_until(grown, 180, "the growth to complete", interval_s=0.5)
            generation = int(rec["generation"])
            records = wait_until(lambda: (lambda rs: rs if len(rs) == 4 else None)(
                _records(Path(info["state_dir"]), job_id, generation)), 30, "4 recovery records", interval_s=0.3)
            survivors = [r for r in records if r["cause"] != "join"]
            switch = max(int(r["resumed_step"]) for r in survivors)
            wait_until(lambda: _survivor_steps(Path(info["state_dir"]), job_id, generation, switch)[0] > 0, 60,
                       "the first step after the switch", interval_s=0.3)
            first_step, step = _survivor_steps(Path(info["state_dir"]), job_id, generation, switch)
    slowest = max(survivors, key=lambda r: r["total_s"])
    return {"survivor_wait": slowest["total_s"], "rebuild": slowest["rebuild_s"],
            "transfer": slowest["transfer_s"], "prepare": float(rec.get("prepare_s", 0.0) or 0.0),
            "plan_to_switch": float(rec["total_s"]), "first_step": first_step, "step": step}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for i in range(args.trials):
        with tempfile.TemporaryDirectory(prefix="tenax-growth-") as tmp:
            started = time.monotonic()
            row = trial(Path(tmp))
            rows.append(row)
            print(json.dumps({"trial": i + 1, **{k: round(v, 3) for k, v in row.items()},
                              "wall_s": round(time.monotonic() - started, 1)}), flush=True)
    print(json.dumps({"median": {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
