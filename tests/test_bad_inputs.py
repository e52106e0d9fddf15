"""Issue 15's CLI and reader cases: every bad input answered with one clear error naming the file, line, field
or flag and the minimum it needs; concurrent exports refused; the temporaries of killed runs removed; library
log noise only with --verbose."""
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from tfrec_recall import cli
from tfrec_recall._atomic import exclusive_lock, remove_stale_temporaries
from tfrec_recall.data import leave_last_out, read_csv, read_parquet
from tfrec_recall.data.readers import _int, _str
from tfrec_recall.data.schema import DataError, InteractionData


def _csv(tmp_path, text, name="log.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------------------
# Readers

def test_timestamps_outside_int64_are_refused_naming_the_line(tmp_path):
    path = _csv(tmp_path, "user_id,item_id,timestamp\nu1,i1,5\nu1,i2,1e30\n")
    with pytest.raises(DataError, match=r"log.csv, line 3, field 'timestamp': timestamp is out of the int64 "
                                        r"range: '1e30'"):
        read_csv(path)
    with pytest.raises(ValueError, match=r"out of the int64 range: '100000000000000000000000000000'"):
        _int("100000000000000000000000000000")  # MovieLens readers' integer fields
    assert _int(str(2 ** 63 - 1)) == 2 ** 63 - 1  # the largest int64 still reads


def test_ids_with_nul_bytes_are_refused_not_truncated(tmp_path):
    path = _csv(tmp_path, "user_id,item_id,timestamp\nu1,i1,5\nu1,i\x002,6\n")
    with pytest.raises(DataError, match=r"log.csv, line 3: the line contains a NUL byte"):
        read_csv(path)
    frame = pd.DataFrame({"user_id": ["u1", "u1"], "item_id": ["i1", "i\x002"], "timestamp": [5, 6]})
    frame.to_parquet(tmp_path / "log.parquet")
    with pytest.raises(DataError, match=r"log.parquet, line 2, field 'item_id': the id contains a NUL byte"):
        read_parquet(tmp_path / "log.parquet")
    with pytest.raises(ValueError, match=r"contains a NUL byte"):
        _str("a\x00b")


def test_column_map_fields_must_be_schema_fields(tmp_path):
    path = _csv(tmp_path, "uid,iid,ts\nu1,i1,5\n")
    assert len(read_csv(path, column_map={"user_id": "uid", "item_id": "iid", "timestamp": "ts"}).interactions) == 1
    with pytest.raises(DataError, match=r"column_map names the field 'usr_id', which is not one of \['user_id', "
                                        r"'item_id', 'timestamp', 'weight'\]"):
        read_csv(path, column_map={"usr_id": "uid", "item_id": "iid", "timestamp": "ts"})


def test_empty_and_unreadable_files_are_named(tmp_path):
    empty = _csv(tmp_path, "", name="empty.csv")
    with pytest.raises(DataError, match=r"empty.csv: the file is empty"):
        read_csv(empty)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match=r"broken.parquet: cannot read as Parquet"):
        read_parquet(broken)


def test_a_file_that_is_not_parquet_does_not_abort_the_process_at_exit(tmp_path):
    """pd.read_parquet's failure on such a file made the interpreter abort at exit (SIGABRT, "terminate called
    without an active exception"): the CLI printed its error and then died with 134 instead of 2."""
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not a parquet file at all")
    code = ("import sys\nfrom tfrec_recall.data import read_parquet\nfrom tfrec_recall.data.schema import DataError\n"
            f"try:\n    read_parquet({str(broken)!r})\nexcept DataError:\n    sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3 and "terminate called" not in done.stderr, done.stderr[-500:]


def _data(rows):
    return InteractionData(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype(
        {"timestamp": np.int64}), name="tiny")


def test_splits_need_two_users_and_a_user_with_three_interactions():
    one_user = _data([("u1", f"i{j}", j) for j in range(10)])
    with pytest.raises(DataError, match=r"tiny: the data has 1 user\(s\); a retrieval split needs at least 2"):
        leave_last_out(one_user)
    short = _data([(f"u{u}", f"i{j}", j) for u in range(5) for j in range(2)])
    with pytest.raises(DataError, match=r"tiny: no user is left for validation and test: a user needs at least 3 "
                                        r"interactions .* the most any user has is 2"):
        leave_last_out(short)
    enough = _data([(f"u{u}", f"i{j}", j) for u in range(2) for j in range(3)])
    assert len(leave_last_out(enough).test) == 2


# ----------------------------------------------------------------------------------------------------------
# The CLI

def test_a_yaml_history_length_is_not_overridden_by_the_flag_default(tmp_path, monkeypatch, capsys):
    from tests.test_cli import _small_synthetic
    # The dataset only has to reach the split: a small one instead of the CLI's default synthetic size.
    monkeypatch.setattr("tfrec_recall.data.registry.make_synthetic", _small_synthetic)
    seen = []

    def stop(data, split, history_length, seed):
        seen.append(history_length)
        raise RuntimeError("stopped after the split's arguments")

    monkeypatch.setattr(cli, "make_split", stop)
    config = _csv(tmp_path, "history_length: 7\n", name="c.yaml")
    args = ["train", "--config", str(config), "--out", str(tmp_path / "o")]
    assert cli.main(args) == 2 and seen == [7]
    assert cli.main(args + ["--history-length", "3"]) == 2 and seen == [7, 3]  # the flag, when given, wins
    assert cli.main(["train", "--out", str(tmp_path / "o")]) == 2 and seen == [7, 3, 50]  # the preset's
    assert "stopped after the split's arguments" in capsys.readouterr().err


def test_concurrent_writers_of_one_directory_are_refused(tmp_path):
    with exclusive_lock(tmp_path, "export"):
        with pytest.raises(RuntimeError, match=r"another export is writing to .* right now; wait for it"):
            with exclusive_lock(tmp_path, "export"):
                pass
    with exclusive_lock(tmp_path, "export"):  # released when the holder is done
        pass
    assert list(tmp_path.iterdir()) == []  # no lock file left behind


def test_temporaries_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f".tmp-3-{dead.pid}"
    mine = tmp_path / f".tmp-4-{os.getpid()}"
    reused = tmp_path / f".tmp-5-{os.getpid()}"  # left long before this process started: the pid was reused
    other = tmp_path / ".tmp-notes"
    for path in (gone, mine, reused, other):
        path.mkdir()
    os.utime(reused, (time.time() - 10 * 365 * 86400,) * 2)
    removed = remove_stale_temporaries(tmp_path, r"\.tmp-\d+-(?P<pid>\d+)")
    assert sorted(removed) == sorted([str(gone), str(reused)])
    assert mine.exists() and other.exists() and not gone.exists() and not reused.exists()


def test_library_start_up_noise_only_with_verbose(tmp_path):
    """Without --verbose the CLI prints its own one-line error; TensorFlow's C++ start-up lines and
    google.api_core's FutureWarning appear with it (the command imports TensorFlow before failing)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}

    def start(*extra):
        command = [sys.executable, "-m", "tfrec_recall.cli", "evaluate", "--model-dir", str(tmp_path), *extra]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def finish(process):
        _, stderr = process.communicate(timeout=300)
        return subprocess.CompletedProcess(process.args, process.returncode, stderr=stderr)

    # Two fresh processes (the log level is read when TensorFlow loads), started together to overlap their imports.
    started = start(), start("--verbose")
    try:
        quiet, verbose = (finish(process) for process in started)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
    assert quiet.returncode == verbose.returncode == 2
    assert quiet.stderr.strip().splitlines() == [f"tfrec-recall evaluate: error: --model-dir {str(tmp_path)!r} has "
                                                 "no config.yaml: not a directory written by `tfrec-recall train`"]
    assert len(verbose.stderr.strip().splitlines()) > 1  # the library lines the quiet run hid
    assert verbose.stderr.strip().splitlines()[-1] == quiet.stderr.strip()
