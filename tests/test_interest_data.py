"""The data and measures of multi-interest user models (MIND, Li et al. 2019; ComiRec, Cen et al. 2020): the
synthetic log with known interests per user, interest recovery (best cosine between a learned interest vector and
each true interest's cluster centroid) and ComiRec's Diversity@N, checked against NumPy references."""
import numpy as np
import pandas as pd
import pytest

from tfrec_recall.data import InterestTruth, leave_last_out, make_multi_interest
from tfrec_recall.evaluation import cluster_centroids, interest_recovery, intra_list_diversity

SMALL = dict(num_users=80, num_items=120, num_clusters=12, mean_interactions=15)


@pytest.fixture(scope="module")
def small():
    return make_multi_interest(**SMALL, seed=4)


def _reference_recovery(interests, mask, user_clusters, centroids):
    """Mean over users u of mean over true clusters c of max over valid k of
    v_u^(k) . mu_c / (|v_u^(k)| |mu_c|), a cosine with a zero vector counting 0; plain loops."""
    per_user = []
    for u, clusters in enumerate(user_clusters):
        best = []
        for c in sorted(set(clusters)):
            cosines = []
            for k in range(len(interests[u])):
                if mask is None or mask[u][k]:
                    norm = np.linalg.norm(interests[u][k]) * np.linalg.norm(centroids[c])
                    cosines.append(float(np.dot(interests[u][k], centroids[c]) / norm) if norm > 0 else 0.0)
            best.append(max(cosines))
        per_user.append(np.mean(best))
    return float(np.mean(per_user))


def _reference_diversity(ids, categories):
    """Cen et al. 2020 (ComiRec), sec. 4.1: Diversity@N = sum_{j=1}^{N} sum_{k=j+1}^{N}
    [CATE(i_j) != CATE(i_k)] / (N (N - 1) / 2) over the non-padding items of each list, averaged over the lists
    of at least 2 items."""
    scores = []
    for row in ids:
        items = [i for i in row if i != ""]
        n = len(items)
        if n >= 2:
            differ = sum(categories[items[j]] != categories[items[k]] for j in range(n) for k in range(j + 1, n))
            scores.append(differ / (n * (n - 1) / 2))
    return float(np.mean(scores))


# -- the synthetic log -----------------------------------------------------------------------------------------
def test_same_seed_same_data_and_another_seed_differs(small):
    data, truth = small
    again, again_truth = make_multi_interest(**SMALL, seed=4)
    pd.testing.assert_frame_equal(data.interactions, again.interactions)
    pd.testing.assert_frame_equal(data.item_features, again.item_features)
    assert truth == again_truth and isinstance(truth, InterestTruth)
    other, other_truth = make_multi_interest(**SMALL, seed=5)
    assert not data.interactions.equals(other.interactions) and truth != other_truth


def test_every_history_comes_from_its_users_true_clusters(small):
    data, truth = small
    frame = data.interactions
    assert frame["timestamp"].dtype == np.int64 and truth.num_clusters == 12
    assert set(truth.user_interests) == set(frame["user_id"]) and len(truth.user_interests) == 80
    for user, rows in frame.groupby("user_id", sort=False):
        clusters = truth.user_interests[user]
        assert 1 <= len(clusters) <= 4 and len(set(clusters)) == len(clusters)
        assert {truth.item_cluster[i] for i in rows["item_id"]} <= set(clusters)
        assert rows["item_id"].is_unique and len(rows) >= 3
        assert (np.diff(rows["timestamp"].to_numpy()) > 0).all()
    # 120 items in 12 clusters: 10 each; the category feature is the cluster label.
    assert np.bincount(list(truth.item_cluster.values())).tolist() == [10] * 12
    assert data.feature_kinds == {"category": "categorical"}
    expected = {i: f"c{c}" for i, c in truth.item_cluster.items()}
    assert data.item_features["category"].to_dict() == expected


def test_the_number_of_interests_spans_min_to_max_and_uneven_clusters_differ_by_one():
    _, truth = make_multi_interest(num_users=200, num_items=50, num_clusters=7, min_interests=2, max_interests=3,
                                   mean_interactions=8, seed=1)
    assert {len(c) for c in truth.user_interests.values()} == {2, 3}
    # 50 items in 7 clusters: 50 = 1 * 8 + 6 * 7.
    assert sorted(np.bincount(list(truth.item_cluster.values()))) == [7] * 6 + [8]
    _, fixed = make_multi_interest(num_users=30, num_items=50, num_clusters=7, min_interests=3, max_interests=3,
                                   seed=1)
    assert {len(c) for c in fixed.user_interests.values()} == {3}


def test_histories_never_exceed_the_items_of_their_clusters():
    # One interest of 4 items each and Poisson(30) draws: every user takes all 4 items of its cluster.
    data, truth = make_multi_interest(num_users=20, num_items=40, num_clusters=10, max_interests=1,
                                      mean_interactions=30, seed=2)
    counts = data.interactions.groupby("user_id").size()
    assert (counts == 4).all()


def test_zipf_exponent_concentrates_the_first_pick_on_the_cluster_head():
    def head_share(exponent):
        data, truth = make_multi_interest(num_users=400, num_items=200, num_clusters=10, max_interests=1,
                                          mean_interactions=5, within_cluster_zipf=exponent, seed=3)
        first = data.interactions.groupby("user_id", sort=False)["item_id"].first()
        by_cluster = first.groupby(first.map(truth.item_cluster))
        return by_cluster.agg(lambda s: s.value_counts().iloc[0] / len(s)).mean()
    # The first pick is the cluster's rank-1 item with probability 1 / H(20, s), H(n, s) = sum_{r<=n} r^-s:
    # s = 3 gives 1 / 1.2 = 0.83; s = 0 gives 1 / 20 (the most frequent of ~40 uniform picks: 0.12 here).
    assert head_share(3.0) > 0.7 and head_share(0.0) < 0.3


def test_leave_last_out_holds_out_an_item_of_a_true_interest(small):
    data, truth = small
    split = leave_last_out(data, history_length=5)
    assert len(split.test) == len(split.valid) == 80
    for rows in (split.test, split.valid):
        assert all(truth.item_cluster[i] in truth.user_interests[u] for u, i in zip(rows["user_id"], rows["item_id"]))


@pytest.mark.parametrize("arguments, message", [
    (dict(num_users=0), "num_users must be an integer >= 1, got 0"),
    (dict(num_items=2), "num_items must be an integer >= 3, got 2"),
    (dict(num_clusters=0), "num_clusters must be an integer >= 1, got 0"),
    (dict(num_items=30, num_clusters=31), r"num_clusters must be <= num_items // 3 \(10, so that every cluster "
                                          r"holds at least 3 items\), got 31"),
    (dict(num_items=30, num_clusters=11), r"num_clusters must be <= num_items // 3 \(10"),
    (dict(num_clusters=3, max_interests=4), r"max_interests must be <= num_clusters \(3\), got 4"),
    (dict(min_interests=3, max_interests=2), r"min_interests must be <= max_interests \(2\), got 3"),
    (dict(min_interests=0), "min_interests must be an integer >= 1, got 0"),
    (dict(max_interests=2.0), "max_interests must be an integer >= 1, got 2.0"),
    (dict(mean_interactions=0), "mean_interactions must be an integer >= 1, got 0"),
    (dict(within_cluster_zipf=-0.5), "within_cluster_zipf must be a finite number >= 0, got -0.5"),
    (dict(within_cluster_zipf=float("nan")), "within_cluster_zipf must be a finite number >= 0, got nan"),
])
def test_bad_arguments_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        make_multi_interest(**arguments)


# -- interest recovery -----------------------------------------------------------------------------------------
def test_interests_equal_to_the_centroids_recover_fully_and_orthogonal_ones_not_at_all():
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(5, 6))
    clusters = [[0, 3], [1], [2, 4, 0]]
    interests = np.zeros((3, 3, 6))
    for u, true in enumerate(clusters):
        interests[u, :len(true)] = 2.5 * centroids[true]  # cosine ignores the scale
    mask = np.array([[True, True, False], [True, False, False], [True, True, True]])
    assert interest_recovery(interests, mask, clusters, centroids) == pytest.approx(1.0)
    # Unmasked, the zero padding vectors have cosine 0 and never beat the exact matches.
    assert interest_recovery(interests, None, clusters, centroids) == pytest.approx(1.0)
    axes = np.eye(4)
    orthogonal = np.stack([axes[2:], axes[2:]])  # interests along e2, e3; centroids along e0, e1
    assert interest_recovery(orthogonal, None, [[0], [0, 1]], axes[:2]) == pytest.approx(0.0)


def test_a_hand_computed_case_with_masking():
    centroids = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    interests = np.array([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [-1.0, 0.0]]])
    clusters = [[0, 1], [2]]
    # User 0: c0 -> max(1, 1/sqrt2) = 1, c1 -> max(0, 1/sqrt2) = 1/sqrt2: (1 + 1/sqrt2) / 2 = 0.85355.
    # User 1: c2 -> max(1/sqrt2, -1/sqrt2) = 0.70711. Mean: 1/4 + 3 / (4 sqrt2) = 0.78033.
    assert interest_recovery(interests, None, clusters, centroids) == pytest.approx(0.25 + 3 / (4 * np.sqrt(2)))
    # Masking user 0's second interest: c1 -> 0, user 0 -> 1/2; mean (1/2 + 1/sqrt2) / 2 = 0.60355.
    mask = np.array([[True, False], [True, True]])
    assert interest_recovery(interests, mask, clusters, centroids) == pytest.approx(0.25 + 1 / (2 * np.sqrt(2)))
    # A masked interest is ignored, NaN included.
    interests[0, 1] = np.nan
    assert interest_recovery(interests, mask, clusters, centroids) == pytest.approx(0.25 + 1 / (2 * np.sqrt(2)))


def test_random_interests_match_the_reference_and_single_vectors_are_one_interest():
    rng = np.random.default_rng(1)
    centroids, interests = rng.normal(size=(7, 5)), rng.normal(size=(6, 4, 5))
    interests[2, 1] = 0.0  # a zero vector: cosine 0, no NaN
    mask = rng.random((6, 4)) < 0.6
    mask[:, 0] = True
    clusters = [rng.choice(7, size=rng.integers(1, 4), replace=False).tolist() for _ in range(6)]
    clusters[3] = clusters[3] + clusters[3][:1]  # a repeated true interest counts once
    expected = _reference_recovery(interests, mask, clusters, centroids)
    assert interest_recovery(interests, mask, clusters, centroids) == pytest.approx(expected, rel=1e-12)
    single = interests[:, 0]
    expected = _reference_recovery(single[:, None], None, clusters, centroids)
    assert interest_recovery(single, None, clusters, centroids) == pytest.approx(expected, rel=1e-12)
    assert interest_recovery(single, np.ones(6, bool), clusters, centroids) == pytest.approx(expected, rel=1e-12)
    zero_centroid = np.vstack([centroids[:1] * 0.0, centroids[1:]])
    value = interest_recovery(interests, mask, [[0]] * 6, zero_centroid)
    assert value == 0.0


def test_bad_recovery_inputs_are_named():
    interests, centroids, clusters = np.ones((2, 3, 4)), np.eye(4)[:3], [[0], [1, 2]]
    bad_interests, bad_centroids = interests.copy(), centroids.copy()
    bad_interests[1, 2, 0], bad_centroids[2, 3] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"interests must be finite; entry \(1, 2, 0\) is nan"):
        interest_recovery(bad_interests, None, clusters, centroids)
    with pytest.raises(ValueError, match=r"centroids must be finite; entry \(2, 3\) is inf"):
        interest_recovery(interests, None, clusters, bad_centroids)
    with pytest.raises(ValueError, match=r"interest_mask row 1 has no valid interest \(1 such rows\)"):
        interest_recovery(interests, np.array([[True, False, False], [False] * 3]), clusters, centroids)
    with pytest.raises(ValueError, match=r"interest_mask must be bool of shape \(2, 3\), got int64 of shape \(2, 3\)"):
        interest_recovery(interests, np.ones((2, 3), dtype=np.int64), clusters, centroids)
    with pytest.raises(ValueError, match=r"centroids must be \[clusters, dim\] with dim 4"):
        interest_recovery(interests, None, clusters, np.eye(3))
    with pytest.raises(ValueError, match=r"interests must be \[users, interests, dim\] or \[users, dim\]"):
        interest_recovery(np.ones(4), None, clusters, centroids)
    with pytest.raises(ValueError, match=r"user_clusters must hold one sequence per user \(2\), got 1"):
        interest_recovery(interests, None, clusters[:1], centroids)
    with pytest.raises(ValueError, match="user_clusters row 1 is empty"):
        interest_recovery(interests, None, [[0], []], centroids)
    with pytest.raises(ValueError, match=r"user_clusters row 0 holds cluster 3, outside \[0, 3\)"):
        interest_recovery(interests, None, [[0, 3], [1]], centroids)


# -- cluster centroids -----------------------------------------------------------------------------------------
def test_centroids_are_the_mean_embedding_of_each_cluster(small):
    data, truth = small
    ids = data.items
    embeddings = np.random.default_rng(2).normal(size=(len(ids), 3))
    got = cluster_centroids(ids.astype(bytes), embeddings, truth.item_cluster, truth.num_clusters)
    frame = pd.DataFrame(embeddings).assign(cluster=[truth.item_cluster[i] for i in ids])
    np.testing.assert_allclose(got, frame.groupby("cluster").mean().to_numpy(), rtol=1e-12)
    # Hand-made: cluster 0 = {a, c}: ((1, 0) + (3, 2)) / 2 = (2, 1); cluster 1 = {b}: (0, 5).
    small_ids, vectors = ["a", "b", "c"], np.array([[1.0, 0.0], [0.0, 5.0], [3.0, 2.0]])
    np.testing.assert_allclose(cluster_centroids(small_ids, vectors, {"a": 0, "b": 1, "c": 0}, 2), [[2, 1], [0, 5]])
    with pytest.raises(ValueError, match="cluster 2 has no item among item_ids"):
        cluster_centroids(small_ids, vectors, {"a": 0, "b": 1, "c": 0}, 3)
    with pytest.raises(ValueError, match=r"item 'c' has no cluster in item_cluster \(1 such items\)"):
        cluster_centroids(small_ids, vectors, {"a": 0, "b": 1}, 2)
    with pytest.raises(ValueError, match=r"item_cluster holds cluster 2, outside \[0, 2\)"):
        cluster_centroids(small_ids, vectors, {"a": 0, "b": 2, "c": 1}, 2)
    vectors[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"embeddings must be finite; entry \(1, 0\) is nan"):
        cluster_centroids(small_ids, vectors, {"a": 0, "b": 1, "c": 0}, 2)


# -- Diversity@N -----------------------------------------------------------------------------------------------
def test_diversity_golden_values_and_padding():
    categories = {"x": "a", "y": "a", "z": "b", "w": "c"}
    # [a, a, b]: pairs (x, y) same, (x, z), (y, z) differ: 2 / 3.
    assert intra_list_diversity([["x", "y", "z"]], categories) == pytest.approx(2 / 3)
    # [a, b, c] + padding: 3 / 3 = 1; [a, a]: 0 / 1; a single item is left out: mean (1 + 0) / 2.
    ids = np.array([["x", "z", "w", ""], ["x", "y", "", ""], ["w", "", "", ""]])
    assert intra_list_diversity(ids, categories) == pytest.approx(0.5)
    assert intra_list_diversity(ids.astype(bytes), categories) == pytest.approx(0.5)
    assert intra_list_diversity(ids.astype(bytes).astype(object), categories) == pytest.approx(0.5)


def test_diversity_matches_the_comirec_formula_on_random_lists():
    rng = np.random.default_rng(3)
    items = [f"i{j}" for j in range(30)]
    categories = {i: f"c{rng.integers(0, 4)}" for i in items}
    ids = np.array([rng.choice(items, size=10, replace=False) for _ in range(12)], dtype=object)
    ids[0, 5:] = ""
    ids[1, 1:] = ""
    assert intra_list_diversity(ids, categories) == pytest.approx(_reference_diversity(ids, categories), rel=1e-12)


def test_bad_diversity_inputs_are_named():
    categories = {"x": "a", "y": "b"}
    with pytest.raises(ValueError, match="item 'q' has no category in categories"):
        intra_list_diversity([["x", "y"], ["q", "x"]], categories)
    with pytest.raises(ValueError, match="no row of ids has 2 or more real"):
        intra_list_diversity([["x", ""], ["", ""]], categories)
    with pytest.raises(ValueError, match=r"ids must be \[users, N\], got shape \(2,\)"):
        intra_list_diversity(["x", "y"], categories)
