"""`tenax export`: a job's weights as a Hugging Face checkpoint.

    tenax export JOB --out DIR                      a job of the local cluster (`tenax up`)
    tenax export JOB_OR_RUN_DIR... --out DIR        job directories (one per node), run or checkpoints dirs

Writes ``config.json`` + ``model.safetensors`` that ``transformers`` loads as
``LlamaForCausalLM``, from the newest step on disk whose ranks together hold
every parameter (``--step`` picks another). Needs disk checkpoints
(``elastic.checkpoint_every`` > 0); a running job can be exported at any time
(its latest recoverable step on disk). The job spec comes from the launch file
next to the checkpoints, or ``--spec``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def local_job_dirs(job: str, state_dir: str | None) -> list[Path]:
    """Every local agent's directory of ``job`` (launch files; checkpoints of agents without a
    shared checkpoint directory), then the cluster's shared checkpoint directory of ``job``."""
    from cli.local import checkpoint_dir, default_state_dir, local_cluster_state

    state = local_cluster_state(state_dir)
    if state is None:
        return []
    base = Path(state.get("state_dir") or state_dir or default_state_dir())
    shared = checkpoint_dir(base) / job
    return sorted(d for d in (base / "agents").glob(f"*/jobs/{job}") if d.is_dir()) + \
        ([shared] if shared.is_dir() else [])


def cmd_export(args: argparse.Namespace) -> int:
    from common.spec import JobSpec, SpecError
    from trainer import export, hf

    try:
        given = [Path(s) for s in args.source if Path(s).exists()]
        jobs = {s: local_job_dirs(s, args.state_dir) for s in args.source if not Path(s).exists()}
        for job, found in jobs.items():
            if not found:
                raise export.ExportError(f"{job}: neither a directory nor a job of the local cluster")
        sources = given + [d for found in jobs.values() for d in found]
        if args.spec:
            import yaml

            spec = JobSpec.from_dict(yaml.safe_load(Path(args.spec).read_text()))
        else:
            spec = export.find_spec(sources)
        if spec.model.arch != "llama":
            raise export.ExportError(f"--format hf exports arch 'llama' only, the job's model.arch is "
                                     f"{spec.model.arch!r}")
        # a directory given must have checkpoints; a job of the local cluster has them in some of
        # its directories (the shared checkpoint directory, or the nodes' own)
        roots = export.checkpoint_roots(given)
        for job, found in jobs.items():
            mine = [r for r in map(export.checkpoint_root, found) if r is not None]
            if not mine:
                raise export.no_checkpoints(job)
            roots.extend(mine)
        step = args.step if args.step is not None else export.latest_complete_step(spec.model, roots)
        tensors = export.load_full_params(spec.model, roots, step)
        out = hf.export_hf(tensors, spec.model, args.out, dtype=args.dtype)
    except (export.ExportError, SpecError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {', '.join(map(str, sources))} to {out} (Hugging Face LlamaForCausalLM)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a job's weights as a Hugging Face checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="+", help="job id of the local cluster, or job/run/checkpoints directories")
    p.add_argument("--format", choices=("hf",), default="hf", help="output format (Hugging Face safetensors)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="tensor type written (default float32: the master weights as trained)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete one)")
    p.add_argument("--spec", default="", help="job file (default: the launch file next to the checkpoints)")
    p.add_argument("--state-dir", default=None, help="local cluster state directory (for a job id)")
    p.set_defaults(func=cmd_export)
