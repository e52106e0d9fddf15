"""Peak memory of streamed evaluation of every test user, read and ranked in chunks of users or all at once.

    .venv/bin/python benchmarks/scale_evaluation.py [--size 5000000] [--max-steps 200] [--chunks 8192 0]

The data are prepared as in benchmarks/scale.py (seeded synthetic interactions, the protocol split written as split
examples, vocabulary files). For each ``--chunks`` value a fresh child process trains the default preset on ids
and history for ``--max-steps`` batches (the model's quality does not change the memory of ranking), then
evaluates the test split (every user, full corpus) with ``evaluate_streaming(users_per_chunk=...)``; 0 means one
chunk holding every user, as evaluation was before chunking. A thread samples the child's resident memory
(VmRSS) every 0.2 s during evaluation; VmHWM (the kernel's high-water mark, reset at exec) is read at the end.

Writes benchmarks/results/scale_evaluation.md and scale_evaluation.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from scale import HISTORY_LENGTH, config, peak_mb, prepare, rss_mb  # noqa: E402


def child(args) -> Dict:
    from tfrec_recall.data.streaming import StreamingSplit
    from tfrec_recall.training.streaming import evaluate_streaming, train_streaming
    source = StreamingSplit.from_examples(args.examples, args.vocabularies, HISTORY_LENGTH)
    result = train_streaming(config(1024), source, evaluate_every=0, evaluate_test=False, verbose=0,
                             max_steps=args.max_steps)
    before, samples, done = rss_mb(), [], threading.Event()

    def sample():
        while not done.wait(0.2):
            samples.append(rss_mb())
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    chunk = args.users_per_chunk or 10 ** 9  # 0: one chunk of every user
    metrics = evaluate_streaming(result.model, source, "test", users_per_chunk=chunk)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"users_per_chunk": args.users_per_chunk, "rss_before_eval_mb": before,
            "max_rss_during_eval_mb": max(samples + [before]), "vm_hwm_mb": peak_mb(), "eval_seconds": seconds,
            "test_users": metrics["users"], "test_HR@50": metrics["HR@50"], "Coverage@50": metrics["Coverage@50"]}


def run_child(extra: List[str], timeout: float) -> Dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", *extra]
    done = subprocess.run(command, cwd=HERE.parent, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "command": " ".join(command[1:])}


def write_report(runs: List[Dict], prepared: Dict) -> None:
    lines = ["# Scale: streamed evaluation of every test user, in chunks or at once", "",
             "Command: `.venv/bin/python benchmarks/scale_evaluation.py " + " ".join(sys.argv[1:]) + "`", "",
             f"{prepared['interactions']:,} interactions, {prepared['users']:,} users, {prepared['items']:,} items; "
             "the model trained for a few batches only (the memory of ranking does not depend on its quality).", "",
             "| users per chunk | test users | RSS before evaluation (GB) | max RSS during evaluation, sampled every "
             "0.2 s (GB) | VmHWM at the end (GB) | evaluation (s) | test HR@50 | Coverage@50 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        chunk = f"{r['users_per_chunk']:,}" if r["users_per_chunk"] else "all (one chunk)"
        lines.append(f"| {chunk} | {r['test_users']:,} | {r['rss_before_eval_mb'] / 1024:.2f} | "
                     f"{r['max_rss_during_eval_mb'] / 1024:.2f} | {r['vm_hwm_mb'] / 1024:.2f} | "
                     f"{r['eval_seconds']:.0f} | {r['test_HR@50']:.4f} | {r['Coverage@50']:.4f} |")
    lines += ["", "The metrics of the chunked and the one-chunk runs must agree (the same model, seed and data; "
              "tests/test_streaming.py checks the equality on small data). Evaluation seconds are not comparable "
              "between rows: the children ran one after the other while other jobs shared the machine's 2 cores "
              f"(no GPU); load average {os.getloadavg()[0]:.1f} at the end. Child commands:", ""]
    lines += [f"- `{r['command']}`" for r in runs]
    (HERE / "results" / "scale_evaluation.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=5_000_000)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--chunks", type=int, nargs="+", default=[8192, 0])
    parser.add_argument("--timeout", type=float, default=7200)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--examples")
    parser.add_argument("--vocabularies")
    parser.add_argument("--users-per-chunk", type=int)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs = []
    with tempfile.TemporaryDirectory(prefix="scale-eval-") as scratch:
        prepared = prepare(args.size, Path(scratch))
        print(json.dumps({k: v for k, v in prepared.items() if k not in ("examples", "vocabularies")}), flush=True)
        for chunk in args.chunks:
            runs.append(run_child(["--examples", prepared["examples"], "--vocabularies", prepared["vocabularies"],
                                   "--max-steps", str(args.max_steps), "--users-per-chunk", str(chunk)],
                                  args.timeout))
            print(json.dumps(runs[-1]), flush=True)
    (HERE / "results" / "scale_evaluation.json").write_text(json.dumps({"runs": runs, "prepared": {
        k: v for k, v in prepared.items() if k not in ("examples", "vocabularies")}}, indent=1))
    write_report(runs, prepared)


if __name__ == "__main__":
    main()
