"""The command line: train / evaluate / recommend on a small synthetic run, and one-line errors."""
import json

import pytest

from tfrec_recall import cli


def _small_config(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("epochs: 2\nbatch_size: 256\nembedding_dim: 16\noutput_dim: 16\nhidden_units: [32]\n"
                    "negatives: mixed\nnum_negatives: 128\nlearning_rate: 0.01\n")
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, monkeypatch_module):
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "run"
    # A small synthetic dataset keeps this fast; the CLI's own default is the full synthetic size.
    monkeypatch_module.setattr("tfrec_recall.data.registry.make_synthetic",
                               _small_synthetic)
    code = cli.main(["train", "--dataset", "synthetic", "--model", "youtube_dnn", "--config",
                     str(_small_config(tmp)), "--out", str(out), "--quiet", "--history-length", "10"])
    assert code == 0
    return out


def _small_synthetic(**kwargs):
    from tfrec_recall.data.synthetic import make_synthetic
    return make_synthetic(num_users=200, num_items=150, num_categories=6, mean_interactions=12, seed=5)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_train_writes_model_dir(trained_run, capsys):
    for name in ("config.yaml", "metrics.json", "history.json", "training.png", "candidates.npz",
                 "query_tower/saved_model.pb", "candidate_tower/saved_model.pb", "checkpoint/ckpt.index"):
        assert (trained_run / name).exists(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["HR@10"] <= metrics["test"]["HR@50"] <= metrics["test"]["HR@100"] <= 1.0
    history = json.loads((trained_run / "history.json").read_text())
    assert len(history["loss"]) == 2 and len(history["val_HR@10"]) == 2
    # The kept epoch is the one with the best validation HR@50 (early stopping restores it).
    best = metrics["best_epoch"]
    assert history["val_HR@50"][best - 1] == max(history["val_HR@50"])
    assert metrics["valid"]["HR@50"] == pytest.approx(max(history["val_HR@50"]), abs=1e-6)
    assert (trained_run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(trained_run.parent.glob(".run.tmp-*"))
    assert not (trained_run.parent / ".run.resume").exists()  # the finished run leaves no resume state
    assert (trained_run / "logs").is_dir()


def test_evaluate_reproduces_saved_test_metrics(trained_run, tmp_path, capsys):
    output = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--model-dir", str(trained_run), "--output", str(output)]) == 0
    saved = json.loads((trained_run / "metrics.json").read_text())["test"]
    again = json.loads(output.read_text())
    for key in ("HR@10", "HR@50", "NDCG@10", "MRR"):
        assert again[key] == pytest.approx(saved[key], abs=1e-6)
    assert "test metrics of" in capsys.readouterr().out


def test_recommend_prints_unseen_items(trained_run, capsys):
    assert cli.main(["recommend", "--model-dir", str(trained_run), "--user-id", "u1", "--k", "5"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 5 and out.startswith("user u1")
    assert cli.main(["recommend", "--model-dir", str(trained_run), "--user-id", "nobody"]) == 2
    assert "user_id 'nobody' has no training interactions" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["train", "--dataset", "netflix", "--out", "x"], "argument --dataset: invalid choice: 'netflix'"),
    (["train", "--out", "x", "--history-length", "ten"], "argument --history-length: invalid int value: 'ten'"),
    (["train"], "the following arguments are required: --out"),
])
def test_bad_flags_fail_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_config_and_data_fail_with_one_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("temperature: -1\n")
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "config key 'temperature': must be > 0, got -1.0" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["train", "--dataset", "ml-100k", "--data-dir", str(tmp_path / "none"),
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "u.data: file not found" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["train", "--dataset", "ml-100k", "--out", str(tmp_path / "o")]) == 2
    assert "--data-dir is required for --dataset ml-100k" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    assert cli.main(["train", "--out", str(occupied)]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model-dir", str(tmp_path)]) == 2
    assert "has no config.yaml" in capsys.readouterr().err


def test_export_command_writes_a_serving_version_and_queries_it(trained_run, tmp_path, capsys):
    base = tmp_path / "exports"
    assert cli.main(["export", "--model-dir", str(trained_run), "--index", "ivf", "--k", "20",
                     "--export-dir-base", str(base)]) == 0
    out = capsys.readouterr().out
    assert (base / "1" / "saved_model.pb").exists() and (base / "1" / "assets" / "manifest.json").exists()
    assert "exported model answers like the in-memory model: True" in out
    assert cli.main(["export", "--model-dir", str(trained_run), "--k", "0", "--export-dir-base", str(base)]) == 2
    assert "--k must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["export", "--model-dir", str(trained_run), "--k", "100000", "--export-dir-base", str(base)]) == 2
    assert "--k (100000) must be <= the number of candidates (150)" in capsys.readouterr().err


def test_non_finite_learning_rate_and_diverging_training_exit_non_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tfrec_recall.data.registry.make_synthetic", _small_synthetic)
    out = tmp_path / "run"
    assert cli.main(["train", "--learning-rate", "inf", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--learning-rate: config key 'learning_rate': must be a finite number, got inf" in err
    # A finite but absurd learning rate diverges: training stops at the first non-finite loss, nothing is saved.
    assert cli.main(["train", "--learning-rate", "1e30", "--out", str(out), "--quiet", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "training loss became nan at epoch 1" in err and "lower the learning rate" in err
    assert not out.exists()
