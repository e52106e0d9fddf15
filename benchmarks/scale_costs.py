"""Per-example and per-item costs of the production steps, measured small, for the scale table in docs/scale.md.

    .venv/bin/python benchmarks/scale_costs.py [--interactions 100000] [--tokens 1000000]

Measures on this machine, each step once, on the DirectRunner (one process):

* the pipeline's protocol split (``pipelines.transforms.LeaveLastOut``: parse, group by user, causal history,
  serialize) per raw interaction, from a gzipped TFRecord of the seeded synthetic data;
* the vocabulary and count job (``beam_jobs.run_token_tables``) per training example;
* the batch item-embedding job (``beam_jobs.run_vocabulary_embeddings``, a 64-d id tower SavedModel) per item;
* the resident memory of a ``StringLookup`` over a vocabulary file, per token (RSS before and after building it,
  in a fresh child process).

Writes benchmarks/results/scale_costs.json and .md (docs/scale.md multiplies these out).
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

import tfrec_recall  # noqa: F401  (before TensorFlow)

HERE = Path(__file__).resolve().parent


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmRSS:")).split()[1]) / 1024


def protocol_split(raw: str, out: str) -> float:
    import apache_beam as beam
    from pipelines.transforms import LeaveLastOut
    start = time.perf_counter()
    with beam.Pipeline() as pipeline:
        splits = pipeline | beam.io.ReadFromTFRecord(raw) | LeaveLastOut(history_length=50)
        for name, records in splits.items():
            _ = records | f"Write{name}" >> beam.io.WriteToTFRecord(f"{out}/Split-{name}/part", file_name_suffix=".gz")
    return time.perf_counter() - start


def embedding_model(directory: str, vocabulary: str) -> None:
    import tensorflow as tf
    lookup = tf.keras.layers.StringLookup(vocabulary=vocabulary)
    embedding = tf.keras.layers.Embedding(lookup.vocabulary_size(), 64)

    class Tower(tf.Module):
        def __init__(self):
            super().__init__()
            self.lookup, self.embedding = lookup, embedding

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="item_id")])
        def __call__(self, item_id):
            return {"embedding": self.embedding(self.lookup(item_id))}

    tower = Tower()
    tf.saved_model.save(tower, directory, signatures={"serving_default": tower.__call__})


def lookup_memory(tokens: int, scratch: str) -> dict:
    """RSS of a child process before / after building a StringLookup over ``tokens`` ids from a file."""
    path = os.path.join(scratch, "tokens.vocab")
    with open(path, "w") as f:
        f.writelines(f"item{i:09d}\n" for i in range(tokens))
    code = ("import tfrec_recall, json, tensorflow as tf\n"
            "def rss_mb():\n"
            "    return int(next(x for x in open('/proc/self/status') if x.startswith('VmRSS:')).split()[1]) / 1024\n"
            "before = rss_mb()\n"
            f"layer = tf.keras.layers.StringLookup(vocabulary={path!r})\n"
            "out = layer(tf.constant(['item000000001'])).numpy()\n"
            "print(json.dumps({'before_mb': before, 'after_mb': rss_mb(), 'size': int(layer.vocabulary_size())}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=HERE.parent, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args, scratch: str) -> dict:
    import tensorflow as tf
    from tfrec_recall.data import make_synthetic
    from tfrec_recall.data import beam_jobs
    from tfrec_recall.data.protocol import write_interactions_tfrecord
    data = make_synthetic(num_users=args.interactions // 31, num_items=20_000, num_categories=50,
                          mean_interactions=31, seed=0)
    raw = write_interactions_tfrecord(data, os.path.join(scratch, "raw.tfrecord.gz"))
    n = len(data.interactions)
    split_seconds = protocol_split(raw, os.path.join(scratch, "examples"))
    train_pattern = os.path.join(scratch, "examples", "Split-train", "*")
    train_rows = sum(1 for _ in tf.data.TFRecordDataset(beam_jobs.input_files(train_pattern), "GZIP"))
    start = time.perf_counter()
    paths = beam_jobs.run_token_tables(train_pattern, os.path.join(scratch, "tables"))
    tables_seconds = time.perf_counter() - start
    vocabulary = paths["vocabulary"]["item_id"]
    items = len(beam_jobs.read_vocabulary(vocabulary))
    embedding_model(os.path.join(scratch, "tower"), vocabulary)
    start = time.perf_counter()
    beam_jobs.run_vocabulary_embeddings(vocabulary, os.path.join(scratch, "tower"), os.path.join(scratch, "emb"),
                                        output_name="embedding")
    embed_seconds = time.perf_counter() - start
    memory = lookup_memory(args.tokens, scratch)
    return {"interactions": n, "train_examples": train_rows, "items": items,
            "protocol_split_us_per_interaction": 1e6 * split_seconds / n,
            "token_tables_us_per_example": 1e6 * tables_seconds / train_rows,
            "embedding_job_us_per_item": 1e6 * embed_seconds / items,
            "lookup_bytes_per_token": (memory["after_mb"] - memory["before_mb"]) * 2**20 / args.tokens,
            "lookup_tokens": args.tokens, "seconds": {"protocol_split": split_seconds, "token_tables": tables_seconds,
                                                      "embedding_job": embed_seconds},
            "load_average_end": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--interactions", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scale-costs-") as scratch:
        result = measure(args, scratch)
    (HERE / "results" / "scale_costs.json").write_text(json.dumps(result, indent=1))
    lines = ["# Per-example and per-item costs (inputs of docs/scale.md)", "",
             f"Command: `.venv/bin/python benchmarks/scale_costs.py {' '.join(sys.argv[1:])}` (DirectRunner, one "
             f"process; 2 shared cores, load average {result['load_average_end']:.1f} at the end)", "",
             "| step | measured on | cost |", "|---|---|---:|",
             f"| protocol split (Beam LeaveLastOut) | {result['interactions']:,} interactions | "
             f"{result['protocol_split_us_per_interaction']:.0f} µs / interaction |",
             f"| vocabularies + counts (Beam) | {result['train_examples']:,} training examples | "
             f"{result['token_tables_us_per_example']:.0f} µs / example |",
             f"| item embedding job (Beam, 64-d id tower) | {result['items']:,} items | "
             f"{result['embedding_job_us_per_item']:.0f} µs / item |",
             f"| StringLookup over a vocabulary file | {result['lookup_tokens']:,} tokens | "
             f"{result['lookup_bytes_per_token']:.0f} bytes / token (RSS) |"]
    (HERE / "results" / "scale_costs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
