"""The quality benchmark's run log (benchmarks/quality.py): a grid point naming a preset's own value is the run
already logged without it, so widening a grid re-trains nothing that was measured."""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "quality_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def test_a_preset_value_in_the_overrides_finds_the_run_logged_without_it(tmp_path):
    log = quality.RunLog(tmp_path / "runs.jsonl", fresh=True)
    log.add({"row": "r", "preset": "youtube_dnn_mixed", "overrides": {"query_tower": "sdm"}, "seed": 0,
             "max_epochs": 30, "valid": {"HR@50": 0.5}})
    # youtube_dnn_mixed has dat false and learning rate 0.001: these overrides change nothing
    same = {"query_tower": "sdm", "dat": False, "learning_rate": 0.001}
    assert log.get("r", same, 0, 30, "youtube_dnn_mixed")["valid"]["HR@50"] == 0.5
    assert log.get("r", {**same, "dat": True}, 0, 30, "youtube_dnn_mixed") is None
    assert log.get("r", same, 1, 30, "youtube_dnn_mixed") is None
    assert log.get("r", same, 0, 30) is None  # without the preset the overrides are compared as written
    assert quality.effective_overrides("youtube_dnn_mixed", same) == {"query_tower": "sdm"}
    reloaded = quality.RunLog(tmp_path / "runs.jsonl", fresh=False)
    assert reloaded.get("r", same, 0, 30, "youtube_dnn_mixed") is not None
