"""Multi-worker training benchmark: the step time of one worker against two, at the same global batch.

    .venv/bin/python benchmarks/multi_worker.py [--num-users 2000] [--batch-size 256] [--epochs 3]

Runs the entry point ``python -m tfrec_recall.training.multi_worker`` (YouTubeDNN preset, embedding / output /
hidden width 8, synthetic data) three ways, one after the other: one process without a strategy; one worker of a
``MultiWorkerMirroredStrategy`` (TF_CONFIG naming one worker); two workers (TF_CONFIG naming two workers on
127.0.0.1, ports picked by binding port 0, one process each). The global batch is the same in every run, so two
workers each compute half of every batch and exchange the in-batch candidates (all-gather) and the gradients
(all-reduce) at every step. The step time is the mean time between the end of the first and of the last step of
each epoch after the first (the first pays the tracing), averaged over those epochs. Writes
benchmarks/results/multi_worker.md (the per-run numbers also go to stdout as JSON lines).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from tfrec_recall.training.multi_worker import free_ports

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run_job(workers: int, args: argparse.Namespace, scratch: Path) -> Dict:
    """Runs the entry point with ``workers`` processes (0: one process without a strategy); returns the records
    of worker 0, the wall seconds and the load average before and after."""
    job = Path(tempfile.mkdtemp(dir=scratch, prefix=f"workers{workers}-"))
    common = [sys.executable, "-m", "tfrec_recall.training.multi_worker", "--out", str(job / "run"),
              "--resume-dir", str(job / "resume"), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
              "--num-users", str(args.num_users), "--num-items", str(args.num_items), "--dim", "8"]
    if workers == 0:
        commands = [common + ["--no-strategy"]]
    else:
        cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(workers)]}
        commands = [common + ["--tf-config", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})]
                    for i in range(workers)]
    load_before, start = os.getloadavg()[0], time.monotonic()
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for c in commands]
    try:
        outputs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * len(procs):
        raise RuntimeError(f"the {workers}-worker job failed: exit codes {codes}")
    records = [json.loads(line) for line in outputs[0].splitlines() if line.startswith("{")]
    return {"workers": workers, "records": records, "wall_seconds": time.monotonic() - start,
            "load_before": load_before, "load_after": os.getloadavg()[0], "command": commands[0]}


def summarise(job: Dict, batch_size: int) -> Dict:
    """Steps per epoch, the mean step time of the epochs after the first, the first epoch's first step."""
    epochs = [r for r in job["records"] if r["event"] == "epoch"]
    later = [r["step_seconds"] for r in epochs[1:] if r["step_seconds"] is not None]
    step = sum(later) / len(later)
    done = job["records"][-1]
    return {"workers": job["workers"], "steps_per_epoch": epochs[0]["steps"], "epochs": len(epochs),
            "step_ms": 1000 * step, "rows_per_second": batch_size / step,
            "first_step_seconds": epochs[0]["first_step_seconds"], "wall_seconds": job["wall_seconds"],
            "loss": [r["loss"] for r in epochs], "valid_hr50": done["valid"].get("HR@50"),
            "load_before": job["load_before"], "load_after": job["load_after"]}


LABELS = {0: "1 process, no strategy", 1: "1 worker (MultiWorkerMirroredStrategy)",
          2: "2 workers (MultiWorkerMirroredStrategy)"}


def write_markdown(rows: List[Dict], args: argparse.Namespace, path: Path) -> None:
    by = {r["workers"]: r for r in rows}
    ratio = by[2]["step_ms"] / by[1]["step_ms"]
    lines = ["# Multi-worker training: 1 worker vs 2 workers", "",
             f"YouTubeDNN (embedding / output / hidden width 8) on the synthetic data ({args.num_users} users, "
             f"{args.num_items} items), global batch {args.batch_size}, {args.epochs} epochs; one run each, one "
             "after the other, on this 2-core CPU machine shared with other jobs (load average given per run). "
             "Step time: mean time per step after an epoch's first step, over the epochs after the first.", "",
             f"Command: `.venv/bin/python benchmarks/multi_worker.py --num-users {args.num_users} "
             f"--num-items {args.num_items} --batch-size {args.batch_size} --epochs {args.epochs}`", "",
             "| run | steps / epoch | step ms | rows / s | first step s (tracing) | job wall s "
             "| load avg before / after | loss per epoch | valid HR@50 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {LABELS[r['workers']]} | {r['steps_per_epoch']} | {r['step_ms']:.1f} | "
                     f"{r['rows_per_second']:.0f} | {r['first_step_seconds']:.0f} | {r['wall_seconds']:.0f} | "
                     f"{r['load_before']:.1f} / {r['load_after']:.1f} | "
                     f"{' / '.join(f'{x:.2f}' for x in r['loss'])} | {r['valid_hr50']:.4f} |")
    lines += ["", f"**2 workers / 1 worker step time: {ratio:.2f}x** "
              f"({'slower' if ratio > 1 else 'faster'}; 1 worker / no strategy: "
              f"{by[1]['step_ms'] / by[0]['step_ms']:.2f}x).", "",
              "Two workers on this machine are not faster and are not expected to be: both processes share the "
              "same 2 cores (which other jobs also use), so halving each worker's share of the batch buys no "
              "compute, while every step adds an all-gather of the in-batch candidates, an all-reduce of the "
              "gradients and the metric reads over gRPC on loopback between two processes competing for those "
              "cores. The step is small (width 8), so the exchanges dominate. The gain needs workers on separate "
              "machines (or cores) with steps large enough that compute outweighs the per-step communication; "
              "this run measures the mechanism's overhead, not that regime.", "",
              "The 1- and 2-worker runs train the same model on the same global batches (2 workers: 128 rows "
              "each, in-batch negatives gathered across them): their losses agree to float rounding. "
              "No-strategy row: one process with no distribution at all (it also trains the last, incomplete "
              "batch of an epoch; the others drop it, hence one step less and slightly different losses).", ""]
    path.write_text("\n".join(lines))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-users", type=int, default=2000)
    parser.add_argument("--num-items", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    args = parser.parse_args(argv)
    out = HERE / "results"
    with tempfile.TemporaryDirectory() as scratch:
        rows = []
        for workers in (0, 1, 2):
            rows.append(summarise(run_job(workers, args, Path(scratch)), args.batch_size))
            print(json.dumps(rows[-1]), flush=True)
    write_markdown(rows, args, out / "multi_worker.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
