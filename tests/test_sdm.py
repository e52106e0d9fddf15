"""SDM (Lv et al. 2019, "SDM: Sequential Deep Matching Model for Online Large-scale Recommender System"): the
session rule, the user attention and the gate against NumPy references written from the paper's equations, the
tower's wiring (time order of the LSTM, what the short- and long-term parts read, padding, empty histories),
errors, serialisation, and the data it reads (history timestamps in the split, item side values)."""
import math

import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall import training
from tfrec_recall.config import ConfigError, load_config
from tfrec_recall.features import HISTORY_TIMES, IdFeature, SequenceFeature, SequenceTimesFeature
from tfrec_recall.layers.interest.sessions import GatedFusion, UserAttentionPooling, current_session
from tfrec_recall.layers.towers import SDMTower, tower_class
from tests.test_serialization import assert_keras_round_trips

RNG = np.random.default_rng(23)


# ----------------------------------------------------------------------------------------------------------
# NumPy references, from the paper's equations

def ref_session(times, mask, gap, max_length):
    """SDM Sec. 3.1 on a most-recent-first history: the latest behaviour, then each older one while it is real
    and at most ``gap`` older than the one before it, at most ``max_length`` behaviours."""
    out = [False] * len(times)
    for i in range(len(times)):
        if not mask[i] or i >= max_length:
            break
        if i > 0 and abs(times[i - 1] - times[i]) > gap:
            break
        out[i] = True
    return out


def ref_user_attention(vectors, mask, user, w):
    """SDM eq. 7-8 (and 9-10 per feature set): a_k = exp(x_k . (e_u W)) / sum_j exp(x_j . (e_u W)) over the real
    positions; output sum_k a_k x_k (0 without any real position)."""
    query = np.asarray(user, np.float64) @ np.asarray(w, np.float64)
    real = [k for k in range(len(vectors)) if mask[k]]
    if not real:
        return np.zeros(len(vectors[0]))
    scores = {k: float(np.dot(vectors[k], query)) for k in real}
    top = max(scores.values())
    total = sum(math.exp(s - top) for s in scores.values())
    return sum(math.exp(scores[k] - top) / total * np.asarray(vectors[k], np.float64) for k in real)


def ref_gate(user, short, long, w1, w2, w3, b):
    """SDM eq. 12: G = sigmoid(e_u W1 + s W2 + p W3 + b), o = (1 - G) * p + G * s."""
    g = 1.0 / (1.0 + np.exp(-(user @ w1 + short @ w2 + long @ w3 + b)))
    return (1.0 - g) * long + g * short


# ----------------------------------------------------------------------------------------------------------
# The blocks

def test_current_session_golden_table():
    times = [[100, 95, 80, 79, 0], [100, 40, 39, 38, 37], [50, 50, 50, 50, 50], [9, 8, 7, 0, 0], [0, 0, 0, 0, 0]]
    mask = [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]
    # gap 10, at most 3: row 0: gaps 5, 15 -> [T, T, F, F, F]; row 1: first gap 60 -> position 0 alone;
    # row 2: no gap, capped at 3; row 3: gaps 1, 1 then padding -> 3; row 4: empty.
    want = [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]
    got = current_session(tf.constant(times, tf.int64), tf.constant(np.array(mask, bool)), gap=10, max_length=3).numpy()
    np.testing.assert_array_equal(got, np.array(want, bool))
    for row in range(5):
        assert list(got[row]) == ref_session(times[row], mask[row], 10, 3)
    # Timestamps of unix-time size keep their second resolution (int64 in, float64 differences).
    big = tf.constant([[1_700_000_600, 1_700_000_000, 1_699_999_399]], tf.int64)
    np.testing.assert_array_equal(current_session(big, tf.ones([1, 3], tf.bool), 600, 10).numpy(), [[1, 1, 0]])


def test_current_session_matches_the_reference_on_random_histories():
    for _ in range(30):
        n = int(RNG.integers(0, 8))
        times = np.sort(RNG.integers(0, 100, size=8))[::-1].copy()
        mask = np.arange(8) < n
        gap, max_length = float(RNG.integers(0, 30)), int(RNG.integers(1, 9))
        got = current_session(tf.constant(times[None]), tf.constant(mask[None]), gap, max_length).numpy()[0]
        assert list(got) == ref_session(times, mask, gap, max_length)


def test_user_attention_pooling_matches_sdm_eq_7_8():
    layer = UserAttentionPooling(4)
    vectors = RNG.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
    user = RNG.normal(size=(3, 6)).astype(np.float32)
    got = layer(tf.constant(vectors), tf.constant(mask), tf.constant(user)).numpy()
    w = layer.query.kernel.numpy()
    assert w.shape == (6, 4) and not layer.query.use_bias
    for b in range(3):
        np.testing.assert_allclose(got[b], ref_user_attention(vectors[b], mask[b], user[b], w), rtol=1e-5, atol=1e-6)
    assert np.all(got[2] == 0.0)
    # Padded positions, however large, add nothing.
    scrambled = np.where(mask[..., None], vectors, 1e4).astype(np.float32)
    np.testing.assert_array_equal(layer(tf.constant(scrambled), tf.constant(mask), tf.constant(user)).numpy(), got)


def test_gated_fusion_matches_sdm_eq_12_and_golden_values():
    layer = GatedFusion(3)
    user, short, long = (RNG.normal(size=(4, w)).astype(np.float32) for w in (5, 3, 3))
    got = layer(tf.constant(user), tf.constant(short), tf.constant(long)).numpy()
    want = ref_gate(user, short, long, layer.from_user.kernel.numpy(), layer.from_short.kernel.numpy(),
                    layer.from_long.kernel.numpy(), layer.from_long.bias.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for dense in (layer.from_user, layer.from_short, layer.from_long):
        dense.kernel.assign(tf.zeros_like(dense.kernel))
    # All weights 0: G = sigmoid(0) = 1/2, o = (p + s) / 2.
    half = layer(tf.constant(user), tf.constant(short), tf.constant(long)).numpy()
    np.testing.assert_allclose(half, (short + long) / 2, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The tower

L, D = 6, 8
VOCAB = tuple(f"i{j}" for j in range(12))
HISTORY = SequenceFeature("history", D, vocabulary=VOCAB, max_len=L)
TIMES = SequenceTimesFeature(HISTORY_TIMES, max_len=L)
USER = IdFeature("user_id", 4, vocabulary=("u1", "u2"))
GENRE = tuple(f"g{j % 3}" if j != 5 else "" for j in range(12))  # item i5 has no genre
INPUTS = {"user_id": tf.constant(["u1", "u2", "u1", "u2"]),
          "history": tf.constant([["i1", "i2", "i3", "i4", "i5", "i6"], ["i3", "i7", "i8", "", "", ""],
                                  ["i9", "", "", "", "", ""], ["", "", "", "", "", ""]]),
          HISTORY_TIMES: tf.constant([[1000, 990, 980, 500, 400, 300], [700, 100, 90, 0, 0, 0],
                                      [50, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], tf.int64)}
# session_gap 60: row 0's session is i1, i2, i3 (then a 480 gap); row 1's is i3 alone; row 2's i9.
SESSIONS = [3, 1, 1, 0]


def make_sdm(**kwargs):
    tf.keras.utils.set_random_seed(6)
    args = {**dict(output_dim=5, session_gap=60, session_length=4, num_heads=2, item_side={"genre": GENRE},
                   side_embedding_dim=3, name="query"), **kwargs}
    tower = SDMTower([USER, HISTORY, TIMES], **args)
    tower(INPUTS)
    return tower


def parts(tower, inputs=INPUTS):
    """(user profile, items [B, L, width], session [B, L], long-term mask) as the tower computes them."""
    fields = tower.fields(inputs)
    sequence, mask = tower.encode_sequence(inputs, "history")
    items = tf.concat([sequence] + tower.side_vectors(inputs), axis=-1)
    session = tower.sessions(inputs, mask)
    return tower.profile(fields), sequence, items, session, mask & ~session


def test_registered_and_output_normalised_finite():
    assert tower_class("sdm") is SDMTower and SDMTower.query_only and not SDMTower.multi_interest
    tower = make_sdm()
    out = tower(INPUTS).numpy()
    assert out.shape == (4, 5) and np.all(np.isfinite(out))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert [s.name for s in tower.input_specs] == ["user_id", "history", HISTORY_TIMES]
    _, _, _, session, _ = parts(tower)
    np.testing.assert_array_equal(session.numpy().sum(axis=1), SESSIONS)


def test_the_session_lstm_runs_in_time_order():
    """Short term = user attention over MultiHead(LSTM(session items, oldest first)): rebuilt here per user from
    the session's items reversed by hand, with the tower's own layers."""
    tower = make_sdm()
    user, _, items, session, _ = parts(tower)
    got = tower.short_term(items, session, user).numpy()
    for b, n in enumerate(SESSIONS[:3]):
        chronological = items[b:b + 1, :n][:, ::-1]  # oldest first
        states = tower.lstm(chronological)
        states = tower.session_attention(states, states)
        want = tower.short_pooling(states, tf.ones([1, n], tf.bool), user[b:b + 1]).numpy()
        np.testing.assert_allclose(got[b:b + 1], want, rtol=1e-4, atol=1e-5)
    assert np.all(got[3] == 0.0)  # no session


def test_short_term_reads_the_session_and_long_term_the_behaviours_before_it():
    tower = make_sdm()
    base = [x.numpy() for x in parts(tower)]
    short = tower.short_term(*[tf.constant(base[i]) for i in (2, 3, 0)]).numpy()
    long = tower.long_term(tf.constant(base[1]), tower.side_vectors(INPUTS), tf.constant(base[4]),
                           tf.constant(base[0])).numpy()
    # Row 0: i5 (position 4) is before the session; i2 (position 1) is in it.
    for position, in_session in ((4, False), (1, True)):
        history = INPUTS["history"].numpy().astype(str)
        history[0, position] = "i11"
        changed = {**INPUTS, "history": tf.constant(history)}
        user, sequence, items, session, before = parts(tower, changed)
        new_short = tower.short_term(items, session, user).numpy()
        new_long = tower.long_term(sequence, tower.side_vectors(changed), before, user).numpy()
        assert (np.abs(new_short[0] - short[0]).max() > 1e-5) == in_session
        assert (np.abs(new_long[0] - long[0]).max() > 1e-6) == (not in_session)
    # A history wholly in its session has no long-term behaviour: p = tanh(W 0 + b).
    np.testing.assert_allclose(long[2], np.tanh(tower.long_projection.bias.numpy()), rtol=1e-6)


def test_long_term_pools_each_feature_set_by_user_attention():
    """SDM eq. 9-11: one user attention over the item ids and one over the genres of the behaviours before the
    session, concatenated, then tanh(z W + b)."""
    tower = make_sdm()
    user, sequence, _, _, before = (x.numpy() for x in parts(tower))
    genres = tower.side_vectors(INPUTS)[0].numpy()
    pools = tower.long_pooling
    for b in range(2):
        z = np.concatenate([ref_user_attention(sequence[b], before[b], user[b], pools[0].query.kernel.numpy()),
                            ref_user_attention(genres[b], before[b], user[b], pools[1].query.kernel.numpy())])
        want = np.tanh(z @ tower.long_projection.kernel.numpy() + tower.long_projection.bias.numpy())
        got = tower.long_term(tf.constant(sequence), [tf.constant(genres)], tf.constant(before), tf.constant(user))
        np.testing.assert_allclose(got.numpy()[b], want, rtol=1e-5, atol=1e-6)


def test_item_side_values_are_looked_up_per_history_position():
    tower = make_sdm()
    codes = tf.gather(tower._side_codes["genre"], tower.item_lookup(INPUTS["history"])).numpy()
    # i1 -> g1, i2 -> g2, i3 -> g0, i4 -> g1, i5 -> none (0), i6 -> g0; codes are 1 + the sorted label's index.
    np.testing.assert_array_equal(codes[0], [2, 3, 1, 2, 0, 1])
    np.testing.assert_array_equal(codes[3], [0] * L)  # padding


def test_the_output_is_the_gated_fusion_through_the_head():
    tower = make_sdm(l2_normalize=False)
    user, sequence, items, session, before = parts(tower)
    short = tower.short_term(items, session, user).numpy()
    long = tower.long_term(sequence, tower.side_vectors(INPUTS), before, user).numpy()
    f = tower.fusion
    fused = ref_gate(user.numpy(), short, long, f.from_user.kernel.numpy(), f.from_short.kernel.numpy(),
                     f.from_long.kernel.numpy(), f.from_long.bias.numpy())
    kernel, bias = tower.projection.kernel.numpy(), tower.projection.bias.numpy()
    out = tower(INPUTS).numpy()
    np.testing.assert_allclose(out[:3], fused[:3] @ kernel + bias, rtol=1e-4, atol=1e-5)
    # The empty history gets the learned default vector instead.
    np.testing.assert_allclose(out[3], tower.empty_history.numpy() @ kernel + bias, rtol=1e-5, atol=1e-6)


def test_padding_and_padded_times_never_change_the_output():
    tower = make_sdm()
    out = tower(INPUTS).numpy()
    times = INPUTS[HISTORY_TIMES].numpy().copy()
    times[INPUTS["history"].numpy() == b""] = 10 ** 9
    np.testing.assert_array_equal(tower({**INPUTS, HISTORY_TIMES: tf.constant(times)}).numpy(), out)
    embedding = tower.encoder._embeddings["history"]
    table = embedding.embeddings.numpy()
    table[0] = 100.0  # the padding row ("" is StringLookup's mask token, index 0)
    embedding.embeddings.assign(table)
    np.testing.assert_array_equal(tower(INPUTS).numpy(), out)


def test_the_session_gap_decides_what_is_short_term():
    wide, narrow = make_sdm(session_gap=10 ** 6), make_sdm(session_gap=0)
    for tower, want in ((wide, [4, 3, 1, 0]), (narrow, [1, 1, 1, 0])):  # session_length 4 caps the wide one
        mask = tower.encode_sequence(INPUTS, "history")[1]
        np.testing.assert_array_equal(tower.sessions(INPUTS, mask).numpy().sum(axis=1), want)


def test_a_tower_without_profile_fields_uses_a_learned_profile():
    tf.keras.utils.set_random_seed(2)
    tower = SDMTower([HISTORY, TIMES], output_dim=5, session_gap=60)
    out = tower(INPUTS).numpy()
    assert np.all(np.isfinite(out))
    profile = tower.profile(tower.fields(INPUTS)).numpy()
    np.testing.assert_array_equal(profile, np.tile(tower.default_profile.numpy(), (4, 1)))


SDM_ERRORS = [
    (lambda: SDMTower([USER, HISTORY]), r"SDMTower needs exactly one SequenceTimesFeature \(the history's "
                                        r"timestamps\) among its features, got \['user_id:id', 'history:sequence'\]"),
    (lambda: SDMTower([USER, TIMES]), r"SDMTower needs exactly one SequenceFeature \(the history\)"),
    (lambda: SDMTower([HISTORY, SequenceTimesFeature(HISTORY_TIMES, max_len=4)]),
     r"history_times.max_len \(4\) must equal the history's max_len \(6\)"),
    (lambda: SDMTower([HISTORY, TIMES], session_gap=-1), r"session_gap must be a finite number >= 0, got -1"),
    (lambda: SDMTower([HISTORY, TIMES], session_length=0), r"session_length must be a positive integer, got 0"),
    (lambda: SDMTower([HISTORY, TIMES], num_heads=3), r"num_heads \(3\) must divide the history embedding width "
                                                      r"\(8\)"),
    (lambda: SDMTower([HISTORY, TIMES], attention_dropout=1.0), r"attention_dropout must be in \[0, 1\), got 1.0"),
    (lambda: SDMTower([HISTORY, TIMES], item_side={"genre": ("g0",)}),
     r"item_side\['genre'\] has 1 values but the history vocabulary has 12 items"),
]


@pytest.mark.parametrize("make,message", SDM_ERRORS, ids=[m.split(" ")[0] for _, m in SDM_ERRORS])
def test_constructor_errors_name_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("overrides, message", [
    ({"session_gap": -5}, r"config key 'session_gap': must be a finite number >= 0 \(in the timestamps' unit\), "
                          r"got -5"),
    ({"session_length": 0}, r"config key 'session_length': must be >= 1, got 0"),
    ({"query_tower": "sdm", "use_history": False, "use_user_id": True}, r"config key 'query_tower': sdm reads"),
])
def test_bad_sdm_config_fails_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("youtube_dnn", overrides=overrides)


def test_round_trips_config_and_savedmodel(tmp_path):
    tower = make_sdm()
    out = tower(INPUTS).numpy()
    clone = assert_keras_round_trips(tower)
    assert clone.get_config() == tower.get_config()
    clone(INPUTS)
    clone.set_weights(tower.get_weights())
    np.testing.assert_allclose(clone(INPUTS).numpy(), out, rtol=1e-6)
    tower.save(str(tmp_path / "sdm"), save_format="tf", include_optimizer=False)
    loaded = tf.keras.models.load_model(str(tmp_path / "sdm"), compile=False)
    assert type(loaded) is SDMTower
    np.testing.assert_allclose(loaded(INPUTS).numpy(), out, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Data: the split's history timestamps and the item side values of a RunConfig-built tower

def test_split_histories_carry_their_timestamps(small_split):
    train = small_split.train
    for _, row in train.head(40).iterrows():
        assert len(row["history_times"]) == len(row["history"])
        assert list(row["history_times"]) == sorted(row["history_times"], reverse=True)  # most recent first
        assert all(t <= row["timestamp"] for t in row["history_times"])  # causal
    user = small_split.test["user_id"].iloc[0]
    test_row = small_split.test.iloc[0]
    assert list(test_row["history_times"]) == small_split.train_times[user][::-1][:small_split.history_length]


def test_build_model_gives_sdm_the_times_and_the_item_categories(small_split):
    config = load_config("youtube_dnn", overrides={"query_tower": "sdm", "embedding_dim": 8, "output_dim": 8,
                                                   "hidden_units": [8], "session_gap": 3600.0})
    tower = training.build_model(config, small_split).query_tower
    assert isinstance(tower, SDMTower) and tower.session_gap == 3600.0
    assert HISTORY_TIMES in tower.feature_names
    side = small_split.data.item_features
    assert set(tower.item_side) == {c for c in side.columns
                                    if small_split.data.feature_kinds[c] in ("categorical", "multi_categorical")}
    name = next(iter(tower.item_side))
    vocabulary = tower.encoder.specs[tower.history_index].vocabulary
    first = side[name].reindex(list(vocabulary))
    expected = [(v[0] if len(v) else "") if isinstance(v, (tuple, list, np.ndarray)) else ("" if v is None or v != v
                                                                                            else str(v))
                for v in first]
    assert list(tower.item_side[name]) == [str(e) for e in expected]


def test_a_split_without_history_times_is_refused_naming_the_key(small_split):
    import dataclasses
    bare = dataclasses.replace(small_split, train=small_split.train.drop(columns=[HISTORY_TIMES]), train_times=None)
    config = load_config("youtube_dnn", overrides={"query_tower": "sdm"})
    with pytest.raises(ConfigError, match=r"config key 'query_tower': sdm reads the history's timestamps "
                                          r"\(history_times\), which this split does not carry"):
        training.build_model(config, bare)
