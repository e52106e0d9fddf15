"""Side-feature tables through the pipeline (issue 14, item 2): tables as their own examples, joined onto the split
examples in Beam, their statistics computed in Beam, and side-feature models trained from the streamed examples.

The references are the in-memory path on the same data: ``write_split_examples`` joins the tables in pandas
(through the same cell conversion ``write_feature_table`` uses, so the join test checks the Beam join, not that
conversion), ``specs_from_split`` computes vocabularies and statistics from the tables, and a model trained on the
same rows in the same order must give the same loss after every batch (the in-memory model reads the tables
through ``feature_arrays``, independently of the files).
"""
import glob

import numpy as np
import pytest

import tfrec_recall  # noqa: F401
import tensorflow as tf

from tfrec_recall.config import load_config
from tfrec_recall.data import leave_last_out
from tfrec_recall.data.protocol import read_split_examples
from tfrec_recall.data.schema import DataError, InteractionData
from tfrec_recall.data.side_jobs import run_join_side_features
from tfrec_recall.data.side_tables import (CORPUS, SideFeatures, parse_table_row, read_side_features,
                                           write_feature_table)
from tfrec_recall.data.streaming import StreamingSplit, examples_dataset, write_split_examples, write_vocabularies
from tfrec_recall.evaluation.evaluate import evaluate
from tfrec_recall.features.vocabularies import specs_from_split

HISTORY_LENGTH = 10


@pytest.fixture(scope="module")
def gappy_split(small_data):
    """The small data with 5 items and 7 users missing from their tables: their columns are missing values."""
    data = InteractionData(small_data.interactions, small_data.user_features.iloc[7:],
                           small_data.item_features.iloc[5:], small_data.feature_kinds, name="gappy")
    return leave_last_out(data, history_length=HISTORY_LENGTH)


@pytest.fixture(scope="module")
def joined(gappy_split, tmp_path_factory):
    """(Beam-joined examples, in-memory-joined examples, the tables' files): split examples without side features
    and the two tables as table examples, joined by the Beam job (3 shards)."""
    root = tmp_path_factory.mktemp("side")
    data, side = gappy_split.data, SideFeatures.of_data(gappy_split.data)
    plain = write_split_examples(gappy_split, str(root / "plain"), num_shards=2, side_features=False)
    tables = {entity: write_feature_table(table, entity, getattr(side, entity), str(root / f"{entity}s.gz"))
              for entity, table in (("user", data.user_features), ("item", data.item_features))}
    beam = run_join_side_features(plain, str(root / "joined"), side, user_files=[tables["user"]],
                                  item_files=[tables["item"]], num_shards=3)
    reference = write_split_examples(gappy_split, str(root / "reference"))
    return beam, reference, tables


def _records(examples: str, split: str) -> list:
    """The split's examples as sorted text protos (NaN written as such), to compare as multisets."""
    out = []
    for path in sorted(glob.glob(f"{examples}/Split-{split}/*")):
        for record in tf.data.TFRecordDataset(path, "GZIP"):
            out.append(str(tf.train.Example.FromString(record.numpy())))
    return sorted(out)


# -- the format -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("columns, message", [
    ({"item": [("genres", "tags")]}, r"side feature 'genres': kind must be one of \['categorical', "),
    ({"user": [("history", "categorical")]}, r"user side-feature name must be .*none of .*got 'history'"),
    ({"user": [("age", "numeric")], "item": [("age", "numeric")]}, "side feature 'age' is declared twice"),
    ({"item": [("two words", "categorical")]}, "item side-feature name must be a letter then .*got 'two words'"),
])
def test_side_features_are_validated_naming_the_column(columns, message):
    with pytest.raises(ValueError, match=message):
        SideFeatures(**columns)


def test_side_features_json_round_trip_and_of_data(small_data):
    side = SideFeatures.of_data(small_data)
    assert side.user == (("segment", "categorical"), ("region", "categorical"), ("activity", "numeric"))
    assert side.item == (("category", "categorical"), ("tags", "multi_categorical"), ("price", "numeric"))
    assert SideFeatures.from_json(side.to_json()) == side and not SideFeatures()
    with pytest.raises(ValueError, match="expected an object with keys"):
        SideFeatures.from_json('{"users": []}')


def test_table_examples_round_trip_with_missing_values(gappy_split, joined, tmp_path):
    side, table = SideFeatures.of_data(gappy_split.data), gappy_split.data.item_features
    rows = [parse_table_row(r.numpy(), "item", side.item) for r in tf.data.TFRecordDataset(joined[2]["item"], "GZIP")]
    assert [key for key, _ in rows] == list(table.index)
    assert [values[:2] for _, values in rows] == list(zip(table["category"], table["tags"]))
    np.testing.assert_allclose([values[2] for _, values in rows], table["price"], rtol=1e-7)  # float32 in examples
    gaps = table.iloc[:3].copy()
    gaps.loc[gaps.index[0], "price"] = np.nan
    gaps.loc[gaps.index[1], "tags"] = None
    gaps.loc[gaps.index[2], "category"] = None
    path = write_feature_table(gaps, "item", side.item, str(tmp_path / "gaps.gz"))
    first = [values for _, values in (parse_table_row(r.numpy(), "item", side.item)
                                      for r in tf.data.TFRecordDataset(path, "GZIP"))]
    assert np.isnan(first[0][2]) and first[1][1] == () and first[2][0] == ""  # written absent, read as missing
    with pytest.raises(FileExistsError):
        write_feature_table(gaps, "item", side.item, path)


def test_a_mistyped_table_value_is_refused_naming_the_field():
    example = tf.train.Example()
    example.features.feature["item_id"].bytes_list.value.append(b"i1")
    example.features.feature["price"].bytes_list.value.append(b"cheap")
    with pytest.raises(DataError, match="field 'price': a numeric side feature holds bytes_list"):
        parse_table_row(example, "item", (("price", "numeric"),))
    example.features.feature["price"].Clear()
    example.features.feature["price"].float_list.value.extend([1.0, 2.0])
    with pytest.raises(DataError, match="field 'price': a numeric side feature must hold one value, got 2"):
        parse_table_row(example, "item", (("price", "numeric"),))
    example.features.feature["genres"].bytes_list.value.append(b"drama\nhorror")
    with pytest.raises(DataError, match=r"field 'genres': holds 'drama\\nhorror': a token must not contain a line"):
        parse_table_row(example, "item", (("genres", "multi_categorical"),))
    del example.features.feature["item_id"]
    with pytest.raises(DataError, match="field 'item_id': must hold one bytes or int64 value .*found nothing"):
        parse_table_row(example, "item", ())


def test_a_table_with_a_non_number_or_pandas_na_is_written_or_refused_naming_it(tmp_path):
    import pandas as pd
    table = pd.DataFrame({"item_id": ["a", "b"], "price": pd.array([1.5, None], dtype="Float64"),
                          "brand": pd.array(["x", None], dtype="string")}).set_index("item_id")
    columns = (("price", "numeric"), ("brand", "categorical"))
    path = write_feature_table(table, "item", columns, str(tmp_path / "na.gz"))
    rows = [parse_table_row(r.numpy(), "item", columns) for r in tf.data.TFRecordDataset(path, "GZIP")]
    assert rows[0] == ("a", (1.5, "x")) and rows[1][0] == "b" and np.isnan(rows[1][1][0]) and rows[1][1][1] == ""
    bad = pd.DataFrame({"item_id": ["a"], "price": ["cheap"]}).set_index("item_id")
    with pytest.raises(DataError, match="field 'price': the numeric side feature of 'a' is 'cheap', not a number"):
        write_feature_table(bad, "item", (("price", "numeric"),), str(tmp_path / "bad.gz"))
    assert not (tmp_path / "bad.gz").exists()


def test_a_constant_numeric_column_is_not_standardised_by_a_rounding_error():
    """numpy's variance of three 0.1s is about 1.9e-34, not 0: both the in-memory spec and the Beam statistics'
    (count, mean, variance) give variance 1 for a variance at rounding level, and keep a real one."""
    import pandas as pd
    from tfrec_recall.features.specs import NumericFeature
    assert NumericFeature.from_column("x", pd.Series([0.1] * 3)).variance == 1.0
    assert NumericFeature.from_moments("x", 3, 0.1, 0.0).variance == 1.0
    assert NumericFeature.from_moments("x", 0, 0.0, 0.0) == NumericFeature("x", mean=0.0, variance=1.0)
    assert NumericFeature.from_column("x", pd.Series([1.0, 3.0])).variance == 1.0  # (1 + 1) / 2: a real one
    assert NumericFeature.from_column("x", pd.Series([1.0, 5.0])).variance == 4.0


# -- the Beam join and statistics -------------------------------------------------------------------------------

def test_the_beam_join_writes_what_the_in_memory_join_writes(joined, gappy_split):
    """Every split (and the corpus: every item of the splits and the item table) holds the same examples, side
    columns included, missing ones filled with "" / NaN / an empty list, as the pandas join of the same tables."""
    beam, reference, _ = joined
    for split in ("train", "eval", "test", CORPUS):
        got, expected = _records(beam, split), _records(reference, split)
        assert got == expected and len(got) > 0, split
    assert len(_records(beam, CORPUS)) == len(gappy_split.data.items) == 200
    assert read_side_features(beam) == SideFeatures.of_data(gappy_split.data)


def test_a_table_with_a_repeated_id_fails_the_join_naming_it(joined, small_data, tmp_path):
    import pandas as pd
    side = SideFeatures(item=(("category", "categorical"),))
    table = small_data.item_features[["category"]]
    doubled = write_feature_table(pd.concat([table, table.iloc[:1]]), "item", side.item, str(tmp_path / "t.gz"))
    plain = str(tmp_path / "plain")
    import shutil
    shutil.copytree(joined[0], plain, ignore=shutil.ignore_patterns(f"Split-{CORPUS}"))
    with pytest.raises(Exception, match=f"2 rows of the item table have id '{table.index[0]}'"):
        run_join_side_features(plain, str(tmp_path / "out"), side, item_files=[doubled])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"side declares user columns \['segment'\]: user_files must name"):
        run_join_side_features(plain, str(tmp_path / "out"), SideFeatures(user=(("segment", "categorical"),)))


@pytest.fixture(scope="module")
def stream(joined, tmp_path_factory):
    vocabularies = str(tmp_path_factory.mktemp("vocabularies") / "v")
    write_vocabularies(joined[0], vocabularies)
    return StreamingSplit.from_examples(joined[0], vocabularies, HISTORY_LENGTH)


def test_a_user_table_alone_is_joined_and_the_corpus_is_the_splits_items(joined, gappy_split, tmp_path):
    side = SideFeatures(user=(("segment", "categorical"),))
    out = run_join_side_features(joined[0], str(tmp_path / "users_only"), side, user_files=[joined[2]["user"]])
    corpus = _records(out, CORPUS)
    assert len(corpus) == len(set(gappy_split.data.interactions["item_id"])) and "segment" not in corpus[0]
    train = _records(out, "train")
    assert len(train) == len(gappy_split.train) and all("segment" in r for r in train)


def test_a_streaming_split_refuses_side_examples_without_their_statistics(joined, stream, tmp_path):
    import shutil
    ids_only = shutil.copytree(stream.vocabulary_dir, tmp_path / "ids", ignore=shutil.ignore_patterns("side"))
    with pytest.raises(FileNotFoundError, match=r"the examples carry side features \['activity', .* but "
                                                r".*side/statistics.json does not exist"):
        StreamingSplit.from_examples(joined[0], str(ids_only), HISTORY_LENGTH)
    other = SideFeatures(user=(("segment", "categorical"),))
    with pytest.raises(ValueError, match="the side statistics in .* describe .* the examples"):
        StreamingSplit(stream.train_files, stream.valid_files, stream.test_files, stream.vocabulary_dir,
                       HISTORY_LENGTH, side=other)


def test_side_statistics_equal_the_in_memory_specs(stream, gappy_split):
    """Vocabularies, list widths and numeric mean / variance over the training entities' table rows, as
    ``specs_from_split`` computes them (the numbers went through float32 examples: rtol 1e-6)."""
    got = stream.side_specs(16)
    expected = specs_from_split(gappy_split, side_embedding_dim=16)
    for role, ids in (("query", ("user_id", "history")), ("candidate", ("item_id",))):
        reference = [s for s in expected[role] if s.name not in ids]
        assert [type(s) for s in got[role]] == [type(s) for s in reference] and len(reference) == 3
        for spec, want in zip(got[role], reference):
            if hasattr(want, "mean"):
                np.testing.assert_allclose([spec.mean, spec.variance], [want.mean, want.variance], rtol=1e-6)
            else:
                assert spec.vocabulary_tokens() == want.vocabulary and spec.width == want.width, spec.name


def _config(**overrides):
    return load_config("youtube_dnn", overrides={"use_side_features": True, "history_length": HISTORY_LENGTH,
                                                 "epochs": 1, **overrides})


class _BatchLosses(tf.keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def _losses(model, dataset) -> list:
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    record = _BatchLosses()
    model.fit(dataset, epochs=1, verbose=0, callbacks=[record])
    return record.losses


def test_streamed_side_feature_training_and_evaluation_equal_the_in_memory_ones(stream, joined, gappy_split):
    """A side-feature model (user and item columns, mixed negatives over the corpus with its item columns):
    the same loss after every batch streamed from the in-memory-joined files (same row order) or gathered from
    the tables; streamed evaluation, which embeds the corpus split, equals ``evaluate`` on the in-memory split."""
    from tfrec_recall.data.tfdata import make_dataset
    from tfrec_recall.training.build import build_model, set_seed, training_arrays
    from tfrec_recall.training.streaming import build_streaming_model, evaluate_streaming
    config = _config(negatives="mixed", num_negatives=16)
    set_seed(0)
    in_memory = build_model(config, gappy_split)
    expected = _losses(in_memory, make_dataset(training_arrays(in_memory, gappy_split), 64))
    ordered = StreamingSplit.from_examples(joined[1], stream.vocabulary_dir, HISTORY_LENGTH)
    set_seed(0)
    streamed = build_streaming_model(config, ordered)
    assert [s.name for s in streamed.candidate_tower.input_specs] == ["item_id", "category", "tags", "price"]
    widths = {s.name: s.width for s in streamed.training_feature_specs()}
    got = _losses(streamed, examples_dataset(ordered.train_files, widths, 64, schema=ordered.schema()))
    assert len(got) == int(np.ceil(len(gappy_split.train) / 64)) > 5
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    for which in ("valid", "test"):  # the Beam-joined files: other row order, same metrics
        assert evaluate_streaming(streamed, stream, which) == pytest.approx(evaluate(streamed, gappy_split, which),
                                                                            rel=1e-12)


def test_joined_examples_read_into_memory_bring_their_tables(joined, gappy_split):
    """The in-memory fallback (the Trainer for configurations that do not stream, the RetrievalEvaluator):
    the tables come back from the joined examples and give the same specs and metrics."""
    from tfrec_recall.training.build import build_model, set_seed
    split = read_split_examples(joined[0], HISTORY_LENGTH)
    assert list(split.data.items) == list(gappy_split.data.items)
    assert split.data.user_feature_names == gappy_split.data.user_feature_names
    set_seed(0)
    model = build_model(_config(), gappy_split)
    assert evaluate(model, split, "test") == pytest.approx(evaluate(model, gappy_split, "test"), rel=1e-12)
    ours, theirs = specs_from_split(split), specs_from_split(gappy_split)
    for role in ("query", "candidate"):
        assert [s.name for s in ours[role]] == [s.name for s in theirs[role]] and len(ours[role]) >= 4
        for mine, reference in zip(ours[role], theirs[role]):
            if hasattr(reference, "mean"):  # numbers went through float32 examples
                np.testing.assert_allclose([mine.mean, mine.variance], [reference.mean, reference.variance],
                                           rtol=1e-6)
            else:
                assert mine == reference, reference.name
