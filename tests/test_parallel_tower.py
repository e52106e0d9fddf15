"""ParallelTower (the parallel two-tower: DNN beside cross / FM / CIN branches): each branch against a NumPy
reference written from its paper's equation, the combined output, validation, registry, serialisation and a
training smoke test."""
import re
import types

import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall.features import IdFeature, MultiCategoricalFeature, NumericFeature, SequenceFeature
from tfrec_recall.layers.towers import ParallelTower, tower_class, tower_names
from tfrec_recall.layers.towers.parallel import BRANCH_COMBINES, PARALLEL_BRANCHES, CompressedInteraction
from tfrec_recall.models import TwoTower
from tfrec_recall.tasks.retrieval import RetrievalTask
from tests.test_serialization import assert_config_complete, assert_keras_round_trips

# Fields of different widths (4 + 5 + 3 + 2 = 14): the per-field projections are needed.
SPECS = [IdFeature("user_id", 4, vocabulary=("u1", "u2", "u3")),
         SequenceFeature("history", 5, vocabulary=("a", "b", "c"), max_len=3),
         MultiCategoricalFeature("tags", 3, hash_buckets=10, max_len=2),
         NumericFeature("age", mean=30.0, variance=100.0, embedding_dim=2)]
FIELD_DIMS = (4, 5, 3, 2)
INPUTS = {"user_id": tf.constant(["u1", "u2", "zzz", "u3", "u1"]),
          "history": tf.constant([["c", "a", ""], ["", "", ""], ["b", "b", "a"], ["a", "", ""], ["c", "x", ""]]),
          "tags": tf.constant([["t1", ""], ["t2", "t3"], ["", ""], ["t1", "t4"], ["t5", ""]]),
          "age": tf.constant([40.0, 18.0, float("nan"), 25.0, 61.0])}


def randomized(tower, seed=0):
    """``tower`` built, with every weight redrawn (zero-initialised biases would hide bias terms)."""
    tower(INPUTS)
    rng = np.random.default_rng(seed)
    tower.set_weights([rng.normal(scale=0.5, size=w.shape).astype(np.float32) for w in tower.get_weights()])
    return tower


def fields_and_outputs(tower):
    fields = tower.encoder(INPUTS)
    outputs = {k: v.numpy().astype(np.float64) for k, v in tower.branch_outputs(fields).items()}
    return [f.numpy().astype(np.float64) for f in fields], outputs


def projected(tower, fields):
    """v_i = e_i W_i with the tower's own per-field projection kernels."""
    return [f @ p.kernel.numpy().astype(np.float64) for f, p in zip(fields, tower.field_projections)]


def test_fm_branch_is_the_sum_of_pairwise_products():
    """Rendle 2010 eq. 1's pairwise term as a vector (NFM's bi-interaction): sum_{i<j} v_i ⊙ v_j by the
    explicit double loop, with v_i = e_i W_i from the layer's projections, shared with the CIN branch."""
    tower = randomized(ParallelTower(SPECS, hidden_units=(6,), branches=("fm", "cin"), interaction_dim=3))
    kernels = [w for w in tower.trainable_weights if "field_projection" in w.name]
    assert len(kernels) == len(SPECS) == len(tower.field_projections)  # one set of projections for both
    fields, outputs = fields_and_outputs(tower)
    v = projected(tower, fields)
    expected = np.zeros((5, 3))
    for i in range(len(v)):
        for j in range(i + 1, len(v)):
            expected += v[i] * v[j]
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(outputs["fm"], expected, rtol=1e-4, atol=1e-5)


def test_cin_branch_matches_eq6_with_sum_pooling():
    """xDeepFM (Lian et al. 2018) eq. 6, X^k_{h,*} = sum_{i,j} W^{k,h}_{ij} (X^{k-1}_{i,*} ⊙ X^0_{j,*}), with
    eq. 7's sum pooling over the embedding dimension of every layer, concatenated; explicit loops."""
    tower = randomized(ParallelTower(SPECS, hidden_units=(6,), branches=("cin",), interaction_dim=4,
                                     cin_units=(3, 2)), seed=1)
    fields, outputs = fields_and_outputs(tower)
    x0 = np.stack(projected(tower, fields), axis=1)  # [B, F, D]
    x_prev, pooled = x0, []
    for kernel, units in zip(tower.cin.kernels, (3, 2)):
        w = kernel.numpy().astype(np.float64)  # [H_k, H_{k-1}, F]
        x_k = np.zeros((5, units, 4))
        for h in range(units):
            for i in range(x_prev.shape[1]):
                for j in range(x0.shape[1]):
                    x_k[:, h, :] += w[h, i, j] * x_prev[:, i, :] * x0[:, j, :]
        pooled.append(x_k.sum(axis=2))
        x_prev = x_k
    np.testing.assert_allclose(outputs["cin"], np.concatenate(pooled, axis=1), rtol=1e-4, atol=1e-5)
    assert outputs["cin"].shape == (5, 5)


@pytest.mark.parametrize("projection_dim", [None, 3], ids=["full_rank", "low_rank"])
def test_cross_branch_matches_dcn_v2_eq1(projection_dim):
    """DCN-V2 (Wang et al. 2021) eq. 1, x_{l+1} = x_0 ⊙ (W x_l + b) + x_l, over x_0 = the concatenated fields,
    two layers; the low-rank variant (eq. 2) with W = U V. Keras kernels act as x @ K."""
    tower = randomized(ParallelTower(SPECS, hidden_units=(6,), branches=("cross",), cross_layers=2,
                                     cross_projection_dim=projection_dim), seed=2)
    fields, outputs = fields_and_outputs(tower)
    x0 = np.concatenate(fields, axis=1)
    x = x0
    for layer in tower.cross:
        weights = [w.astype(np.float64) for w in layer.get_weights()]
        if projection_dim is None:
            k, b = weights
            w_x = x @ k
        else:
            u, v, b = weights
            assert u.shape == (14, 3) and v.shape == (3, 14)
            w_x = x @ u @ v
        x = x0 * (w_x + b) + x
    np.testing.assert_allclose(outputs["cross"], x, rtol=1e-4, atol=1e-5)
    assert len(tower.cross) == 2


def _dense(x, layer):
    return x @ layer.kernel.numpy().astype(np.float64) + layer.bias.numpy().astype(np.float64)


@pytest.mark.parametrize("combine", BRANCH_COMBINES)
def test_tower_output_is_the_projection_of_the_combined_branches(combine):
    """concat: the projection of [dnn, cross, fm, cin]; senet (Hu et al. 2018 squeeze-excitation over the
    branches): each branch scaled by sigmoid(Dense(ReLU(Dense(branch means)))) before the concatenation."""
    tower = randomized(ParallelTower(SPECS, hidden_units=(6,), branches=PARALLEL_BRANCHES, combine=combine,
                                     interaction_dim=3, cin_units=(2, 2), output_dim=4, l2_normalize=False),
                       seed=3)
    _, outputs = fields_and_outputs(tower)
    widths = {"dnn": 6, "cross": sum(FIELD_DIMS), "fm": 3, "cin": 4}
    assert list(outputs) == list(widths) and tower.branch_widths() == widths
    assert {k: v.shape[1] for k, v in outputs.items()} == widths
    branches = list(outputs.values())
    if combine == "senet":
        means = np.stack([o.mean(axis=1) for o in branches], axis=1)
        hidden = np.maximum(_dense(means, tower.branch_excite_1), 0.0)
        gate = 1.0 / (1.0 + np.exp(-_dense(hidden, tower.branch_excite_2)))
        assert gate.shape == (5, 4) and np.all((gate > 0) & (gate < 1))
        assert np.ptp(gate) > 1e-3  # the gate does scale the branches differently
        np.testing.assert_allclose(tower.branch_weights([tf.constant(o, tf.float32) for o in branches]).numpy(),
                                   gate, rtol=1e-4, atol=1e-6)
        branches = [o * gate[:, i:i + 1] for i, o in enumerate(branches)]
    else:
        assert tower.branch_excite_1 is None and tower.branch_excite_2 is None
    combined = np.concatenate(branches, axis=1)
    assert combined.shape == (5, 6 + 14 + 3 + 4)
    np.testing.assert_allclose(tower(INPUTS).numpy(), _dense(combined, tower.projection), rtol=1e-4, atol=1e-4)


def test_branch_order_and_l2_normalisation():
    tower = ParallelTower(SPECS, hidden_units=(6,), branches=("fm", "cross"), interaction_dim=2, output_dim=3)
    assert list(tower.branch_widths()) == ["dnn", "fm", "cross"] and tower.cin is None
    np.testing.assert_allclose(np.linalg.norm(tower(INPUTS).numpy(), axis=1), 1.0, rtol=1e-5)


def test_registry_and_run_config_options():
    assert tower_class("parallel") is ParallelTower and "parallel" in tower_names(candidate=True)
    config = types.SimpleNamespace(parallel_branches=["fm", "cin"], parallel_combine="senet")
    options = ParallelTower.run_config_options(config)
    assert options == {"branches": ("fm", "cin"), "combine": "senet"}
    tower = ParallelTower.from_hidden_units(SPECS, [8, 4], output_dim=3, **options)
    assert tower.hidden_units == (8, 4) and tower.branches == ("fm", "cin") and tower.combine_mode == "senet"


BAD_ARGUMENTS = [
    (dict(branches=["x"]), "branches must be a non-empty list of distinct names from ('cross', 'fm', 'cin'), "
                           "got ['x']"),
    (dict(branches=()), "branches must be a non-empty list of distinct names from ('cross', 'fm', 'cin'), got []"),
    (dict(branches=("fm", "fm")), "got ['fm', 'fm']"),
    (dict(branches="cross"), "got 'cross'"),
    (dict(branches=[["fm"]]), "got [['fm']]"),
    (dict(combine="sum"), "combine must be one of ('concat', 'senet'), got 'sum'"),
    (dict(cross_layers=0), "cross_layers must be an integer >= 1, got 0"),
    (dict(cross_layers=1.5), "cross_layers must be an integer >= 1, got 1.5"),
    (dict(cross_projection_dim=0), "cross_projection_dim must be None or a positive integer, got 0"),
    (dict(interaction_dim=0), "interaction_dim must be an integer >= 1, got 0"),
    (dict(cin_units=(4, 0)), "cin_units must be a non-empty list of positive integers, got [4, 0]"),
    (dict(cin_units=()), "cin_units must be a non-empty list of positive integers, got []"),
    (dict(cin_units=16), "cin_units must be a non-empty list of positive integers, got 16"),
    (dict(hidden_units=(8, -1)), "hidden_units must be a sequence of positive integers, got [8, -1]"),
    (dict(activation="sigmoid"), "activation must be one of ('relu', 'gelu', 'swish', 'tanh'), got 'sigmoid'"),
]


@pytest.mark.parametrize("kwargs,message", BAD_ARGUMENTS, ids=[next(iter(k)) + str(i)
                                                               for i, (k, _) in enumerate(BAD_ARGUMENTS)])
def test_validation_errors_name_the_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ParallelTower(SPECS, **kwargs)


def test_config_round_trips_and_savedmodel(tmp_path):
    tf.keras.utils.set_random_seed(4)
    tower = ParallelTower(SPECS, hidden_units=(6,), branches=("cin", "cross", "fm"), combine="senet",
                          cross_layers=1, cross_projection_dim=2, interaction_dim=3, cin_units=(2,),
                          activation="tanh", output_dim=3, l2_normalize=False, dropout=0.1, name="query")
    out = tower(INPUTS).numpy()
    assert_config_complete(tower)
    assert tower.get_config()["branches"] == ["cin", "cross", "fm"] and tower.get_config()["cin_units"] == [2]
    clone = assert_keras_round_trips(tower)
    clone(INPUTS)
    clone.set_weights(tower.get_weights())
    np.testing.assert_allclose(clone(INPUTS).numpy(), out, rtol=1e-6)
    assert_keras_round_trips(ParallelTower(SPECS))
    assert_keras_round_trips(CompressedInteraction((3, 2), name="cin"))
    tower.save(str(tmp_path / "tower"), save_format="tf", include_optimizer=False)  # as train.save_run does
    loaded = tf.keras.models.load_model(str(tmp_path / "tower"), compile=False)
    assert type(loaded) is ParallelTower and loaded.get_config() == tower.get_config()
    np.testing.assert_allclose(loaded(INPUTS).numpy(), out, rtol=1e-6)


def synthetic_rows(n=200, seed=5):
    """Users u0..u19 with ages; each user mostly clicks 3 items of its own (learnable structure)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 20, size=n)
    items = (users * 3 + rng.integers(0, 3, size=n)) % 30
    return {"user_id": np.array([f"u{u}" for u in users]), "age": (20 + users * 2).astype(np.float32),
            "item_id": np.array([f"i{i}" for i in items]), "genre": np.array([f"g{i % 5}" for i in items])}


def test_two_parallel_towers_train():
    """A TwoTower with ParallelTower (all branches, SENet combine) on both sides: 2 epochs, finite falling loss."""
    tf.keras.utils.set_random_seed(6)
    query_specs = [IdFeature("user_id", 8, vocabulary=tuple(f"u{u}" for u in range(20))),
                   NumericFeature("age", mean=40.0, variance=150.0, embedding_dim=4)]
    item_specs = [IdFeature("item_id", 8, vocabulary=tuple(f"i{i}" for i in range(30))),
                  IdFeature("genre", 4, vocabulary=tuple(f"g{g}" for g in range(5)))]
    options = dict(hidden_units=(16,), branches=("cross", "fm", "cin"), combine="senet", interaction_dim=4,
                   cin_units=(4, 4), output_dim=8)
    model = TwoTower(ParallelTower(query_specs, name="query", **options),
                     ParallelTower(item_specs, name="candidate", **options), RetrievalTask(temperature=0.5))
    # Eagerly: graph-mode fit gives the same losses but spends ~45 s tracing the train step on 2 shared cores.
    model.compile(optimizer=tf.keras.optimizers.Adagrad(0.2), run_eagerly=True)
    data = tf.data.Dataset.from_tensor_slices(synthetic_rows()).batch(40)
    losses = model.fit(data, epochs=2, verbose=0).history["loss"]
    assert len(losses) == 2 and np.all(np.isfinite(losses)) and losses[1] < losses[0]
