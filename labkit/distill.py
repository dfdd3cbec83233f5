"""Knowledge distillation: a small student learns from the baseline's softened logits.

Owns: the student (models.build_cnn without batch norm or dropout), the distillation loss
(`distillation_loss`, checked against Keras' own losses), the teacher's logits (computed once,
cached), training a student (cached by models.cached, keyed by the settings and the teacher's
weights), the temperature comparison and the distillation target (`verdict`: the distilled
student beats the same student trained from labels). `python -m labkit.targets.distill` measures it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
import tf_keras as keras

from labkit import ARTIFACTS_DIR, measure, models

DISTILL_DIR = ARTIFACTS_DIR / "distill"
NUM_CLASSES = 10
MIN_MAC_RATIO = 4.0   # the student must need at least 4x fewer MACs than the teacher
MIN_GAIN = 0.005      # the distilled student must beat the label-trained one by half a point (test)


# ============================================================================ settings

def check_temperature(temperature) -> float:
    number = (not isinstance(temperature, bool)
              and isinstance(temperature, (int, float, np.floating, np.integer)))
    if not number or not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0 (1 leaves the logits as they "
                         f"are, larger values soften them), got {temperature!r}")
    return float(temperature)


def check_alpha(alpha) -> float:
    number = (not isinstance(alpha, bool)
              and isinstance(alpha, (int, float, np.floating, np.integer)))
    if not number or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is the weight of the labels' term, a number in [0, 1] "
                         f"(1: labels only, 0: teacher only), got {alpha!r}")
    return float(alpha)


@dataclass(frozen=True)
class StudentConfig:
    """A student and how it is trained; its hash (with the teacher's weights) names the cache
    entry."""
    conv_filters: tuple = (12, 24)   # the baseline's shape, thinner: 6.3x fewer MACs
    dense_units: int = 64
    temperature: float = 4.0
    alpha: float = 0.1               # the labels' weight (0.9 on the teacher); 1.0: labels alone
    epochs: int = 30
    train_subset: int | None = 2000  # distillation pays most when labelled data is scarce
    batch_size: int = 128
    learning_rate: float = 3e-3
    seed: int = 0

    def __post_init__(self):
        check_temperature(self.temperature)
        check_alpha(self.alpha)
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    @property
    def name(self) -> str:
        width = "-".join(map(str, self.conv_filters)) + f"-{self.dense_units}"
        if self.alpha == 1:
            return f"student-{width}-labels"
        return f"student-{width}-T{self.temperature:g}"


def build_student(config: StudentConfig = StudentConfig()) -> keras.Model:
    """The baseline's shape (models.build_cnn), thinner, without batch norm and without dropout.

    Batch norm's running averages need many steps to settle (momentum 0.99); a student
    trained for a few hundred steps would be judged on half-settled statistics.
    """
    return models.build_cnn(config.conv_filters, config.dense_units, batchnorm=False, dropout=0.0,
                            seed=config.seed, name="student_cnn")


# ============================================================================ the loss

def distillation_loss(labels, teacher_logits, student_logits, temperature: float = 4.0,
                      alpha: float = 0.1):
    """Per-image loss: alpha * CE(labels) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T)).

    The teacher's logits, divided by a temperature T and passed through a softmax, say not only
    which digit an image is but how much it looks like each of the others (a 7 that is a bit of
    a 1). The student is trained on a mix of the true label and that soft target:

        loss = alpha * CE(label, student)  +  (1 - alpha) * T**2 * KL(teacher_T || student_T)

    where ``x_T = softmax(logits / T)`` (Keras's distillation example weighs the two terms the
    same way: alpha is the weight of the labels). The T**2 keeps the soft term's gradients the
    same size as T changes (they shrink as 1/T**2 otherwise). alpha = 1 is plain training from
    labels.
    """
    temperature, alpha = check_temperature(temperature), check_alpha(alpha)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    student_logits = tf.convert_to_tensor(student_logits, tf.float32)
    hard = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=student_logits)
    if alpha == 1.0:
        return hard
    teacher_logits = tf.convert_to_tensor(teacher_logits, tf.float32)
    teacher_log_p = tf.nn.log_softmax(teacher_logits / temperature)
    student_log_p = tf.nn.log_softmax(student_logits / temperature)
    kl = tf.reduce_sum(tf.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
    return alpha * hard + (1.0 - alpha) * temperature ** 2 * kl


def pack_targets(labels: np.ndarray, teacher_logits: np.ndarray) -> np.ndarray:
    """Keras hands a loss only (y_true, y_pred): the label goes in column 0, the teacher's logits
    after it."""
    return np.concatenate([np.asarray(labels, np.float32)[:, None],
                           np.asarray(teacher_logits, np.float32)], axis=1)


class DistillationLoss(keras.losses.Loss):
    """distillation_loss on packed targets (see pack_targets)."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.1, name: str = "distillation"):
        super().__init__(name=name)
        self.temperature, self.alpha = check_temperature(temperature), check_alpha(alpha)

    def call(self, y_true, y_pred):
        return distillation_loss(y_true[:, 0], y_true[:, 1:], y_pred, self.temperature, self.alpha)


def packed_accuracy(y_true, y_pred):
    """Top-1 accuracy against the label in column 0 of packed targets."""
    labels = tf.cast(y_true[:, 0], tf.int64)
    return tf.cast(tf.equal(tf.argmax(y_pred, axis=-1), labels), tf.float32)


packed_accuracy.__name__ = "accuracy"   # the name the progress bar reads


def soft_targets(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) in NumPy: what the student is asked to match (the book plots it)."""
    z = np.asarray(logits, np.float64) / check_temperature(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


# ============================================================================ the teacher's logits

# The teacher's logits as a .npy file in the one cache (models.cached).
NPY_STORE = models.Store(".npy", lambda logits, path: np.save(path, logits), np.load)


def teacher_logits(teacher, x: np.ndarray, *, name: str = "train",
                   directory: Path = DISTILL_DIR) -> np.ndarray:
    """The teacher's logits on x, computed once (inference mode: no dropout) and cached by
    models.cached as teacher-logits-<name>-<images>-<key>.npy (key: the teacher's weights)."""
    def predict():
        return teacher.predict(x, batch_size=1000, verbose=0).astype(np.float32), {}
    logits, _ = models.cached(f"teacher-logits-{name}-{len(x)}", {"images": len(x)}, [teacher],
                              predict, directory, kind=NPY_STORE)
    return logits


# ============================================================================ training a student

def fit_student(model, x, y, logits, config: StudentConfig, progress: bool = True,
                callbacks=()) -> dict:
    """models.train on the distillation loss (deterministic, cosine decay); alpha=1 is labels only.

    Any model with logits out can be the student: the search fine-tunes its factored, pruned
    variants with it.
    """
    return models.train(model, x, pack_targets(y, logits), models.TrainSettings.of(config),
                        progress=progress, callbacks=list(callbacks),
                        loss=DistillationLoss(config.temperature, config.alpha),
                        metrics=[packed_accuracy], description=config.name)


def load_or_train_student(config: StudentConfig, splits, teacher=None, *,
                          directory: Path = DISTILL_DIR, progress: bool = True):
    """The trained student and its record, from models.cached or trained now.

    A distilled student's entry is keyed by its settings and the teacher's weights (None: the
    baseline); a label-trained one (alpha=1) needs no teacher and is keyed by its settings alone.
    """
    if config.alpha < 1 and teacher is None:
        teacher, _ = models.load_or_train_baseline()
    x, y = splits.x_train[:config.train_subset], splits.y_train[:config.train_subset]  # None: all

    def train():
        if config.alpha < 1:
            logits = teacher_logits(teacher, x, directory=directory)
        else:
            # unused: alpha=1 reads only the labels
            logits = np.zeros((len(x), NUM_CLASSES), np.float32)
        model = build_student(config)
        fit = fit_student(model, x, y, logits, config, progress=progress)
        val_accuracy = measure.accuracy(measure.keras_call(model), splits.x_val, splits.y_val)
        return model, {**fit, "macs": measure.count_macs(model),
                       "params": measure.count_params(model)["params"],
                       "val_accuracy": val_accuracy,
                       "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    teachers = [teacher] if config.alpha < 1 else []
    return models.cached(config.name, asdict(config), teachers, train, directory)


def mac_ratio(teacher, student) -> float:
    """How many times fewer multiply-accumulates the student needs per image."""
    return measure.count_macs(teacher) / measure.count_macs(student)


def check_student_size(teacher, student) -> float:
    ratio = mac_ratio(teacher, student)
    if ratio < MIN_MAC_RATIO:
        raise ValueError(f"the student needs only {ratio:.2f}x fewer MACs than the teacher; "
                         f"choose fewer filters or units for at least {MIN_MAC_RATIO:g}x")
    return ratio


# ============================================================================ comparisons

def compare(splits, config: StudentConfig = StudentConfig(), temperatures=(1.0, 4.0, 8.0),
            teacher=None, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """The same student from labels alone and distilled at each temperature: test and val accuracy.

    Returns (table, {name: model}); the table has one row per student and the teacher.
    """
    if teacher is None:
        teacher, _ = models.load_or_train_baseline()
    configs = [replace(config, alpha=1.0)] + [replace(config, temperature=float(t))
                                              for t in temperatures]
    rows, students = [], {}
    for c in configs:
        model, record = load_or_train_student(c, splits, teacher, progress=progress)
        check_student_size(teacher, model)
        students[c.name] = model
        runner = measure.keras_call(model)
        rows.append({"student": c.name, "alpha": c.alpha,
                     "temperature": c.temperature if c.alpha < 1 else None,
                     "val_accuracy": record["val_accuracy"],
                     "test_accuracy": measure.accuracy(runner, splits.x_test, splits.y_test),
                     "macs": record["macs"], "params": record["params"],
                     "train_seconds": round(record["train_seconds"], 1)})
    runner = measure.keras_call(teacher)
    rows.append({"student": "teacher (baseline)", "alpha": None, "temperature": None,
                 "val_accuracy": measure.accuracy(runner, splits.x_val, splits.y_val),
                 "test_accuracy": measure.accuracy(runner, splits.x_test, splits.y_test),
                 "macs": measure.count_macs(teacher),
                 "params": measure.count_params(teacher)["params"], "train_seconds": None})
    return pd.DataFrame(rows).set_index("student"), students


def compare_seeds(splits, config: StudentConfig = StudentConfig(), temperatures=(1.0, 4.0, 8.0),
                  seeds=(0,), teacher=None,
                  progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """compare() once per seed (each student trained, or read from the cache, once per seed).

    Returns (table, runs, students): `table` is compare()'s with the accuracies averaged over the
    seeds, `runs` every seed's rows (a `seed` column), `students` the first seed's models. With
    one seed (the book's) the table is that seed's own, and the gaps it shows rest on that seed.
    """
    per_seed, students = [], None
    for seed in seeds:
        table, found = compare(splits, replace(config, seed=int(seed)), temperatures, teacher,
                               progress)
        per_seed.append(table.assign(seed=int(seed)))
        students = found if students is None else students
    runs = pd.concat(per_seed)
    table = per_seed[0].drop(columns="seed")
    for column in ("val_accuracy", "test_accuracy"):
        table[column] = runs.groupby(level=0, sort=False)[column].mean()
    return table, runs, students


def export_tflite(model, config: StudentConfig, directory: Path = DISTILL_DIR) -> Path:
    """A float32 .tflite of a trained student (models.cached: written once per student's
    weights)."""
    path, _ = models.cached(config.name, {"format": "float32"}, [model], lambda: (model, {}),
                            directory, kind="tflite")
    return path


def verdict(table: pd.DataFrame, config: StudentConfig = StudentConfig()) -> pd.DataFrame:
    """The targets, from compare()'s table: the student needs >= MIN_MAC_RATIO x fewer MACs than
    the teacher, and distilled at config's temperature it beats the label-trained one by
    >= MIN_GAIN."""
    labels, student = table.loc[replace(config, alpha=1.0).name], table.loc[config.name]
    gain = student["test_accuracy"] - labels["test_accuracy"]
    measured = {"teacher / student MACs": table.loc["teacher (baseline)", "macs"] / student["macs"],
                "distilled minus labels-only test accuracy": gain}
    return measure.verdicts(measured, dict(zip(measured, (MIN_MAC_RATIO, MIN_GAIN))))
