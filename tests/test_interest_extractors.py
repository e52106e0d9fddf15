"""The sequence encoder and multi-interest extractors (tfrec_recall.layers.interest.extractors) and the towers
built on them (MIND, ComiRec-DR, ComiRec-SA, SASRec), against NumPy references written from the papers'
formulas (plain loops, float64), golden values, property tests of the causal encoder, the towers' interest
masks, padding and empty histories, and configuration / SavedModel round trips."""
import math

import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall.features import IdFeature, SequenceFeature
from tfrec_recall.layers.interest.extractors import (B2IRouting, CapsuleRouting, CausalSelfAttentionEncoder,
                                                     SelfAttentiveExtraction, dynamic_routing, squash)
from tfrec_recall.layers.towers import (ComiRecDRTower, ComiRecSATower, MINDTower, MultiInterestTower,
                                        SelfAttentiveTower, tower_class)
from tests.test_serialization import assert_keras_round_trips

RNG = np.random.default_rng(17)
B, L, D, K = 3, 5, 4, 3
SEQUENCE = RNG.normal(size=(B, L, D)).astype(np.float32)  # padded slots hold random values too: never read
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)  # 5, 2 and 0 real behaviours

HISTORY = SequenceFeature("history", vocabulary=tuple(f"i{j}" for j in range(20)), embedding_dim=8, max_len=6)
USER = IdFeature("user_id", vocabulary=("u1", "u2"), embedding_dim=4)
SPECS = [USER, HISTORY]
INPUTS = {"user_id": tf.constant(["u1", "u2", "u1", "zz"]),
          "history": tf.constant([["i1", "i2", "i3", "i4", "i5", "i6"],
                                  ["i3", "i7", "", "", "", ""],  # shorter than K = 3
                                  ["i9", "", "", "", "", ""],
                                  ["", "", "", "", "", ""]])}  # empty
EMPTY_ROW = 3


# ----------------------------------------------------------------------------------------------------------
# NumPy references, written from the formulas (plain loops, float64)

def ref_squash(z):
    """Sabour et al. 2017, eq. 1 (MIND eq. 5): squash(z) = ||z||^2 / (1 + ||z||^2) * z / ||z||; 0 for z = 0."""
    z = np.asarray(z, np.float64)
    norm = math.sqrt(sum(float(x) ** 2 for x in z))
    if norm == 0.0:
        return np.zeros_like(z)
    return norm ** 2 / (1.0 + norm ** 2) * z / norm


def ref_routing(p, b, iterations):
    """Routing by agreement (Sabour et al. 2017, Procedure 1; MIND, Li et al. 2019, Algorithm 1, lines 4-10)
    over the real behaviours i = 0..n-1 and interests j = 0..K-1: ``p[i][j]`` the prediction p_{j|i}, ``b[j][i]``
    the starting logits. Each round: w_ij = exp(b_ij) / sum_k exp(b_ik) (softmax over the interests);
    z_j = sum_i w_ij p_{j|i}; u_j = squash(z_j); then, except in the last round, b_ij += u_j . p_{j|i}.
    Returns [u_1 .. u_K]; with no behaviour, every z_j = 0 and u_j = 0."""
    n, k_count = len(p), len(b)
    b = [[float(b[j][i]) for i in range(n)] for j in range(k_count)]
    dim = len(p[0][0]) if n else 0
    interests = []
    for r in range(iterations):
        w = [[math.exp(b[j][i]) / sum(math.exp(b[k][i]) for k in range(k_count)) for j in range(k_count)]
             for i in range(n)]
        interests = []
        for j in range(k_count):
            z = np.zeros(dim)
            for i in range(n):
                z = z + w[i][j] * p[i][j]
            interests.append(ref_squash(z))
        if r < iterations - 1:
            for j in range(k_count):
                for i in range(n):
                    b[j][i] += float(np.dot(interests[j], p[i][j]))
    return np.array(interests)


def real_positions(mask_row):
    return [i for i in range(len(mask_row)) if mask_row[i]]


def ref_b2i(sequence_row, mask_row, bilinear, initial_logits, iterations, num_capsules=None):
    """MIND's B2I dynamic routing (Li et al. 2019, Sec. 3.3, Algorithm 1): p_{j|i} = e_i S with one bilinear map
    S shared by every behaviour-interest pair, b_ij started from the fixed draw ``initial_logits`` [K, L] (at the
    behaviour's position i), routing over the real behaviours only, into the first ``num_capsules`` capsules
    (line 1's K'_u; default all K). Returns the K interests [K, d], the capsules not routed into 0."""
    real = real_positions(mask_row)
    s = np.asarray(bilinear, np.float64)
    k_count = len(initial_logits)
    used = k_count if num_capsules is None else num_capsules
    out = np.zeros((k_count, s.shape[1]))
    if not real:
        return out
    p = [[np.asarray(sequence_row[i], np.float64) @ s for _ in range(used)] for i in real]
    b = [[initial_logits[j][i] for i in real] for j in range(used)]
    out[:used] = ref_routing(p, b, iterations)
    return out


def ref_capsule(sequence_row, mask_row, maps, iterations):
    """ComiRec-DR (Cen et al. 2020, Sec. 3.2): p_{j|i} = e_i W_ij with a map W_ij for each behaviour position
    i and interest j (``maps`` [L, K, d, d]), b_ij started at 0, routing over the real behaviours only."""
    real = real_positions(mask_row)
    maps = np.asarray(maps, np.float64)
    k_count = maps.shape[1]
    if not real:
        return np.zeros((k_count, maps.shape[3]))
    p = [[np.asarray(sequence_row[i], np.float64) @ maps[i, j] for j in range(k_count)] for i in real]
    return ref_routing(p, [[0.0] * len(real) for _ in range(k_count)], iterations)


def ref_self_attentive(sequence_row, mask_row, w1, w2):
    """ComiRec-SA (Cen et al. 2020, eq. 2-3): for each interest k, a_{k,i} = softmax over the real positions i
    of w_{2,k}^T tanh(W_1 h_i) (no biases; ``w1`` [d, units], ``w2`` [units, K] as Dense kernels), and interest
    k = sum_i a_{k,i} h_i. Returns (attention [K, L], 0 on padding; interests [K, d], zeros with no behaviour)."""
    real = real_positions(mask_row)
    w1, w2 = np.asarray(w1, np.float64), np.asarray(w2, np.float64)
    h = np.asarray(sequence_row, np.float64)
    units, k_count = w2.shape
    attention = np.zeros((k_count, len(h)))
    interests = np.zeros((k_count, h.shape[1]))
    for k in range(k_count):
        scores = {}
        for i in real:
            hidden = [math.tanh(sum(h[i, c] * w1[c, u] for c in range(h.shape[1]))) for u in range(units)]
            scores[i] = sum(w2[u, k] * hidden[u] for u in range(units))
        if not real:
            continue
        top = max(scores.values())
        total = sum(math.exp(s - top) for s in scores.values())
        for i in real:
            attention[k, i] = math.exp(scores[i] - top) / total
            interests[k] += attention[k, i] * h[i]
    return attention, interests


# ----------------------------------------------------------------------------------------------------------
# squash and dynamic routing

def test_squash_matches_reference_and_golden_values():
    z = RNG.normal(size=(4, 3)).astype(np.float32) * np.array([[0.0], [0.1], [1.0], [10.0]], np.float32)
    got = squash(tf.constant(z)).numpy()
    np.testing.assert_allclose(got, np.array([ref_squash(row) for row in z]), rtol=1e-5, atol=1e-7)
    assert np.all(got[0] == 0.0)  # squash(0) = 0, no NaN
    # z = [3, 4]: ||z|| = 5, ||z||^2 = 25 -> 25 / 26 * [3, 4] / 5 = [15 / 26, 20 / 26]
    np.testing.assert_allclose(squash(tf.constant([[3.0, 4.0]])).numpy(), [[15 / 26, 20 / 26]], rtol=1e-6)


def test_dynamic_routing_golden_values():
    p = tf.constant([[[1.0, 2.0, 2.0]]])  # one user, one behaviour, ||p|| = 3
    # One interest, one round: w = 1, z = p, squash: 9 / 10 * p / 3 = [0.3, 0.6, 0.6].
    one = dynamic_routing(p, tf.zeros([1, 1, 1]), tf.constant([[True]]), iterations=1).numpy()
    np.testing.assert_allclose(one, [[[0.3, 0.6, 0.6]]], rtol=1e-6)
    # Two interests with logits [0, ln 3]: w = [1/4, 3/4].
    # z_1 = p / 4, ||z_1||^2 = 9 / 16 -> (9/16) / (25/16) * p / 3 = 9 / 25 * [1, 2, 2] / 3 = [0.12, 0.24, 0.24]
    # z_2 = 3 p / 4, ||z_2||^2 = 81 / 16 -> (81/16) / (97/16) * p / 3 = [27, 54, 54] / 97
    two = dynamic_routing(p, tf.constant([[[0.0], [math.log(3.0)]]]), tf.constant([[True]]), iterations=1).numpy()
    np.testing.assert_allclose(two, [[[0.12, 0.24, 0.24], [27 / 97, 54 / 97, 54 / 97]]], rtol=1e-5)
    # A padded behaviour, however large, adds nothing: the same answers.
    padded = tf.constant([[[1.0, 2.0, 2.0], [50.0, -70.0, 9.0]]])
    again = dynamic_routing(padded, tf.constant([[[0.0, 5.0], [math.log(3.0), -5.0]]]), tf.constant([[True, False]]),
                            iterations=1).numpy()
    np.testing.assert_allclose(again, two, rtol=1e-5)


@pytest.mark.parametrize("iterations", [1, 3])
def test_b2i_routing_matches_mind_algorithm_1(iterations):
    tf.keras.utils.set_random_seed(0)
    layer = B2IRouting(num_interests=K, iterations=iterations, routing_std=1.0, seed=3)
    got = layer(tf.constant(SEQUENCE), tf.constant(MASK)).numpy()
    assert got.shape == (B, K, D)
    logits = layer.initial_logits(L).numpy()
    assert logits.shape == (K, L)
    want = np.array([ref_b2i(SEQUENCE[b], MASK[b], layer.bilinear.numpy(), logits, iterations) for b in range(B)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[2] == 0.0)  # no behaviour: every z_j = 0
    assert np.abs(got[0, 0] - got[0, 1]).max() > 1e-3  # the random start separates the interests


def test_b2i_initial_logits_are_a_fixed_seeded_normal_draw():
    layer = B2IRouting(num_interests=K, routing_std=1.0, seed=3)
    first = layer.initial_logits(L).numpy()
    np.testing.assert_array_equal(layer.initial_logits(L).numpy(), first)  # the same for every user and call
    np.testing.assert_array_equal(B2IRouting(num_interests=K, routing_std=1.0, seed=3).initial_logits(L).numpy(),
                                  first)
    assert np.abs(B2IRouting(num_interests=K, seed=4).initial_logits(L).numpy() - first).max() > 1e-3
    # N(0, sigma^2): the same standard draw scaled by routing_std; sigma = 0 starts every logit at 0
    np.testing.assert_allclose(B2IRouting(num_interests=K, routing_std=2.5, seed=3).initial_logits(L).numpy(),
                               2.5 * first, rtol=1e-6)
    assert np.all(B2IRouting(num_interests=K, routing_std=0.0, seed=3).initial_logits(L).numpy() == 0.0)


@pytest.mark.parametrize("iterations", [1, 3])
def test_capsule_routing_matches_comirec_dr(iterations):
    tf.keras.utils.set_random_seed(1)
    layer = CapsuleRouting(num_interests=K, iterations=iterations)
    got = layer(tf.constant(SEQUENCE), tf.constant(MASK)).numpy()
    assert layer.maps.shape == (L, K, D, D)
    want = np.array([ref_capsule(SEQUENCE[b], MASK[b], layer.maps.numpy(), iterations) for b in range(B)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[2] == 0.0)


def test_capsule_routing_with_maps_shared_over_positions_matches_the_reference():
    """maps="per_interest": W_ij = W_j for every position i, i.e. the per-position reference with the one map of
    each interest repeated at every position."""
    tf.keras.utils.set_random_seed(1)
    layer = CapsuleRouting(num_interests=K, iterations=3, maps="per_interest")
    got = layer(tf.constant(SEQUENCE), tf.constant(MASK)).numpy()
    assert layer.maps.shape == (K, D, D)  # L times fewer weights than per position
    repeated = np.broadcast_to(layer.maps.numpy()[None], (L, K, D, D))
    want = np.array([ref_capsule(SEQUENCE[b], MASK[b], repeated, 3) for b in range(B)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # No position in the maps: any length works after building, and the answers do not depend on it.
    longer = np.concatenate([SEQUENCE, np.zeros((B, 2, D), np.float32)], axis=1)
    again = layer(tf.constant(longer), tf.constant(np.pad(MASK, [(0, 0), (0, 2)]))).numpy()
    np.testing.assert_allclose(again, got, rtol=1e-5, atol=1e-6)


def test_capsule_routing_needs_a_fixed_length():
    with pytest.raises(ValueError,
                       match=r"CapsuleRouting needs a fixed sequence length .* got shape \(None, None, 4\)"):
        CapsuleRouting(num_interests=K).build(tf.TensorShape([None, None, 4]))


# ----------------------------------------------------------------------------------------------------------
# ComiRec-SA's self-attentive extraction

def test_self_attentive_extraction_matches_comirec_sa():
    tf.keras.utils.set_random_seed(2)
    layer = SelfAttentiveExtraction(num_interests=K, attention_units=6)
    got = layer(tf.constant(SEQUENCE), tf.constant(MASK)).numpy()
    attention = layer.attention(tf.constant(SEQUENCE), tf.constant(MASK)).numpy()
    assert layer.hidden.kernel.shape == (D, 6) and layer.heads.kernel.shape == (6, K)
    assert not layer.hidden.use_bias and not layer.heads.use_bias
    for b in range(B):
        want_attention, want = ref_self_attentive(SEQUENCE[b], MASK[b], layer.hidden.kernel.numpy(),
                                                  layer.heads.kernel.numpy())
        np.testing.assert_allclose(attention[b], want_attention, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(attention[:2].sum(axis=-1), 1.0, rtol=1e-6)  # a distribution over the real ones
    assert np.all(got[2] == 0.0) and np.all(attention[2] == 0.0)  # empty history -> zeros


def test_self_attentive_extraction_golden_uniform_attention():
    layer = SelfAttentiveExtraction(num_interests=2, attention_units=3)
    seq = tf.constant([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])
    mask = tf.constant([[True, True, False]])
    layer(seq, mask)
    layer.heads.kernel.assign(tf.zeros([3, 2]))
    # w_2 = 0: every real position scores 0 -> a = [1/2, 1/2, 0]; interest = ([1, 2] + [3, 4]) / 2 = [2, 3]
    np.testing.assert_allclose(layer.attention(seq, mask).numpy(), [[[0.5, 0.5, 0.0]] * 2], rtol=1e-6)
    np.testing.assert_allclose(layer(seq, mask).numpy(), [[[2.0, 3.0], [2.0, 3.0]]], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# SASRec's causal encoder: property tests

def causal_encoder():
    tf.keras.utils.set_random_seed(3)
    encoder = CausalSelfAttentionEncoder(max_length=L, num_blocks=2, num_heads=2, dropout=0.3)
    return encoder, encoder(tf.constant(SEQUENCE), tf.constant(MASK), training=False).numpy()


def test_causal_encoder_attends_to_older_behaviours_only():
    """Most recent first: position i attends to j >= i. Changing behaviour p changes exactly the outputs at the
    positions i <= p (p and the newer ones) and leaves the older ones (i > p) unchanged."""
    encoder, base = causal_encoder()
    assert base.shape == (B, L, D)
    for b, p in [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1)]:
        changed = SEQUENCE.copy()
        changed[b, p] += np.array([1.0, -0.5, 0.0, 0.5], np.float32)  # not a constant shift, which the norms undo
        out = encoder(tf.constant(changed), tf.constant(MASK), training=False).numpy()
        np.testing.assert_allclose(out[b, p + 1:], base[b, p + 1:], rtol=0, atol=1e-6)
        for i in range(p + 1):
            assert np.abs(out[b, i] - base[b, i]).max() > 1e-4, (b, p, i)
        others = [r for r in range(B) if r != b]
        np.testing.assert_allclose(out[others], base[others], rtol=0, atol=1e-6)  # users are independent
    np.testing.assert_array_equal(CausalSelfAttentionEncoder.last_state(tf.constant(base)).numpy(), base[:, 0])


def test_causal_encoder_ignores_padding():
    encoder, base = causal_encoder()
    assert np.all(base[~MASK] == 0.0)  # padded positions output 0
    scrambled = np.where(MASK[..., None], SEQUENCE, 1e3 * RNG.normal(size=SEQUENCE.shape)).astype(np.float32)
    np.testing.assert_array_equal(encoder(tf.constant(scrambled), tf.constant(MASK), training=False).numpy(), base)
    # Nor attended to: 2 behaviours padded to L have the states of the same 2 behaviours alone (length 2, the same
    # positions), which a key mask letting real positions attend to the (zeroed) padded ones would change.
    short = encoder(tf.constant(SEQUENCE[1:2, :2]), tf.constant(MASK[1:2, :2]), training=False).numpy()
    np.testing.assert_allclose(short[0], base[1, :2], rtol=1e-5, atol=1e-6)


def test_causal_encoder_is_deterministic_at_inference_and_drops_out_in_training():
    encoder, base = causal_encoder()
    np.testing.assert_array_equal(encoder(tf.constant(SEQUENCE), tf.constant(MASK), training=False).numpy(), base)
    np.testing.assert_array_equal(encoder(tf.constant(SEQUENCE), tf.constant(MASK)).numpy(), base)
    trained = encoder(tf.constant(SEQUENCE), tf.constant(MASK), training=True).numpy()
    assert np.abs(trained[0] - base[0]).max() > 1e-3  # dropout 0.3 is active only in training
    assert np.all(trained[~MASK] == 0.0)


# ----------------------------------------------------------------------------------------------------------
# The towers

TOWER_CASES = [(MINDTower, dict(num_interests=K, routing_iterations=2)),
               (ComiRecDRTower, dict(num_interests=K)),
               (ComiRecSATower, dict(num_interests=K, attention_units=6)),
               (ComiRecSATower, dict(num_interests=K, attention_units=6, encoder_blocks=1, encoder_heads=2,
                                     attention_dropout=0.1)),
               (SelfAttentiveTower, dict(num_blocks=1, num_heads=2, attention_dropout=0.1)),
               (ComiRecDRTower, dict(num_interests=K, routing_maps="per_interest"))]
TOWER_IDS = ["mind", "comirec_dr", "comirec_sa", "comirec_sa_encoder", "self_attentive", "comirec_dr_per_interest"]


def make_tower(cls, kwargs, **extra):
    tf.keras.utils.set_random_seed(4)
    tower = cls(SPECS, **{"hidden_units": (6,), "output_dim": 5, "name": "query", **kwargs, **extra})
    tower(INPUTS)
    return tower


def test_registered_names():
    assert tower_class("mind") is MINDTower and tower_class("comirec_dr") is ComiRecDRTower
    assert tower_class("comirec_sa") is ComiRecSATower and tower_class("self_attentive") is SelfAttentiveTower
    assert all(issubclass(c, MultiInterestTower) and c.multi_interest and c.query_only
               for c in (MINDTower, ComiRecDRTower, ComiRecSATower))
    assert SelfAttentiveTower.query_only and not SelfAttentiveTower.multi_interest


def history_of(n):
    return [f"i{j}" for j in range(n)] + [""] * (17 - n)


def test_mind_interest_mask_golden_table():
    """MIND eq. 4: K_u = max(1, min(K, floor(log2 n))), here with K = 3."""
    lengths = [0, 1, 2, 3, 4, 7, 8, 15, 16, 17]
    # floor(log2 n): -, 0, 1, 1, 2, 2, 3, 3, 4, 4 -> clipped to [1, 3]
    want = [1, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    tower = MINDTower([USER, SequenceFeature("history", vocabulary=tuple(f"i{j}" for j in range(20)), embedding_dim=4,
                                             max_len=17)], num_interests=3, output_dim=2)
    inputs = {"user_id": tf.constant(["u1"] * len(lengths)), "history": tf.constant([history_of(n) for n in lengths])}
    np.testing.assert_array_equal(tower.history_lengths(inputs).numpy(), lengths)
    mask = tower.interest_mask(inputs).numpy()
    assert mask.shape == (len(lengths), 3)
    np.testing.assert_array_equal(mask.sum(axis=1), want)
    np.testing.assert_array_equal(mask, np.arange(3)[None, :] < np.array(want)[:, None])  # the first K_u ones


@pytest.mark.parametrize("cls", [ComiRecDRTower, ComiRecSATower])
def test_comirec_interest_mask_golden_table(cls):
    """ComiRec keeps all K interests of a non-empty history (Cen et al. 2020, Sec. 3.4); an empty history has 1
    (the default interest). Here K = 3."""
    lengths, want = [0, 1, 2, 3, 4, 17], [1, 3, 3, 3, 3, 3]
    tower = cls([USER, SequenceFeature("history", vocabulary=tuple(f"i{j}" for j in range(20)), embedding_dim=4,
                                       max_len=17)], num_interests=3, output_dim=2)
    inputs = {"user_id": tf.constant(["u1"] * len(lengths)), "history": tf.constant([history_of(n) for n in lengths])}
    np.testing.assert_array_equal(tower.interest_mask(inputs).numpy().sum(axis=1), want)
    np.testing.assert_array_equal(tower.interest_mask(inputs).numpy()[:, 0], True)


@pytest.mark.parametrize("cls,kwargs", TOWER_CASES, ids=TOWER_IDS)
def test_tower_output_shapes_normalised_and_finite(cls, kwargs):
    tower = make_tower(cls, kwargs)
    out = tower(INPUTS).numpy()
    want_shape = (4, 5) if cls is SelfAttentiveTower else (4, K, 5)
    assert out.shape == want_shape
    assert np.all(np.isfinite(out))  # histories of 1 and 2 behaviours (< K) and an empty one
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
    raw = make_tower(cls, kwargs, l2_normalize=False)(INPUTS).numpy()
    assert raw.shape == want_shape and np.all(np.isfinite(raw))
    np.testing.assert_allclose(out, raw / np.linalg.norm(raw, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,kwargs", TOWER_CASES[:4], ids=TOWER_IDS[:4])
def test_empty_history_gets_the_learned_default_interest(cls, kwargs):
    tower = make_tower(cls, kwargs)
    interests = tower.interests(INPUTS).numpy()
    assert interests.shape == (4, K, HISTORY.embedding_dim)
    default = tower.empty_interest.numpy()
    np.testing.assert_array_equal(interests[EMPTY_ROW], np.tile(default, (K, 1)))
    assert np.abs(interests[:EMPTY_ROW] - default).max(axis=(1, 2)).min() > 1e-3  # the others are extracted


def test_self_attentive_tower_empty_history_gets_the_learned_default_state():
    tower = make_tower(*TOWER_CASES[4])
    state = tower.history_state(INPUTS).numpy()
    default = tower.empty_history.numpy()
    np.testing.assert_array_equal(state[EMPTY_ROW], default)
    sequence, mask = tower.encode_sequence(INPUTS, "history")
    states = tower.sequence_encoder(sequence, mask, training=False).numpy()
    np.testing.assert_allclose(state[:EMPTY_ROW], states[:EMPTY_ROW, 0], rtol=1e-6)  # the most recent's state
    assert np.abs(state[:EMPTY_ROW] - default).max(axis=1).min() > 1e-3


@pytest.mark.parametrize("cls,kwargs", TOWER_CASES, ids=TOWER_IDS)
def test_padding_is_never_attended_to(cls, kwargs):
    """Rewriting the embedding row the padding "" looks up leaves every output unchanged (a real item's row
    does change them: the check can see a change)."""
    tower = make_tower(cls, kwargs)
    out = tower(INPUTS).numpy()
    lookup, embedding = tower.encoder._lookups["history"], tower.encoder._embeddings["history"]
    pad, item = lookup(tf.constant(["", "i2"])).numpy()
    assert pad == 0  # StringLookup's mask token "" takes index 0
    table = embedding.embeddings.numpy()
    rewritten = table.copy()
    rewritten[pad] = 50.0 * RNG.normal(size=table.shape[1])
    embedding.embeddings.assign(rewritten)
    np.testing.assert_array_equal(tower(INPUTS).numpy(), out)
    rewritten[item] += np.linspace(-1.0, 1.0, table.shape[1])  # not a constant shift, which layer norms undo
    embedding.embeddings.assign(rewritten)
    assert np.abs(tower(INPUTS).numpy()[0] - out[0]).max() > 1e-4  # "i2" is in row 0's history


def tower_reference(tower, sequence, mask):
    """The interests of one tower's extractor by the reference of its paper (MIND: B2I; ComiRec-DR: capsule
    routing; ComiRec-SA: self-attention steered by the history embeddings plus learned positions, applied to the
    embeddings)."""
    if isinstance(tower, MINDTower):
        logits = tower.routing.initial_logits(sequence.shape[0]).numpy()
        n = int(mask.sum())
        k_u = max(1, min(tower.num_interests, int(math.floor(math.log2(n))))) if n else 1  # MIND eq. 4
        return ref_b2i(sequence, mask, tower.routing.bilinear.numpy(), logits, tower.routing.iterations, k_u)
    if isinstance(tower, ComiRecDRTower):
        maps = tower.routing.maps.numpy()  # [L, K, d, d], or [K, d, d] shared by the positions
        maps = maps if maps.ndim == 4 else np.broadcast_to(maps[None], (len(sequence),) + maps.shape)
        return ref_capsule(sequence, mask, maps, tower.routing.iterations)
    # ComiRec-SA as in the authors' code: attention over the embeddings plus positions, sums of the embeddings.
    extraction = tower.extraction
    attention, _ = ref_self_attentive(sequence + tower.positions.numpy(), mask, extraction.hidden.kernel.numpy(),
                                      extraction.heads.kernel.numpy())
    return attention @ np.asarray(sequence, np.float64)


@pytest.mark.parametrize("cls,kwargs", [(MINDTower, dict(num_interests=K, routing_iterations=3)), TOWER_CASES[1],
                                        TOWER_CASES[2], TOWER_CASES[5]], ids=TOWER_IDS[:3] + TOWER_IDS[5:])
def test_tower_interests_match_the_paper_reference(cls, kwargs):
    tower = make_tower(cls, kwargs)
    sequence, mask = tower.encode_sequence(INPUTS, "history")
    sequence, mask = sequence.numpy(), mask.numpy()
    np.testing.assert_array_equal(mask.sum(axis=1), [6, 2, 1, 0])
    got = tower.interests(INPUTS).numpy()
    for b in range(EMPTY_ROW):
        np.testing.assert_allclose(got[b], tower_reference(tower, sequence[b], mask[b]), rtol=1e-5, atol=1e-6)


def test_mind_tower_concatenates_the_user_fields_to_each_interest():
    """MIND Sec. 3.4: each interest, with the user's other fields concatenated, goes through the shared layers;
    with no hidden layer and no normalisation: out_k = [u_k, e_user] P + bias."""
    tower = make_tower(MINDTower, dict(num_interests=K), hidden_units=(), l2_normalize=False)
    interests = tower.interests(INPUTS).numpy().astype(np.float64)
    user = tower.encoder(INPUTS)[0].numpy().astype(np.float64)
    kernel, bias = (w.numpy().astype(np.float64) for w in tower.projection.weights)
    out = tower(INPUTS).numpy()
    for b in range(4):
        for k in range(K):
            want = np.concatenate([interests[b, k], user[b]]) @ kernel + bias
            np.testing.assert_allclose(out[b, k], want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Serialisation

LAYER_CASES = [B2IRouting(num_interests=2, iterations=4, routing_std=0.5, seed=7, name="b2i"),
               CapsuleRouting(num_interests=2, iterations=2, name="capsules"),
               CapsuleRouting(num_interests=2, iterations=2, maps="per_interest", name="shared_capsules"),
               SelfAttentiveExtraction(num_interests=2, attention_units=5, name="sa"),
               CausalSelfAttentionEncoder(max_length=L, num_blocks=1, num_heads=2, dropout=0.25, name="sasrec")]


@pytest.mark.parametrize("layer", LAYER_CASES, ids=lambda layer: layer.name)
def test_layers_round_trip_config_and_weights(layer):
    tf.keras.utils.set_random_seed(5)
    out = layer(tf.constant(SEQUENCE), tf.constant(MASK), training=False).numpy()
    clone = assert_keras_round_trips(layer)
    assert clone.get_config() == layer.get_config()
    clone(tf.constant(SEQUENCE), tf.constant(MASK), training=False)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(clone(tf.constant(SEQUENCE), tf.constant(MASK), training=False).numpy(), out,
                               rtol=1e-6)


@pytest.mark.parametrize("cls,kwargs", TOWER_CASES, ids=TOWER_IDS)
def test_towers_round_trip_config(cls, kwargs):
    tower = make_tower(cls, kwargs)
    out = tower(INPUTS).numpy()
    clone = assert_keras_round_trips(tower)
    assert clone.get_config() == tower.get_config()
    clone(INPUTS)
    clone.set_weights(tower.get_weights())
    np.testing.assert_allclose(clone(INPUTS).numpy(), out, rtol=1e-6)


# A Keras SavedModel round trip takes seconds (the first in a process ~10 s more): every tower kind.
@pytest.mark.parametrize("cls,kwargs", TOWER_CASES[:2] + TOWER_CASES[3:5], ids=TOWER_IDS[:2] + TOWER_IDS[3:5])
def test_towers_round_trip_savedmodel(tmp_path, cls, kwargs):
    tower = make_tower(cls, kwargs)
    out = tower(INPUTS).numpy()
    tower.save(str(tmp_path / "tower"), save_format="tf", include_optimizer=False)  # as train.save_run does
    loaded = tf.keras.models.load_model(str(tmp_path / "tower"), compile=False)
    assert type(loaded) is cls and loaded.get_config() == tower.get_config()
    np.testing.assert_allclose(loaded(INPUTS).numpy(), out, rtol=1e-6)
    if cls.multi_interest:
        np.testing.assert_array_equal(loaded.interest_mask(INPUTS).numpy(), tower.interest_mask(INPUTS).numpy())


# ----------------------------------------------------------------------------------------------------------
# Constructor errors name the argument and the value

LAYER_ERRORS = [
    (lambda: B2IRouting(num_interests=0), r"num_interests must be a positive integer, got 0"),
    (lambda: CapsuleRouting(num_interests=2.5), r"num_interests must be a positive integer, got 2.5"),
    (lambda: SelfAttentiveExtraction(num_interests=-1), r"num_interests must be a positive integer, got -1"),
    (lambda: B2IRouting(iterations=0), r"iterations must be a positive integer, got 0"),
    (lambda: CapsuleRouting(iterations=0), r"iterations must be a positive integer, got 0"),
    (lambda: CapsuleRouting(maps="shared"), r"maps must be one of \('per_position', 'per_interest'\), got 'shared'"),
    (lambda: B2IRouting(routing_std=-1), r"routing_std must be a finite number >= 0, got -1"),
    (lambda: B2IRouting(routing_std=float("inf")), r"routing_std must be a finite number >= 0, got inf"),
    (lambda: B2IRouting(seed=-2), r"seed must be an integer >= 0, got -2"),
    (lambda: SelfAttentiveExtraction(attention_units=0), r"attention_units must be a positive integer, got 0"),
    (lambda: CausalSelfAttentionEncoder(max_length=0), r"max_length must be a positive integer, got 0"),
    (lambda: CausalSelfAttentionEncoder(L, num_blocks=0), r"num_blocks must be an integer >= 1, got 0"),
    (lambda: CausalSelfAttentionEncoder(L, num_heads=0), r"num_heads must be a positive integer, got 0"),
    (lambda: CausalSelfAttentionEncoder(L, dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (lambda: CausalSelfAttentionEncoder(L, dropout=-0.1), r"dropout must be in \[0, 1\), got -0.1"),
]


@pytest.mark.parametrize("make,message", LAYER_ERRORS, ids=[m.split(" ")[0] for _, m in LAYER_ERRORS])
def test_layer_constructor_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_num_heads_must_divide_the_width_at_build():
    encoder = CausalSelfAttentionEncoder(max_length=L, num_heads=3)  # the width is known only at build
    with pytest.raises(ValueError, match=r"num_heads \(3\) must divide the sequence embedding width \(4\)"):
        encoder(tf.constant(SEQUENCE), tf.constant(MASK))
    tower = SelfAttentiveTower(SPECS, num_heads=3)
    with pytest.raises(ValueError, match=r"num_heads \(3\) must divide the sequence embedding width \(8\)"):
        tower(INPUTS)


def test_causal_encoder_refuses_a_sequence_longer_than_its_positions():
    encoder = CausalSelfAttentionEncoder(max_length=L - 1)
    with pytest.raises(ValueError, match=r"the sequence has 5 positions but the encoder learned max_length=4 "
                                         r"position embeddings: truncate the history to 4"):
        encoder(tf.constant(SEQUENCE), tf.constant(MASK))
    built = CausalSelfAttentionEncoder(max_length=L)
    built(tf.constant(SEQUENCE), tf.constant(MASK))  # L positions fit; L + 1 after building do not
    longer = np.concatenate([SEQUENCE, SEQUENCE[:, :1]], axis=1)
    with pytest.raises(ValueError, match=r"the sequence has 6 positions but the encoder learned max_length=5"):
        built(tf.constant(longer), tf.constant(np.pad(MASK, [(0, 0), (0, 1)])))


TOWER_ERRORS = [
    (lambda: MINDTower(SPECS, num_interests=0), r"num_interests must be a positive integer, got 0"),
    (lambda: ComiRecDRTower(SPECS, num_interests=0), r"num_interests must be a positive integer, got 0"),
    (lambda: MINDTower(SPECS, routing_iterations=0), r"routing_iterations must be a positive integer, got 0"),
    (lambda: ComiRecDRTower(SPECS, routing_iterations=0), r"routing_iterations must be a positive integer, got 0"),
    (lambda: ComiRecDRTower(SPECS, routing_maps="all"),
     r"routing_maps must be one of \('per_position', 'per_interest'\), got 'all'"),
    (lambda: MINDTower(SPECS, routing_std=-1), r"routing_std must be a finite number >= 0, got -1"),
    (lambda: MINDTower(SPECS, routing_seed=-1), r"routing_seed must be an integer >= 0, got -1"),
    (lambda: ComiRecSATower(SPECS, attention_units=0), r"attention_units must be a positive integer, got 0"),
    (lambda: ComiRecSATower(SPECS, encoder_blocks=-1), r"encoder_blocks must be an integer >= 0, got -1"),
    (lambda: ComiRecSATower(SPECS, encoder_blocks=1, encoder_heads=0),
     r"encoder_heads must be a positive integer, got 0"),
    (lambda: ComiRecSATower(SPECS, encoder_blocks=1, attention_dropout=1.0),
     r"attention_dropout must be in \[0, 1\), got 1.0"),
    (lambda: SelfAttentiveTower(SPECS, attention_dropout=1.0), r"attention_dropout must be in \[0, 1\), got 1.0"),
    (lambda: SelfAttentiveTower(SPECS, num_blocks=0), r"num_blocks must be an integer >= 1, got 0"),
    (lambda: MINDTower(SPECS, dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (lambda: MINDTower([USER]), r"MINDTower needs exactly one SequenceFeature \(the history\).*\['user_id:id'\]"),
    (lambda: ComiRecDRTower([USER, HISTORY, SequenceFeature("clicks", vocabulary=("a",), max_len=2)]),
     r"ComiRecDRTower needs exactly one SequenceFeature .*'history:sequence', 'clicks:sequence'"),
    (lambda: ComiRecSATower([USER]), r"ComiRecSATower needs exactly one SequenceFeature"),
    (lambda: SelfAttentiveTower([USER]), r"SelfAttentiveTower needs exactly one SequenceFeature"),
]


@pytest.mark.parametrize("make,message", TOWER_ERRORS, ids=[m.split(" ")[0] for _, m in TOWER_ERRORS])
def test_tower_constructor_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()
