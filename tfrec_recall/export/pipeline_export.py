"""The pipeline's export step and infra check as library functions: export a saved run with its index plus a
sample request, and answer that request from the export in a fresh Python process (no tfx import)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict

from tfrec_recall import storage

def export_for_serving(model_dir: str, out_dir, *, index: str = "brute_force", k: int = 100) -> str:
    """Exports the run in ``model_dir`` with an index over its candidate corpus into ``out_dir`` (a
    SavedModel directory, written atomically) plus ``out_dir/assets/request.json``, the run's sample request,
    for the infra check. ``index``: a registered index name, or ``"deep_retrieval"`` (the beam search of a run
    trained with ``deep_retrieval: true``, over its path structure)."""
    from tfrec_recall.export import export_retrieval_model
    from tfrec_recall.export.run_index import DEEP_RETRIEVAL, deep_retrieval_run_index
    from tfrec_recall.training import REQUEST_FILE, load_run
    run = load_run(model_dir)
    if index == DEEP_RETRIEVAL:
        index = deep_retrieval_run_index(run, k)
    out = storage.path_str(out_dir).rstrip("/")
    if storage.exists(out):
        raise FileExistsError(f"{out} exists; refusing to overwrite an export")
    staging = storage.join(storage.parent(out), f".staging-{storage.name(out)}-{os.getpid()}")
    storage.rmtree(staging)
    try:
        version = export_retrieval_model(run.query_tower, (run.candidate_ids, run.candidate_embeddings),
                                         index=index, export_dir_base=staging, k=k, version=1)
        storage.gfile().copy(storage.join(model_dir, REQUEST_FILE), storage.join(version, "assets", REQUEST_FILE))
        storage.move_directory(version, out)
    finally:
        storage.rmtree(staging)
    return out


_SMOKE_TEST = r"""
import json, sys
import numpy as np
import tfrec_recall
import tensorflow as tf
path = sys.argv[1]
manifest = json.loads(tf.io.gfile.GFile(path + "/assets/manifest.json").read())
if manifest.get("requires_custom_ops"):
    import scann  # noqa: F401  (registers the ScaNN ops)
request = json.loads(tf.io.gfile.GFile(path + "/assets/request.json").read())
loaded = tf.saved_model.load(path)
fn = loaded.signatures["serving_default"]
inputs = {name: tf.constant(np.asarray(value, dtype=np.float32 if spec.dtype == tf.float32 else object),
                            dtype=spec.dtype)
          for (name, value), spec in ((item, fn.structured_input_signature[1][item[0]]) for item in request.items())}
out = fn(**inputs)
ids, scores = out["item_ids"].numpy(), out["scores"].numpy()
if ids.shape[0] != len(next(iter(request.values()))) or ids.shape[1] != manifest["k"]:
    raise SystemExit(f"unexpected output shape {ids.shape}")
if not np.all(np.isfinite(scores[:, 0])):
    raise SystemExit("non-finite top score")
print(json.dumps({"item_ids": [[i.decode() for i in row[:5]] for row in ids], "k": int(ids.shape[1])}))
"""


def smoke_test_export(export_dir, timeout: float = 600.0) -> Dict[str, Any]:
    """Loads the export in a fresh Python process and answers its ``assets/request.json`` through
    ``serving_default``. Returns ``{"ok": bool, "output" or "error": ...}``; never raises for a broken model."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    try:
        done = subprocess.run([sys.executable, "-c", _SMOKE_TEST, str(export_dir)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no answer within {timeout:.0f} s"}
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        return {"ok": False, "error": lines[-1] if lines else f"exit code {done.returncode}"}
    return {"ok": True, "output": json.loads(done.stdout.strip().splitlines()[-1])}
