"""labkit.distill: the loss against Keras' own losses and its gradient against the formula,
soft targets, the student's layout, a tiny student trained and cached (a different teacher, a
different entry), the targets, and bad settings (tiny models, seconds)."""
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import tf_keras as keras

from labkit import distill, measure, models


def batch(seed=0, n=64):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    teacher = (3 * rng.standard_normal((n, 10))).astype(np.float32)
    student = (2 * rng.standard_normal((n, 10))).astype(np.float32)
    return labels, teacher, student


def test_loss_is_cross_entropy_at_T1_without_soft_term():
    labels, teacher, student = batch()
    ours = distill.distillation_loss(labels, teacher, student, temperature=1.0, alpha=1.0).numpy()
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    keras_ce = cross_entropy(labels, student).numpy()
    np.testing.assert_allclose(ours, keras_ce, rtol=1e-5, atol=1e-6)
    # without the soft term the temperature and the teacher play no part
    other = distill.distillation_loss(labels, -teacher, student, temperature=7.0, alpha=1.0).numpy()
    np.testing.assert_allclose(other, keras_ce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.5, 8.0])
def test_soft_term_is_keras_kl_times_T_squared(temperature):
    labels, teacher, student = batch(1)
    ours = distill.distillation_loss(labels, teacher, student, temperature, alpha=0.0).numpy()
    kl = keras.losses.KLDivergence(reduction="none")(tf.nn.softmax(teacher / temperature),
                                                      tf.nn.softmax(student / temperature)).numpy()
    np.testing.assert_allclose(ours, temperature ** 2 * kl, rtol=1e-4, atol=1e-6)
    # a student that copies its teacher has nothing left to learn from it
    same = distill.distillation_loss(labels, teacher, teacher, temperature, alpha=0.0).numpy()
    np.testing.assert_allclose(same, 0.0, atol=1e-5)


def test_mixture_is_linear_in_alpha():
    labels, teacher, student = batch(2)
    hard = distill.distillation_loss(labels, teacher, student, 4.0, 1.0).numpy()
    soft = distill.distillation_loss(labels, teacher, student, 4.0, 0.0).numpy()
    mixed = distill.distillation_loss(labels, teacher, student, 4.0, 0.3).numpy()
    np.testing.assert_allclose(mixed, 0.3 * hard + 0.7 * soft, rtol=1e-5, atol=1e-6)


def test_alpha_is_the_labels_weight():
    """Keras's distillation example: alpha * CE(labels) + (1 - alpha) * T^2 * KL; alpha = 1 is
    labels only."""
    config = distill.StudentConfig()
    assert config.alpha == pytest.approx(0.1), "the default puts 0.9 on the teacher"
    assert replace(config, alpha=1.0).name.endswith("-labels")
    assert config.name.endswith(f"-T{config.temperature:g}")
    labels, teacher, student = batch(5)
    loss = distill.distillation_loss(labels, teacher, student, 2.0, 0.25).numpy()
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    ce = cross_entropy(labels, student).numpy()
    kl = keras.losses.KLDivergence(reduction="none")(tf.nn.softmax(teacher / 2.0),
                                                      tf.nn.softmax(student / 2.0)).numpy()
    np.testing.assert_allclose(loss, 0.25 * ce + 0.75 * 4.0 * kl, rtol=1e-4, atol=1e-6)


def test_soft_gradient_matches_the_formula():
    """d(T^2 KL)/d(student logits) = T * (softmax(s/T) - softmax(t/T)): the T^2 keeps it from
    vanishing."""
    labels, teacher, student = batch(3, n=8)
    T = 4.0
    s = tf.Variable(student)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(distill.distillation_loss(labels, teacher, s, T, 0.0))
    grad = tape.gradient(loss, s).numpy()
    expected = T * (distill.soft_targets(student, T) - distill.soft_targets(teacher, T))
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_soft_targets():
    logits = np.array([[8.0, 2.0, 0.0, -1.0]])
    np.testing.assert_allclose(distill.soft_targets(logits, 1.0), tf.nn.softmax(logits).numpy(),
                               rtol=1e-6)
    tops = [distill.soft_targets(logits, t).max() for t in (0.5, 1, 2, 4, 16)]
    assert all(a > b for a, b in zip(tops, tops[1:])), \
        "a higher temperature must soften the targets"
    np.testing.assert_allclose(distill.soft_targets(logits, 4.0).sum(), 1.0)


def test_packed_targets_through_keras_loss():
    labels, teacher, student = batch(4)
    packed = distill.pack_targets(labels, teacher)
    assert packed.shape == (64, 11)
    loss = distill.DistillationLoss(3.0, 0.6)(tf.constant(packed), tf.constant(student)).numpy()
    direct = distill.distillation_loss(labels, teacher, student, 3.0, 0.6).numpy().mean()
    np.testing.assert_allclose(loss, direct, rtol=1e-5)
    acc = distill.packed_accuracy(tf.constant(packed), tf.constant(student)).numpy()
    np.testing.assert_array_equal(acc, (student.argmax(1) == labels).astype(np.float32))


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), True, "4"])
def test_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        distill.check_temperature(bad)
    with pytest.raises(ValueError, match="temperature"):
        distill.distillation_loss([1], np.zeros((1, 10)), np.zeros((1, 10)), temperature=bad,
                                  alpha=0.5)


@pytest.mark.parametrize("bad", [-0.1, 1.5, None])
def test_bad_alpha(bad):
    with pytest.raises(ValueError, match="alpha"):
        distill.StudentConfig(alpha=bad)


def test_bad_student_shapes():
    with pytest.raises(ValueError, match="temperature"):
        distill.StudentConfig(temperature=0)
    with pytest.raises(ValueError, match="positive"):
        distill.build_student(distill.StudentConfig(conv_filters=(0, 4)))
    with pytest.raises(ValueError, match="epochs"):
        distill.StudentConfig(epochs=0)


def test_student_is_the_plain_cnn():
    config = distill.StudentConfig(conv_filters=(2, 4), dense_units=8, seed=3)
    student = distill.build_student(config)
    # no batch norm, no dropout
    assert [layer.name for layer in student.layers] == ["image", "conv1", "pool1", "conv2",
                                                        "pool2", "flatten", "dense1", "logits"]
    conv1 = student.get_layer("conv1")
    assert conv1.use_bias and conv1.get_config()["activation"] == "relu"
    same = models.build_cnn((2, 4), 8, batchnorm=False, dropout=0.0, seed=3)
    for a, b in zip(student.get_weights(), same.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_verdict():
    config = distill.StudentConfig(conv_filters=(2, 4), dense_units=8)
    table = pd.DataFrame({"test_accuracy": [0.90, 0.92, 0.99], "macs": [100, 100, 1000]},
                         index=[replace(config, alpha=1.0).name, config.name, "teacher (baseline)"])
    checks = distill.verdict(table, config).set_index("figure")
    assert checks["measured"].tolist() == pytest.approx([10.0, 0.02])
    assert checks["met"].all()
    short = table.assign(test_accuracy=[0.90, 0.903, 0.99], macs=[300, 300, 1000])
    assert not distill.verdict(short, config)["met"].any()   # 3.3x fewer MACs, +0.3 points


def test_student_size_check(tiny_model):
    small = distill.build_student(distill.StudentConfig(conv_filters=(2, 2), dense_units=8))
    assert distill.check_student_size(tiny_model, small) >= distill.MIN_MAC_RATIO
    big = distill.build_student(distill.StudentConfig(conv_filters=(8, 16), dense_units=32))
    with pytest.raises(ValueError, match="fewer MACs"):
        distill.check_student_size(tiny_model, big)


def test_tiny_student_trains_and_caches(tiny_model, tiny_plain_model, splits, tmp_path):
    config = distill.StudentConfig(conv_filters=(2, 4), dense_units=8, epochs=2, train_subset=256,
                                   temperature=4.0, alpha=0.5)
    model, record = distill.load_or_train_student(config, splits, tiny_model, directory=tmp_path,
                                                  progress=False)
    losses = record["history"]["loss"]
    assert losses[-1] < losses[0], f"the distillation loss did not fall: {losses}"
    assert record["macs"] == measure.count_macs(model) and not record["cached"]
    # the teacher's logits were cached for exactly the images used, under the teacher's weights
    cached = list(tmp_path.glob("teacher-logits-train-256-*.npy"))
    assert len(cached) == 1
    logits_record = json.loads(cached[0].with_suffix(".json").read_text())
    assert logits_record["inputs"] == [models.weights_key(tiny_model)]
    np.testing.assert_allclose(np.load(cached[0]),
                               tiny_model.predict(splits.x_train[:256], verbose=0), atol=1e-5)
    again, record2 = distill.load_or_train_student(config, splits, tiny_model, directory=tmp_path,
                                                   progress=False)
    x = splits.x_val[:32]
    np.testing.assert_array_equal(model(x).numpy(), again(x).numpy())
    assert record2["cached"] and record2["trained_at"] == record["trained_at"], \
        "the cached student was trained again"
    # another teacher, same settings: a new entry, not the first teacher's student
    other, record3 = distill.load_or_train_student(config, splits, tiny_plain_model,
                                                   directory=tmp_path, progress=False)
    assert not record3["cached"] and record3["inputs"] != record["inputs"]
    assert not np.array_equal(other(x).numpy(), model(x).numpy())
    assert len(list(tmp_path.glob(f"{config.name}-*.keras"))) == 2
    # labels only: a different cache entry, and no teacher needed
    labels_only, record4 = distill.load_or_train_student(replace(config, alpha=1.0), splits, None,
                                                         directory=tmp_path, progress=False)
    assert record4["inputs"] == []
    assert not np.array_equal(labels_only(x).numpy(), model(x).numpy())


def test_compare_seeds_averages_the_accuracies_over_seeds(monkeypatch):
    """compare() once per seed: the table holds the mean accuracy, runs every seed's row,
    students the first's."""
    calls = []

    def fake_compare(splits, config, temperatures, teacher, progress):
        calls.append(config.seed)
        names = [replace(config, alpha=1.0).name] + [replace(config, temperature=float(t)).name
                                                     for t in temperatures]
        table = pd.DataFrame({"val_accuracy": [0.95 + 0.01 * config.seed] * len(names),
                              "test_accuracy": [0.96 + 0.02 * config.seed] * len(names),
                              "macs": 100},
                             index=pd.Index(names, name="student"))
        return table, {"seed": config.seed}

    monkeypatch.setattr(distill, "compare", fake_compare)
    config = distill.StudentConfig(conv_filters=(2, 4), dense_units=8)
    table, runs, students = distill.compare_seeds(None, config, temperatures=(1.0, 4.0),
                                                  seeds=(0, 1, 2))
    assert calls == [0, 1, 2] and students == {"seed": 0}
    assert len(runs) == 9 and sorted(set(runs["seed"])) == [0, 1, 2]
    assert table["val_accuracy"].tolist() == pytest.approx([0.96] * 3)
    assert table["test_accuracy"].tolist() == pytest.approx([0.98] * 3) and "seed" not in table
    one, _, _ = distill.compare_seeds(None, config, temperatures=(4.0,), seeds=(2,))
    assert one["test_accuracy"].tolist() == pytest.approx([1.0, 1.0])
