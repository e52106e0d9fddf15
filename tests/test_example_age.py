"""Example Age (Covington et al. 2016, "Deep Neural Networks for YouTube Recommendations", sec. 3.3): the age of
each training example as a query feature, 0 at serving time; and the drifting-popularity synthetic data."""
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfrec_recall.config import ConfigError, load_config
from tfrec_recall.data import InteractionData, leave_last_out, make_drifting
from tfrec_recall.features import EXAMPLE_AGE, ExampleAgeFeature, FeatureSpec, IdFeature, feature_arrays
from tfrec_recall.layers import MLPTower

DAY = 86400


def test_ages_are_days_before_the_latest_training_timestamp_and_zero_at_serving():
    spec = ExampleAgeFeature.from_timestamps(EXAMPLE_AGE, [0, DAY, 4 * DAY])
    # Reference time 4 days: ages 4, 3, 0 days; mean 7/3, variance ((5/3)^2 + (2/3)^2 + (7/3)^2) / 3 = 26/9.
    np.testing.assert_allclose(spec.ages([0, DAY, 4 * DAY]), [4.0, 3.0, 0.0])
    assert spec.mean == pytest.approx(7 / 3) and spec.variance == pytest.approx(26 / 9)
    assert spec.ages([5 * DAY])[0] == 0.0  # later than the reference: clipped to "now"
    assert spec.serving_default == 0.0 and FeatureSpec.from_dict(spec.to_dict()) == spec
    # An age absent from a tf.Example is "now" too, not the training mean.
    assert spec.parse_spec().default_value == 0.0 and float(spec.dummy_input()[0]) == 0.0
    with pytest.raises(ValueError, match=r"example_age \(example age\) needs varying, finite training timestamps; "
                                         r"got 1 distinct value\(s\) over 3 rows"):
        ExampleAgeFeature.from_timestamps(EXAMPLE_AGE, [7, 7, 7])
    with pytest.raises(ValueError, match=r"age.time_unit must be a finite number > 0, got 0"):
        ExampleAgeFeature("age", time_unit=0)


def test_training_rows_carry_their_age_and_every_other_path_uses_zero():
    split = leave_last_out(make_drifting(num_users=60, num_items=50, seed=1), history_length=5)
    from tfrec_recall.features import specs_from_split
    specs = specs_from_split(split, use_example_age=True, use_side_features=False)
    age = [s for s in specs["query"] if s.name == EXAMPLE_AGE][0]
    latest = split.train["timestamp"].max()
    assert age.reference_time == latest
    train = feature_arrays(split.train, split.data, [age], training=True)[EXAMPLE_AGE]
    np.testing.assert_allclose(train, (latest - split.train["timestamp"].to_numpy()) / DAY, rtol=1e-6)
    assert train.min() == 0.0 and train.max() > 10
    test = feature_arrays(split.test, split.data, [age])[EXAMPLE_AGE]
    np.testing.assert_array_equal(test, np.zeros(len(split.test), np.float32))


def test_the_training_batch_of_a_built_model_carries_the_ages():
    from tfrec_recall.training import build_model, training_arrays
    split = leave_last_out(make_drifting(num_users=60, num_items=50, seed=2), history_length=5)
    model = build_model(load_config("youtube_dnn", overrides={"example_age": True, "use_side_features": False,
                                                              "history_length": 5}), split)
    ages = training_arrays(model, split)[EXAMPLE_AGE]
    latest = split.train["timestamp"].max()
    np.testing.assert_allclose(ages, (latest - split.train["timestamp"].to_numpy()) / DAY, rtol=1e-6)
    assert "example_age" not in [s.name for s in model.query_tower.serving_specs]


def test_the_tower_fills_an_absent_age_with_zero():
    tf.keras.utils.set_random_seed(0)
    age = ExampleAgeFeature(EXAMPLE_AGE, mean=10.0, variance=25.0, reference_time=100.0)
    tower = MLPTower([IdFeature("user_id", 4, vocabulary=("a", "b")), age], hidden_units=(6,), output_dim=4)
    users = tf.constant(["a", "b", "zz"])
    now = tower({"user_id": users, EXAMPLE_AGE: tf.zeros(3)}).numpy()
    np.testing.assert_allclose(tower({"user_id": users}).numpy(), now, rtol=1e-6)
    assert not np.allclose(tower({"user_id": users, EXAMPLE_AGE: tf.fill([3], 30.0)}).numpy(), now)
    with pytest.raises(KeyError, match=r"input feature 'user_id' is missing"):
        tower({EXAMPLE_AGE: tf.zeros(3)})


def test_example_age_needs_timestamps_at_config_time():
    frame = pd.DataFrame({"user_id": [f"u{u}" for u in range(6) for _ in range(4)],
                          "item_id": [f"i{(u + j) % 7}" for u in range(6) for j in range(4)],
                          "timestamp": np.zeros(24, dtype=np.int64)})
    split = leave_last_out(InteractionData(frame, name="no-time"), history_length=3)
    from tfrec_recall.training import build_model
    config = load_config("two_tower", overrides={"example_age": True})
    with pytest.raises(ConfigError, match=r"config key 'example_age': example_age \(example age\) needs varying"):
        build_model(config, split)


def test_drifting_data_has_a_time_trend():
    data = make_drifting(num_users=300, num_items=200, seed=0)
    again = make_drifting(num_users=300, num_items=200, seed=0)
    pd.testing.assert_frame_equal(data.interactions, again.interactions)
    frame = data.interactions.join(data.item_features["release_day"], on="item_id")
    day = frame["timestamp"] / DAY
    early, late = frame[day < 20], frame[day > 80]
    # Items are picked only after release and mostly within a few lifetimes of it.
    assert (frame["release_day"] <= day + 1e-9).all()
    assert late["release_day"].mean() - early["release_day"].mean() > 40
    with pytest.raises(ValueError, match=r"lifetime_days must be a finite number > 0, got 0"):
        make_drifting(lifetime_days=0)
