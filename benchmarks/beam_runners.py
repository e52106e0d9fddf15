"""Wall time of the vocabulary job (tfrec_recall.data.beam_jobs.run_vocabularies) on each Beam runner.

    .venv/bin/python benchmarks/beam_runners.py [--examples 200000] [--shards 4] [--work-dir DIR]

Writes seeded synthetic protocol-split training examples (users of 12 interactions, Zipf-distributed items, the
split of tfrec_recall.data.protocol.assign_user) as gzipped TFRecord shards, then runs the job on the in-memory
DirectRunner, the multi-process DirectRunner (2 workers) and the DaskRunner on a LocalCluster of 2 single-threaded
worker processes (a first run on fresh workers, then a second), checks that every run wrote the same files as a
collections.Counter reference, and writes benchmarks/results/beam_runners.md.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
warnings.filterwarnings("ignore", category=FutureWarning)

import tfrec_recall  # noqa: E402,F401  (selects tf-keras first)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfrec_recall.beam_runners import pipeline_options  # noqa: E402
from tfrec_recall.data import beam_jobs  # noqa: E402
from tfrec_recall.data.protocol import TRAIN, assign_user, to_example  # noqa: E402

PER_USER = 12


def write_examples(directory: str, num_examples: int, shards: int, seed: int = 0) -> collections.Counter:
    """Writes about ``num_examples`` training examples in ``shards`` gzipped files; returns the item counts."""
    rng = np.random.default_rng(seed)
    num_users = num_examples // (PER_USER - 2) + 1  # the last two interactions of a user are held out
    num_items = max(10, num_examples // 10)
    writers = [tf.io.TFRecordWriter(os.path.join(directory, f"data_tfrecord-{s:05d}-of-{shards:05d}.gz"),
                                    options="GZIP") for s in range(shards)]
    counts: collections.Counter = collections.Counter()
    for u in range(num_users):
        items = np.minimum(rng.zipf(1.3, PER_USER), num_items) - 1
        events = [{"user_id": f"u{u}", "item_id": f"i{i}", "timestamp": t} for t, i in enumerate(items.tolist())]
        for split, record in assign_user(events, history_length=10):
            if split == TRAIN:
                writers[u % shards].write(to_example(record).SerializeToString())
                counts[record["item_id"]] += 1
    for writer in writers:
        writer.close()
    return counts


def timed_run(pattern: str, out: str, options) -> tuple:
    start = time.perf_counter()
    paths = beam_jobs.run_vocabularies(pattern, out, options)
    return time.perf_counter() - start, {f: tf.io.gfile.GFile(p, "rb").read() for f, p in paths.items()}


def run_all(work: str, num_examples: int, shards: int) -> dict:
    os.makedirs(os.path.join(work, "examples"), exist_ok=True)
    counts = write_examples(os.path.join(work, "examples"), num_examples, shards)
    pattern = os.path.join(work, "examples", "data_tfrecord-*")
    rows, outputs = [], {}
    for name, options in (("direct", pipeline_options("direct")), ("multi_process", pipeline_options("multi_process"))):
        seconds, outputs[name] = timed_run(pattern, os.path.join(work, name), options)
        rows.append((name, seconds))
    from dask.distributed import Client, LocalCluster
    start = time.perf_counter()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    rows.append(("dask: LocalCluster start", time.perf_counter() - start))
    try:
        options = pipeline_options("dask", dask_address=cluster.scheduler_address, num_workers=2)
        for label, directory in (("dask (first run, fresh workers)", "dask-1"), ("dask (second run)", "dask-2")):
            seconds, outputs[label] = timed_run(pattern, os.path.join(work, directory), options)
            rows.append((label, seconds))
    finally:
        client.close()
        cluster.close()
    reference = "".join(f"{item}\n" for item in sorted(counts)).encode("utf-8")
    same = all(out == outputs["direct"] for out in outputs.values()) and outputs["direct"]["item_id"] == reference
    return {"examples": sum(counts.values()), "items": len(counts), "shards": shards, "rows": rows,
            "same_files_as_reference": same, "load_average": os.getloadavg()}


def write_report(result: dict, command: str) -> None:
    lines = ["# The vocabulary job on each Beam runner", "",
             f"`{command}` (2-core CPU shared with other jobs; load average {result['load_average'][0]:.1f} at the "
             f"end; one run each). {result['examples']:,} training examples in {result['shards']} gzipped shards, "
             f"{result['items']:,} distinct items; every run wrote the same files as a collections.Counter "
             f"reference: {result['same_files_as_reference']}.", "",
             "| runner | wall time (s) |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in result["rows"]]
    lines += ["", "The multi-process DirectRunner starts its worker processes (each importing Beam and TensorFlow) "
              "for every pipeline. Dask workers stay up between runs; they import this script's modules (TensorFlow "
              "among them) when the LocalCluster starts them, which is most of its start time."]
    (HERE / "results" / "beam_runners.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--work-dir")
    args = parser.parse_args()
    if args.examples < 1 or args.shards < 1:
        parser.error(f"--examples and --shards must be >= 1, got {args.examples} and {args.shards}")
    with tempfile.TemporaryDirectory(prefix="beam-runners-") as tmp:
        result = run_all(args.work_dir or tmp, args.examples, args.shards)
    for name, seconds in result["rows"]:
        print(f"{name:35s} {seconds:8.1f} s")
    write_report(result, " ".join([".venv/bin/python benchmarks/beam_runners.py", *sys.argv[1:]]))
    return 0 if result["same_files_as_reference"] else 1


if __name__ == "__main__":
    sys.exit(main())
