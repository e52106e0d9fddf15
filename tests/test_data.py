"""Readers (well-formed and malformed input), the synthetic default, splits and leakage, tf.data, TFRecords."""
import dataclasses
import logging

import numpy as np
import pandas as pd
import pytest

from tfrec_recall.data import (DataError, leave_last_out, make_synthetic, random_split, read_csv,
                               read_movielens_100k, read_movielens_1m, read_movielens_latest, read_parquet)
from tfrec_recall.data.schema import InteractionData
from tests.conftest import ML100K, REQUIRES_ML100K

GENRES = "unknown|0\nAction|1\nComedy|2\n"


def write_ml100k(d, data_lines, item_lines=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.data").write_text("".join(line + "\n" for line in data_lines))
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    (d / "u.genre").write_text(GENRES)
    items = item_lines or ["1|Toy Story (1995)|01-Jan-1995||http://x|0|1|1",
                           "2|GoldenEye (1995)|01-Jan-1995||http://x|0|1|0",
                           "3|Odd (1998)|||http://x|1|0|0"]
    (d / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    return d


GOOD = ["1\t1\t5\t100", "1\t2\t3\t90", "2\t3\t4\t50", "2\t1\t2\t60", "1\t3\t1\t100"]


def test_ml100k_reader_parses_schema_and_features(tmp_path):
    data = read_movielens_100k(write_ml100k(tmp_path / "ml", GOOD))
    df = data.interactions
    assert list(df.columns) == ["user_id", "item_id", "timestamp"]
    assert df["user_id"].tolist() == ["1", "1", "2", "2", "1"]
    assert df["timestamp"].dtype == np.int64
    assert data.item_features.loc["1", "genres"] == ("Action", "Comedy")
    assert data.item_features.loc["3", "genres"] == ("unknown",)
    assert data.item_features.loc["1", "decade"] == "1990s"
    assert data.item_features.loc["3", "decade"] == "unknown"
    assert data.user_features.loc["2", "gender"] == "F"
    assert data.user_features.loc["1", "age"] == 24.0
    assert data.feature_kinds["genres"] == "multi_categorical"
    # Titles are display metadata, not a feature: the projector and printouts use them, the towers never see them.
    assert data.item_titles.loc["2"] == "GoldenEye (1995)" and "title" not in data.item_features.columns


def test_ml100k_rating_as_weight(tmp_path):
    data = read_movielens_100k(write_ml100k(tmp_path / "ml", GOOD), rating_as_weight=True)
    assert data.interactions["weight"].tolist() == [5.0, 3.0, 4.0, 2.0, 1.0]


@pytest.mark.parametrize("bad_line,line_no,pattern", [
    ("1\t2\t3", 3, r"u\.data, line 3: malformed row: expected 4 fields, got 3"),
    ("1\t2\t3\tyesterday", 3, r"u\.data, line 3, field 'timestamp': cannot parse 'yesterday'"),
    ("\t2\t3\t10", 3, r"u\.data, line 3, field 'user_id': cannot parse ''"),
    ("1\t2\tfive\t10", 3, r"line 3, field 'rating'"),
])
def test_malformed_rows_raise_with_file_line_and_field(tmp_path, bad_line, line_no, pattern):
    lines = GOOD[:2] + [bad_line] + GOOD[2:]
    with pytest.raises(DataError, match=pattern):
        read_movielens_100k(write_ml100k(tmp_path / "ml", lines))


def test_skip_mode_counts_and_reports_skipped_rows(tmp_path, caplog):
    lines = GOOD[:2] + ["1\t2\t3", "1\t2\t3\tyesterday"] + GOOD[2:]
    with caplog.at_level(logging.WARNING):
        data = read_movielens_100k(write_ml100k(tmp_path / "ml", lines), on_bad_rows="skip")
    assert len(data.interactions) == len(GOOD)
    assert data.skipped_rows == 2
    assert "skipped 2 malformed rows" in caplog.text


def test_missing_file_and_unknown_encoding(tmp_path):
    d = write_ml100k(tmp_path / "ml", GOOD)
    (d / "u.item").unlink()
    with pytest.raises(DataError, match=r"u\.item: file not found"):
        read_movielens_100k(d)
    d = write_ml100k(tmp_path / "ml2", GOOD)
    with pytest.raises(DataError, match=r"field 'encoding': unknown encoding 'klingon-8'"):
        read_movielens_100k(d, encoding="klingon-8")
    with pytest.raises(ValueError, match=r"on_bad_rows must be one of .* got 'ignore'"):
        read_movielens_100k(d, on_bad_rows="ignore")


def test_undecodable_bytes_name_the_encoding(tmp_path):
    d = tmp_path / "latest"
    d.mkdir()
    (d / "ratings.csv").write_bytes(b"userId,movieId,rating,timestamp\n1,1,4.0,10\n")
    (d / "movies.csv").write_bytes(b"movieId,title,genres\n1,Caf\xe9 (1999),Drama\n")
    with pytest.raises(DataError, match=r"movies\.csv.*field 'encoding': cannot decode with encoding 'utf-8'"):
        read_movielens_latest(d)
    assert read_movielens_latest(d, encoding="latin-1").item_features.loc["1", "decade"] == "1990s"


def test_ml1m_reader(tmp_path):
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n")
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (d / "movies.dat").write_bytes("10::GoldenEye (1995)::Action|Adventure|Thriller\n20::Heat (1995)::Action\n"
                                   .encode("latin-1"))
    data = read_movielens_1m(d)
    assert len(data.interactions) == 3
    assert data.item_features.loc["10", "genres"] == ("Action", "Adventure", "Thriller")
    assert data.user_features.loc["2", "age_group"] == "56"
    (d / "ratings.dat").write_text("1::10::5::978300760\n1::20::3\n")
    with pytest.raises(DataError, match=r"ratings\.dat, line 2: malformed row"):
        read_movielens_1m(d)


def test_ml_latest_reader_handles_quoted_titles(tmp_path):
    d = tmp_path / "latest"
    d.mkdir()
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.0,964981247\n")
    (d / "movies.csv").write_text('movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama\n'
                                  '3,Grumpier Old Men (1995),(no genres listed)\n')
    data = read_movielens_latest(d)
    assert data.item_features.loc["1", "genres"] == ("Comedy", "Drama")
    assert data.item_features.loc["3", "genres"] == ("unknown",)
    assert data.user_features is None


def test_generic_csv_with_column_map_and_bad_values(tmp_path, caplog):
    path = tmp_path / "log.csv"
    path.write_text("uid,iid,ts,reward,country,tags,price\n"
                    "a,x,1,1.0,de,t1|t2,3.5\n"
                    "a,y,2,0.5,de,t2,1.0\n"
                    "b,x,oops,1.0,fr,t1,3.5\n")
    kwargs = dict(column_map={"user_id": "uid", "item_id": "iid", "timestamp": "ts", "weight": "reward"},
                  feature_kinds={"country": "categorical", "tags": "multi_categorical", "price": "numeric"},
                  user_feature_columns=["country"], item_feature_columns=["tags", "price"])
    with pytest.raises(DataError, match=r"log\.csv, line 4, field 'ts': timestamp is not an integer: 'oops'"):
        read_csv(path, **kwargs)
    with caplog.at_level(logging.WARNING):
        data = read_csv(path, on_bad_rows="skip", **kwargs)
    assert data.skipped_rows == 1 and "skipped 1 malformed rows" in caplog.text
    assert data.interactions["weight"].tolist() == [1.0, 0.5]
    assert data.item_features.loc["x", "tags"] == ("t1", "t2")
    assert data.user_features.loc["a", "country"] == "de"
    with pytest.raises(DataError, match=r"missing column 'user' \(mapped to 'user_id'\)"):
        read_csv(path, column_map={"user_id": "user"})
    with pytest.raises(DataError, match=r"feature_kinds\['country'\] must be one of"):
        read_csv(path, column_map=kwargs["column_map"], user_feature_columns=["country"])


def test_generic_csv_wrong_field_count(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\na,x,1\na,y,2,extra\nb,z,3\n")
    with pytest.raises(DataError, match=r"log\.csv: malformed row: .*line 3"):
        read_csv(path)
    data = read_csv(path, on_bad_rows="skip")
    assert data.skipped_rows == 1 and len(data.interactions) == 2


def test_parquet_reader(tmp_path):
    path = tmp_path / "log.parquet"
    pd.DataFrame({"u": ["a", "b", None], "i": ["x", "y", "z"], "t": [1, 2, 3]}).to_parquet(path)
    with pytest.raises(DataError, match=r"line 3, field 'u': empty value"):
        read_parquet(path, column_map={"user_id": "u", "item_id": "i", "timestamp": "t"})
    data = read_parquet(path, column_map={"user_id": "u", "item_id": "i", "timestamp": "t"}, on_bad_rows="skip")
    assert data.interactions["item_id"].tolist() == ["x", "y"] and data.skipped_rows == 1


def test_schema_rejects_bad_frames():
    with pytest.raises(DataError, match=r"missing required column 'timestamp'"):
        InteractionData(pd.DataFrame({"user_id": ["a"], "item_id": ["b"]}))
    with pytest.raises(DataError, match=r"field 'weight': weight must be a finite non-negative number, got -1.0"):
        InteractionData(pd.DataFrame({"user_id": ["a"], "item_id": ["b"], "timestamp": [1], "weight": [-1.0]}))


@REQUIRES_ML100K
def test_real_ml100k():
    data = read_movielens_100k(ML100K)
    assert len(data.interactions) == 100_000
    assert data.interactions["user_id"].nunique() == 943 and len(data.items) == 1682


# --- synthetic -----------------------------------------------------------------------------------------------

def test_synthetic_is_seeded_and_shaped():
    a = make_synthetic(num_users=100, num_items=80, num_categories=5, seed=1)
    b = make_synthetic(num_users=100, num_items=80, num_categories=5, seed=1)
    c = make_synthetic(num_users=100, num_items=80, num_categories=5, seed=2)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    assert not a.interactions.equals(c.interactions)
    df = a.interactions
    assert df.groupby("user_id").size().min() >= 5
    assert not df.duplicated(["user_id", "item_id"]).any()
    assert (df.groupby("user_id")["timestamp"].diff().dropna() > 0).all()  # time-ordered sequences
    sizes = a.item_features["category"].value_counts()
    assert sizes.iloc[0] > 2 * sizes.iloc[-1]  # imbalanced categories
    big = make_synthetic(num_users=200, num_items=500, num_categories=5, seed=1).interactions
    counts = big["item_id"].value_counts()
    # Power-law popularity: the top 10% of items take over 25% of interactions (uniform would be 10%).
    assert counts.iloc[: len(counts) // 10].sum() > 0.25 * len(big)
    with pytest.raises(ValueError, match=r"num_users must be an integer >= 1, got 0"):
        make_synthetic(num_users=0)
    with pytest.raises(ValueError, match=r"stickiness must be in \[0, 1\], got 1.5"):
        make_synthetic(stickiness=1.5)


# --- splits and leakage ---------------------------------------------------------------------------------------

def _frame(rows):
    return InteractionData(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]))


def test_leave_last_out_protocol_with_ties_by_file_order():
    data = _frame([("a", "i1", 10), ("a", "i3", 30), ("a", "i2", 20), ("a", "i4", 30),
                   ("b", "i1", 5), ("b", "i2", 6),  # b has 2 interactions: training only
                   ("c", "i5", 1), ("c", "i6", 1), ("c", "i7", 1)])
    split = leave_last_out(data, history_length=2)
    # a sorted: i1(10) i2(20) i3(30) i4(30, later in the file) -> test i4, valid i3
    assert split.test.set_index("user_id")["item_id"].to_dict() == {"a": "i4", "c": "i7"}
    assert split.valid.set_index("user_id")["item_id"].to_dict() == {"a": "i3", "c": "i6"}
    assert split.train_items == {"a": ["i1", "i2"], "b": ["i1", "i2"], "c": ["i5"]}
    train_a = split.train[split.train.user_id == "a"]
    assert train_a["history"].tolist() == [(), ("i1",)]
    assert split.test.set_index("user_id").loc["a", "history"] == ("i2", "i1")  # training items, recent first
    assert split.valid.set_index("user_id").loc["a", "history"] == ("i2", "i1")


def _assert_no_leakage(split):
    data = split.data.interactions.copy()
    data["_order"] = np.arange(len(data))
    data = data.sort_values(["user_id", "timestamp", "_order"], kind="mergesort")
    held_out = set(zip(split.valid.user_id, split.valid.item_id)) | set(zip(split.test.user_id, split.test.item_id))
    for user, group in split.train.groupby("user_id", sort=False):
        items = group["item_id"].tolist()
        for position, history in enumerate(group["history"]):
            assert items[position] not in history  # never the target
            assert set(history) <= set(items[:position])  # only earlier training items
            assert list(history) == items[:position][::-1][:split.history_length]
            assert not any((user, h) in held_out for h in history)
    for rows in (split.valid, split.test):
        for user, history in zip(rows.user_id, rows.history):
            assert set(history) <= set(split.train_items[user])
            assert all((user, h) not in held_out for h in history)


def test_no_leakage_leave_last_out(small_split):
    _assert_no_leakage(small_split)
    assert len(small_split.test) == small_split.data.interactions.user_id.nunique()


def test_no_leakage_random_split(small_data):
    split = random_split(small_data, valid_fraction=0.1, test_fraction=0.1, history_length=5, seed=0)
    _assert_no_leakage(split)
    total = len(split.train) + len(split.valid) + len(split.test)
    assert total == len(small_data.interactions)
    assert 0.05 < len(split.test) / total < 0.15
    with pytest.raises(ValueError, match=r"history_length must be an integer >= 1, got 0"):
        leave_last_out(small_data, history_length=0)


# --- tf.data and TFRecords -----------------------------------------------------------------------------------

def test_dataset_and_tfrecord_round_trip(tmp_path, small_split):
    from tfrec_recall.data.tfdata import make_dataset, read_tfrecords, write_tfrecords
    from tfrec_recall.features import feature_arrays, specs_from_split
    specs = specs_from_split(small_split, use_side_features=True)
    arrays = feature_arrays(small_split.train, small_split.data, specs["query"] + specs["candidate"])
    batches = list(make_dataset(arrays, 64))
    assert sum(int(b["item_id"].shape[0]) for b in batches) == len(small_split.train)
    assert batches[0]["history"].shape == (64, 10) and batches[0]["tags"].dtype.name == "string"
    shuffled = np.concatenate([b["item_id"].numpy() for b in make_dataset(arrays, 64, shuffle=True, seed=1)])
    assert sorted(shuffled.tolist()) == sorted(x.encode() for x in arrays["item_id"])
    write_tfrecords(arrays, tmp_path / "train", num_shards=3)
    assert len(list((tmp_path / "train").glob("part-*.tfrecord"))) == 3
    back = {k: [] for k in arrays}
    for batch in read_tfrecords(tmp_path / "train", 100):
        for k in arrays:
            back[k].append(batch[k].numpy())
    for k, v in arrays.items():
        got = np.concatenate(back[k])
        if got.dtype == object:
            got = np.vectorize(lambda b: b.decode())(got)
            assert (got == np.asarray(v).astype(str)).all(), k
        else:
            np.testing.assert_allclose(got, v, equal_nan=True, err_msg=k)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_tfrecords(arrays, tmp_path / "train")

    class Boom:
        def __str__(self):
            raise RuntimeError("cannot stringify")

    ids = np.array(["a"] * 10, dtype=object)
    ids[7] = Boom()  # fails after shard 0 was written
    with pytest.raises(RuntimeError, match="cannot stringify"):
        write_tfrecords({"item_id": ids}, tmp_path / "broken", num_shards=2)
    assert not (tmp_path / "broken").exists() and not list(tmp_path.glob("broken.tmp-*"))


# --- temporal leakage on the timestamp column (issue 9) --------------------------------------------------------

def _with_file_position(rows, raw):
    """``rows`` of a split with ``pos``, the row's 0-based line in the file (``data.interactions`` order), and
    ``file_ts``, the file's timestamp of that (user, item) interaction."""
    keyed = raw[["user_id", "item_id", "timestamp"]].rename(columns={"timestamp": "file_ts"})
    keyed = keyed.assign(pos=np.arange(len(raw)))
    out = rows.merge(keyed, on=["user_id", "item_id"], how="left", validate="one_to_one")
    assert out["pos"].notna().all(), "a split row is not an interaction of the file"
    return out


def _assert_time_split(split):
    """Leave-last-out on the ACTUAL timestamps: per user, every training interaction has timestamp <= the
    validation timestamp <= the test timestamp, and ties at those boundaries are broken by file order
    (training rows before the validation row before the test row in the file). Valid / test histories hold
    only that user's training items (taken from ``split.train``, not from ``train_items``), none later than
    the row's own timestamp, the most recent ``history_length`` first."""
    raw = split.data.interactions.reset_index(drop=True)
    assert not raw.duplicated(["user_id", "item_id"]).any()  # (user, item) names one line of the file
    # A partition of the file's interactions, with the file's timestamps.
    parts = pd.concat([split.train, split.valid, split.test])[["user_id", "item_id", "timestamp"]]
    assert sorted(map(tuple, parts.to_numpy().tolist())) == sorted(map(tuple, raw[parts.columns].to_numpy().tolist()))
    train = _with_file_position(split.train, raw)
    valid = _with_file_position(split.valid, raw).set_index("user_id")
    test = _with_file_position(split.test, raw).set_index("user_id")
    for rows in (train, valid, test):
        assert (rows["timestamp"].to_numpy() == rows["file_ts"].to_numpy()).all()
    assert valid.index.is_unique and test.index.is_unique and set(valid.index) == set(test.index)
    counts = raw.groupby("user_id").size()
    assert set(test.index) == set(counts[counts >= 3].index)
    # Boundaries on the timestamp column.
    last_train = train.sort_values(["user_id", "timestamp", "pos"]).groupby("user_id").last().loc[test.index]
    v_ts, t_ts, tr_ts = valid.loc[test.index, "timestamp"], test["timestamp"], last_train["timestamp"]
    late = tr_ts.to_numpy() > v_ts.to_numpy()
    assert not late.any(), f"training interactions after validation for users {list(test.index[late][:5])}"
    late = v_ts.to_numpy() > t_ts.to_numpy()
    assert not late.any(), f"validation after test for users {list(test.index[late][:5])}"
    # Ties at a boundary: file order decides.
    v_pos, t_pos, tr_pos = valid.loc[test.index, "pos"], test["pos"], last_train["pos"]
    bad = ((tr_ts == v_ts) & (tr_pos > v_pos)) | ((v_ts == t_ts) & (v_pos > t_pos))
    assert not bad.any(), f"timestamp tie not broken by file order for users {list(test.index[bad.to_numpy()][:5])}"
    # Histories of valid / test rows: only the user's training items, none later than the row.
    train_sorted = train.sort_values(["user_id", "timestamp", "pos"], kind="mergesort")
    train_items = train_sorted.groupby("user_id")["item_id"].agg(list)
    file_ts = raw.set_index(["user_id", "item_id"])["timestamp"]
    for rows in (valid, test):
        for user, item, ts, history in zip(rows.index, rows["item_id"], rows["timestamp"], rows["history"]):
            own = train_items.get(user, [])
            assert set(history) <= set(own), f"user {user}: history {history} has non-training items"
            assert item not in history and valid.loc[user, "item_id"] not in history
            assert all(file_ts[(user, h)] <= ts for h in history), f"user {user}: history later than the row"
            assert list(history) == own[::-1][:split.history_length]


@REQUIRES_ML100K
def test_ml100k_leave_last_out_is_ordered_by_real_timestamps():
    data = read_movielens_100k(ML100K)
    split = leave_last_out(data, history_length=20)
    _assert_time_split(split)
    _assert_no_leakage(split)
    assert len(split.test) == len(split.valid) == 943  # every ML100K user has >= 20 ratings
    # Real data has ties exactly at the boundaries (several ratings in the same second: 415 users have
    # valid ts == test ts, 422 last-training ts == valid ts), so the file-order tie-break is exercised.
    v = split.valid.set_index("user_id")["timestamp"]
    t = split.test.set_index("user_id")["timestamp"].loc[v.index]
    last_train = split.train.groupby("user_id")["timestamp"].max().loc[v.index]
    assert (v == t).sum() > 100 and (last_train == v).sum() > 100


def test_small_split_is_ordered_by_timestamps(small_split):
    _assert_time_split(small_split)


def test_leave_last_out_ties_at_every_boundary_break_by_file_order():
    rows = [("u1", "m1", 100),   # line 0
            ("u2", "m9", 50),    # line 1
            ("u1", "m2", 200),   # line 2
            ("u1", "m3", 300),   # line 3
            ("u2", "m8", 50),    # line 4
            ("u1", "m4", 300),   # line 5
            ("u1", "m5", 300),   # line 6
            ("u2", "m7", 40),    # line 7
            ("u2", "m6", 50)]    # line 8
    split = leave_last_out(_frame(rows), history_length=2)
    # u1 by (timestamp, line): m1 (100, 0) < m2 (200, 2) < m3 (300, 3) < m4 (300, 5) < m5 (300, 6):
    #   test m5, valid m4, train m1 m2 m3; training m3 ties with both held-out rows at t = 300.
    # u2 by (timestamp, line): m7 (40, 7) < m9 (50, 1) < m8 (50, 4) < m6 (50, 8):
    #   test m6, valid m8, train m7 m9 (the file is not in time order; three ties at t = 50).
    assert split.test.set_index("user_id")["item_id"].to_dict() == {"u1": "m5", "u2": "m6"}
    assert split.valid.set_index("user_id")["item_id"].to_dict() == {"u1": "m4", "u2": "m8"}
    assert split.train_items == {"u1": ["m1", "m2", "m3"], "u2": ["m7", "m9"]}
    # History length 2: the last two training items, most recent first.
    assert split.test.set_index("user_id")["history"].to_dict() == {"u1": ("m3", "m2"), "u2": ("m9", "m7")}
    assert split.valid.set_index("user_id")["history"].to_dict() == {"u1": ("m3", "m2"), "u2": ("m9", "m7")}
    _assert_time_split(split)
    # The same rows with the file reversed: lines become 8 - line, so among u1's t = 300 ties m5 (line 2) <
    # m4 (line 3) < m3 (line 5): test m3, valid m4, train m1 m2 m5. Ties follow the file, not the item id.
    reversed_split = leave_last_out(_frame(rows[::-1]), history_length=2)
    assert reversed_split.test.set_index("user_id").loc["u1", "item_id"] == "m3"
    assert reversed_split.valid.set_index("user_id").loc["u1", "item_id"] == "m4"
    assert reversed_split.train_items["u1"] == ["m1", "m2", "m5"]
    _assert_time_split(reversed_split)
    # Power: swapping u1's tied valid and test rows keeps every timestamp check true but breaks file order.
    valid, test = split.valid.copy(), split.test.copy()
    valid.loc[valid.user_id == "u1", "item_id"], test.loc[test.user_id == "u1", "item_id"] = "m5", "m4"
    with pytest.raises(AssertionError, match="tie not broken by file order for users \\['u1'\\]"):
        _assert_time_split(dataclasses.replace(split, valid=valid, test=test))


def test_time_split_check_catches_corrupted_splits(small_split):
    """The helper fails on deliberately broken splits, so the passing checks above have power."""
    user = small_split.test.user_id.iloc[0]
    # 1. Shuffled roles: the user's test interaction swapped with their first (earliest) training interaction.
    train, test = small_split.train.copy(), small_split.test.copy()
    first = train.index[train.user_id == user][0]
    held = test.index[test.user_id == user][0]
    for column in ("item_id", "timestamp"):
        train.at[first, column], test.at[held, column] = test.at[held, column], train.at[first, column]
    with pytest.raises(AssertionError, match=f"training interactions after validation for users \\['{user}'\\]"):
        _assert_time_split(dataclasses.replace(small_split, train=train, test=test))
    # 2. A shuffled split: leave-last-out by a random order of each user's interactions instead of time,
    # its rows carrying their true timestamps.
    data = small_split.data.interactions
    order = np.random.default_rng(0).permutation(len(data))
    shuffled = leave_last_out(InteractionData(data.assign(timestamp=order)), history_length=small_split.history_length)
    true_ts = data.set_index(["user_id", "item_id"])["timestamp"]

    def restore(rows):
        return rows.assign(timestamp=true_ts.loc[list(zip(rows.user_id, rows.item_id))].to_numpy())

    shuffled = dataclasses.replace(shuffled, data=small_split.data, train=restore(shuffled.train),
                                   valid=restore(shuffled.valid), test=restore(shuffled.test))
    with pytest.raises(AssertionError, match="training interactions after validation"):
        _assert_time_split(shuffled)
    # 3. A leaked history: the user's test item in their validation history.
    valid = small_split.valid.copy()
    row = valid.index[valid.user_id == user][0]
    leaked = small_split.test.set_index("user_id").loc[user, "item_id"]
    valid.at[row, "history"] = (leaked,) + valid.at[row, "history"][1:]
    with pytest.raises(AssertionError, match=f"user {user}: history .* has non-training items"):
        _assert_time_split(dataclasses.replace(small_split, valid=valid))
