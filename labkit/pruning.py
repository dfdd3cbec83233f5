"""Unstructured pruning: masks, schedules, prune + fine-tune + strip, sensitivity, 2:4, XNNPACK.

Owns THE magnitude mask (checked against tfmot's), tfmot's schedules, THE prune + fine-tune +
strip (`prune`, on models.fine_tune, set by a `PruneSettings`), the one-shot per-layer
sensitivity sweep and the targets derived from it, 2:4 checks and XNNPACK's sparse path.
Filter removal is labkit.structured's; `python -m labkit.targets.pruning` measures the targets.
Only kernels are pruned: biases and batch-norm parameters (0.2% of the baseline's) stay dense.
"""
from __future__ import annotations

import io
import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads

tf = labkit.import_tensorflow_quietly(start_runtime=False)  # its C++ start-up lines
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

# The wrapper class is not exported by tfmot's public API; its own callbacks import it from here.
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (  # noqa: E402
    PruneLowMagnitude,
)

from labkit import ARTIFACTS_DIR, measure, models, tflite  # noqa: E402

PRUNING_DIR = ARTIFACTS_DIR / "pruning"
SCHEDULES = ("polynomial", "constant")
SWEEP_SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
sparsity_api = tfmot.sparsity.keras
NUMBERS = (int, float, np.floating, np.integer)


# ----------------------------------------------------------------------------- checks

def check_sparsity(sparsity, name: str = "sparsity") -> float:
    """A sparsity is the fraction of weights set to zero, in [0, 1) (1 would remove them all)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, NUMBERS):
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the fraction of weights set to zero), "
                         f"got {sparsity}")
    return float(sparsity)


def check_layers(model, names=None) -> list[str]:
    """The names (None: every weight layer), checked against the model's weight layers."""
    allowed = models.weight_layers(model)
    names = allowed if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown layer name(s) {unknown}: the prunable layers of {model.name} "
                         f"are {allowed}")
    return names


def layer_sparsity(model, layers=None) -> pd.DataFrame:
    """Zeros in each weight layer's kernel, and the total over them."""
    rows = []
    for name in check_layers(model, layers):
        kernel = models.kernel(model, name)
        rows.append({"layer": name, "weights": kernel.size, "zeros": int(np.sum(kernel == 0))})
    table = pd.DataFrame(rows).set_index("layer")
    table.loc["all kernels"] = table.sum()
    table["sparsity"] = table["zeros"] / table["weights"]
    return table


# ----------------------------------------------------------------------------- masks from scratch

def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """True for the weights kept: the round(n * (1 - sparsity)) largest magnitudes (at least one).

    The count is rounded in float32, half to even, and weights tied with the smallest kept
    magnitude are kept too, as tfmot does, so the two agree exactly. Prune with `weights * mask`.
    """
    check_sparsity(sparsity)
    magnitudes = np.abs(weights)
    kept = np.round(np.float32(magnitudes.size) * (np.float32(1) - np.float32(sparsity)))
    keep = max(int(kept), 1)
    threshold = np.partition(magnitudes.ravel(), magnitudes.size - keep)[magnitudes.size - keep]
    return magnitudes >= threshold


def layer_masks(model, sparsity) -> dict:
    """One threshold per layer: each layer loses the same fraction (a float) or its own (a dict)."""
    targets = (sparsity if isinstance(sparsity, dict)
               else dict.fromkeys(check_layers(model), sparsity))
    check_layers(model, targets)
    return {name: magnitude_mask(models.kernel(model, name), s) for name, s in targets.items()}


def global_masks(model, sparsity: float, layers=None) -> dict:
    """One threshold for all chosen layers together: small-magnitude layers lose more."""
    check_sparsity(sparsity)
    names = check_layers(model, layers)
    kernels = {name: models.kernel(model, name) for name in names}
    everything = np.concatenate([np.abs(k).ravel() for k in kernels.values()])
    threshold = everything[magnitude_mask(everything, sparsity)].min()
    return {name: np.abs(k) >= threshold for name, k in kernels.items()}


def apply_masks(model, masks: dict):
    """A copy of `model` with each masked kernel's pruned weights set to zero."""
    check_layers(model, masks)
    copy = models.clone_with_weights(model)
    for name, mask in masks.items():
        layer = copy.get_layer(name)
        layer.kernel.assign(layer.kernel.numpy() * mask)
    return copy


def tfmot_masks(model, sparsity) -> dict:
    """The masks tfmot computes for `model`'s current weights, without training.

    Each layer is wrapped with ConstantSparsity(sparsity, begin_step=0), its step set to 0 and
    tfmot's mask update run once. tfmot has no public "compute the mask now" call (it updates
    masks only inside a training step), so this reaches in.
    """
    targets = (sparsity if isinstance(sparsity, dict)
               else {n: sparsity for n in models.weight_layers(model)})
    wrapped = wrap(model, {name: constant_schedule(s, frequency=1) for name, s in targets.items()})
    wrapped(np.zeros((1, *model.input_shape[1:]), np.float32), training=False)  # build the masks
    masks = {}
    for layer in (layer for layer in wrapped.layers if isinstance(layer, PruneLowMagnitude)):
        layer.pruning_step.assign(0)
        layer.pruning_obj.conditional_mask_update()   # what the wrapper runs in a training step
        masks[layer.layer.name] = layer.pruning_vars[0][1].numpy().astype(bool)
    return masks


def mask_sparsity(masks: dict) -> pd.Series:
    """Fraction of zeros per mask, and over all masks together."""
    out = {name: 1 - m.mean() for name, m in masks.items()}
    kept, total = sum(m.sum() for m in masks.values()), sum(m.size for m in masks.values())
    out["all kernels"] = 1 - kept / total
    return pd.Series(out, name="sparsity")


# ------------------------------------------------------------------------ tfmot: schedules, prune

def constant_schedule(sparsity: float, begin_step: int = 0, frequency: int = 10):
    """Jump to `sparsity` at begin_step and re-prune to it every `frequency` steps."""
    return sparsity_api.ConstantSparsity(check_sparsity(sparsity), begin_step=begin_step,
                                         frequency=frequency)


def polynomial_schedule(sparsity: float, end_step: int, begin_step: int = 0, frequency: int = 10,
                        initial_sparsity: float = 0.0):
    """Ramp from initial_sparsity to `sparsity` on a cubic curve from begin_step to end_step."""
    return sparsity_api.PolynomialDecay(check_sparsity(initial_sparsity, "initial_sparsity"),
                                        check_sparsity(sparsity), begin_step=begin_step,
                                        end_step=end_step, frequency=frequency)


def schedule_curve(schedule, steps: int) -> pd.DataFrame:
    """What a schedule asks for at each step: the target sparsity and whether masks are updated."""
    rows = []
    for step in range(steps):
        update, sparsity = schedule(tf.constant(step, tf.int64))
        rows.append({"step": step, "sparsity": float(sparsity), "update": bool(update)})
    return pd.DataFrame(rows)


def wrap(model, schedules, layers=None, m_by_n=None):
    """A copy of `model` whose chosen layers are wrapped by tfmot's prune_low_magnitude.

    One schedule for `layers` (None: every weight layer) or {layer: schedule} (None: left
    unwrapped). The model is cloned first because tfmot's wrappers reuse the layer objects they
    wrap.
    """
    if isinstance(schedules, dict):
        check_layers(model, schedules)
        per_layer = {name: s for name, s in schedules.items() if s is not None}
    else:
        names = check_layers(model, layers)
        per_layer = {name: schedules for name in names}
    if m_by_n is not None:
        if not 0 < m_by_n[0] < m_by_n[1]:
            raise ValueError(f"m_by_n=(m, n) means m zeros in every n weights, so 0 < m < n; "
                             f"got {m_by_n}")
    source = models.clone_with_weights(model)

    def clone_function(layer):
        if layer.name in per_layer:
            return sparsity_api.prune_low_magnitude(layer, pruning_schedule=per_layer[layer.name],
                                                    sparsity_m_by_n=m_by_n)
        return layer

    return keras.models.clone_model(source, clone_function=clone_function)


def strip(model):
    """The plain Keras model inside the wrappers: masked weights, no mask variables.

    tfmot's strip_pruning hands back layers still shared with the wrapped model (a layer in two
    graphs breaks whatever reads its output later), so the result is cloned into a model of its
    own.
    """
    return models.clone_with_weights(sparsity_api.strip_pruning(model))


def sparsity_trace(wrapped, rows: list, every: int = 5):
    """A callback adding each wrapped layer's mask sparsity to `rows` every `every` steps."""
    def record(batch, logs=None):
        step = int(wrapped.optimizer.iterations.numpy())
        if step % every == 0 or step == 1:
            rows.extend({"step": step, "layer": layer.layer.name,
                         "sparsity": float(1 - layer.pruning_vars[0][1].numpy().mean())}
                        for layer in wrapped.layers if isinstance(layer, PruneLowMagnitude))
    return keras.callbacks.LambdaCallback(on_train_batch_end=record)


@dataclass(frozen=True)
class PruneSettings:
    """What `prune` does; `cached_prune` keys its entry by these and the input model's weights.

    `targets`: {layer: sparsity} (0: left dense) or one sparsity for `layers` (None: every weight
    layer). `plan`: the fine-tune (models.FineTune). "polynomial" ramps each layer from 0 to its
    target, reached `ramp` of the way through the steps so the rest can recover; "constant" asks
    for it from step 0. Masks are updated every `frequency` steps (None: a twentieth of them);
    m_by_n=(2, 4): 2 zeros in every 4 inputs.
    """
    targets: float | dict
    plan: models.FineTune
    schedule: str = "polynomial"
    ramp: float = 0.6
    frequency: int | None = None
    layers: tuple | list | None = None
    m_by_n: tuple | None = None

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 < self.ramp <= 1.0:
            raise ValueError(f"ramp is the fraction of the steps at which the target is reached, "
                             f"in (0, 1]; got {self.ramp}")
        if isinstance(self.targets, dict) and self.layers is not None:
            raise ValueError("per-layer targets name their layers already: pass layers only with "
                             "one sparsity")


def prune(model, settings: PruneSettings, splits, *, progress: bool = True, callbacks=()):
    """Magnitude-prune a copy of `model` while fine-tuning it by settings.plan, then strip.

    Returns (model, record): models.fine_tune's record plus the settings and a sparsity trace.
    `cached_prune` caches it.
    """
    s = settings
    targets = s.targets
    if not isinstance(targets, dict):
        targets = dict.fromkeys(models.weight_layers(model) if s.layers is None else s.layers,
                                targets)
    targets = {name: check_sparsity(v, f"the sparsity of {name}") for name, v in targets.items()}
    check_layers(model, targets)
    steps = s.plan.steps(len(splits.x_train))
    frequency = max(steps // 20, 1) if s.frequency is None else int(s.frequency)

    def schedule_for(sparsity):
        if s.schedule == "constant":
            return constant_schedule(sparsity, frequency=frequency)
        return polynomial_schedule(sparsity, end_step=max(int(s.ramp * steps), 1),
                                   frequency=frequency)

    wrapped = wrap(model, {name: schedule_for(v) if v > 0 else None for name, v in targets.items()},
                   m_by_n=s.m_by_n)
    trace = []
    # UpdatePruningStep advances the wrappers' step counter: without it tfmot stops on batch one
    callbacks = [sparsity_api.UpdatePruningStep(), sparsity_trace(wrapped, trace), *callbacks]
    record = models.fine_tune(wrapped, splits, s.plan, callbacks=callbacks, progress=progress,
                              description="prune")
    record.update(targets=targets, schedule=s.schedule, ramp=s.ramp, frequency=frequency,
                  m_by_n=None if s.m_by_n is None else list(s.m_by_n), trace=trace)
    return strip(wrapped), record


def cached_prune(name: str, model, settings: PruneSettings, splits, *,
                 directory: Path = PRUNING_DIR, progress: bool = True):
    """`prune` through models.cached: the entry's key covers the settings and `model`'s weights."""
    return models.cached(name, asdict(settings), [model],
                         lambda: prune(model, settings, splits, progress=progress), directory)


# ----------------------------------------------------------------------------- sensitivity

def sensitivity_sweep(model, x_val, y_val, sparsities=SWEEP_SPARSITIES, layers=None,
                      progress: bool = True) -> pd.DataFrame:
    """Validation accuracy with one layer at a time magnitude-pruned in one shot (no fine-tuning).

    Columns layer, sparsity, val_accuracy and drop (unpruned accuracy - val_accuracy). Each layer
    (None: every weight layer) has a row at sparsity 0.0, the unpruned model. One working copy is
    reused (kernel overwritten, then restored), so the graph is traced once.
    """
    sparsities = sorted({check_sparsity(s) for s in sparsities} - {0.0})
    names = check_layers(model, layers)
    work = models.clone_with_weights(model)
    runner = measure.tf_function(work)
    base = measure.accuracy(runner, x_val, y_val)
    rows = []
    with labkit.progress_bar(total=len(names) * len(sparsities), desc="sensitivity",
                             disable=not progress) as bar:
        for name in names:
            layer = work.get_layer(name)
            kernel = (layer.depthwise_kernel if isinstance(layer, keras.layers.DepthwiseConv2D)
                      else layer.kernel)
            original = kernel.numpy()
            rows.append({"layer": name, "sparsity": 0.0, "val_accuracy": base})
            for s in sparsities:
                kernel.assign(original * magnitude_mask(original, s))
                rows.append({"layer": name, "sparsity": s,
                             "val_accuracy": measure.accuracy(runner, x_val, y_val)})
                bar.update(1)
            kernel.assign(original)
    sweep = pd.DataFrame(rows)
    sweep["drop"] = base - sweep["val_accuracy"]
    return sweep


CSV_STORE = models.Store(".csv", lambda table, path: table.to_csv(path, index=False), pd.read_csv)


def cached_sweep(model, splits, sparsities=SWEEP_SPARSITIES, layers=None, *,
                 directory: Path = PRUNING_DIR, progress: bool = True) -> pd.DataFrame:
    """sensitivity_sweep on the validation split, a CSV table in the one cache (models.cached)."""
    def sweep():
        found = sensitivity_sweep(model, splits.x_val, splits.y_val, sparsities, layers,
                                  progress=progress)
        # read back from CSV text, as a cached sweep is read back: the same floats either way
        return pd.read_csv(io.StringIO(found.to_csv(index=False))), {}
    table, _ = models.cached("sensitivity", {"sparsities": sorted(sparsities), "layers": layers},
                             [model], sweep, directory, kind=CSV_STORE)
    return table


def accuracy_drop_curve(sweep: pd.DataFrame, layer: str, step: float = 0.01) -> pd.Series:
    """One layer's accuracy drop (fraction) on a fine sparsity grid: interpolated between swept
    points and made non-decreasing, since pruning more can only be assumed to hurt more."""
    curve = sweep[sweep["layer"] == layer].sort_values("sparsity")
    sparsity, drop = curve["sparsity"].to_numpy(float), curve["drop"].to_numpy(float)
    if sparsity[0] > 0:   # the unpruned model loses nothing
        sparsity, drop = np.r_[0.0, sparsity], np.r_[0.0, drop]
    grid = np.round(np.arange(0.0, sparsity.max() + 1e-9, step), 6)
    drops = np.maximum.accumulate(np.maximum(np.interp(grid, sparsity, drop), 0.0))
    return pd.Series(drops, index=grid, name=layer)


def targets_from_sensitivity(sweep: pd.DataFrame, weights: dict, overall: float,
                             step: float = 0.01) -> dict:
    """Per-layer sparsities that zero `overall` of all the weights for the least predicted
    accuracy loss.

    Greedy: start every layer at 0 and keep raising, by `step`, the layer whose next step costs the
    least validation accuracy per weight removed, until the weighted sparsity reaches `overall`.
    A small layer gives few zeros for its accuracy, so it stays dense unless its curve is flat.
    """
    check_sparsity(overall, "overall")
    missing = set(weights) - set(sweep["layer"])
    if missing:
        raise ValueError(f"no sensitivity curve for layers {sorted(missing)}; "
                         f"swept: {sorted(set(sweep['layer']))}")
    curves = {name: accuracy_drop_curve(sweep, name, step) for name in weights}
    total = sum(weights.values())
    if sum(weights[n] * curves[n].index[-1] for n in weights) / total < overall:
        raise ValueError(f"overall sparsity {overall} is beyond the swept range: "
                         "sweep higher sparsities")

    def cost(name):
        curve, i = curves[name], position[name]
        if i + 1 >= len(curve):
            return np.inf
        return (curve.iloc[i + 1] - curve.iloc[i]) / (weights[name] * step)

    position, zeros, last = {name: 0 for name in weights}, 0.0, None
    while zeros / total < overall:
        last = min(weights, key=lambda n: (cost(n), -weights[n]))
        position[last] += 1
        zeros += weights[last] * step
    targets = {name: float(curves[name].index[position[name]]) for name in weights}
    if last is not None:   # the last step may overshoot: the layer that moved last gives it back
        targets[last] = round(targets[last] - (zeros - overall * total) / weights[last], 6)
    return targets


HEADLINE_SPARSITY = 0.8
UNSTRUCTURED_PLAN = models.FineTune(train_subset=20000, epochs=1, learning_rate=5e-4)
UNSTRUCTURED_FREQUENCY = 10   # mask updates every 10 steps, as in the schedules drawn by the book


def target_checks(table: pd.DataFrame) -> pd.DataFrame:
    """The chapter's targets from one run's table (rows baseline, unstructured, structured)."""
    base, sparse, small = (table.loc[n] for n in ("baseline", "unstructured", "structured"))
    rows = [  # (target, measured, unit, at most or at least, goal)
        ("80% unstructured: test accuracy drop", 100 * (base["accuracy"] - sparse["accuracy"]),
         "points", "<=", 0.3),
        ("80% unstructured: gzipped .tflite smaller by", base["gzip_bytes"] / sparse["gzip_bytes"],
         "x", ">=", 3),
        ("structured: MACs cut by", base["macs"] / small["macs"], "x", ">=", 2),
        ("structured: test accuracy drop", 100 * (base["accuracy"] - small["accuracy"]),
         "points", "<=", 0.5),
        ("structured: LiteRT p50 speed-up", base["latency_p50_us"] / small["latency_p50_us"],
         "x", ">=", 1.5),
    ]
    out = pd.DataFrame(rows, columns=["target", "measured", "unit", "bound", "goal"])
    out["met"] = np.where(out["bound"] == "<=", out["measured"] <= out["goal"],
                          out["measured"] >= out["goal"])
    return out.set_index("target")


# ----------------------------------------------------------------------------- m:n sparsity

def m_by_n_violations(kernel: np.ndarray, m: int = 2, n: int = 4) -> int:
    """Groups of n consecutive weights along the input axis holding fewer than m zeros.

    The input axis is axis 0 of a Dense kernel (inputs, outputs) and axis 2 of a Conv2D kernel
    (height, width, inputs, outputs): the axis a matrix engine sums over.
    """
    if not 0 < m < n:
        raise ValueError(f"m:n sparsity needs 0 < m < n, got m={m}, n={n}")
    moved = np.moveaxis(kernel, -2, -1)  # inputs last
    if moved.shape[-1] % n:
        raise ValueError(f"the input axis has {moved.shape[-1]} weights, not a multiple of n={n}")
    return int(np.sum((moved.reshape(-1, n) == 0).sum(axis=1) < m))


# ----------------------------------------------------------------------------- LiteRT and XNNPACK

def export_tflite(model, path, sparse_encoding: bool = False) -> Path:
    """Float32 .tflite; with sparse_encoding the converter stores sparse weights compactly,
    unpacked at load by DENSIFY ops (tf.lite.Optimize.EXPERIMENTAL_SPARSITY)."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if sparse_encoding:
        converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    return models.save_tflite(converter, path)


def sparse_ready_cnn(width: int = 16, seed: int = 0):
    """A small MobileNet-style CNN that tfmot's PruneForLatencyOnXNNPack policy accepts.

    XNNPACK's sparse path needs a padded 3x3 stride-2 convolution on 3 channels first (MNIST's one
    channel is repeated three times), then depthwise 3x3 and 1x1 convolutions only, ending in a
    spatial mean.
    """
    keras.utils.set_random_seed(seed)
    layers = keras.layers

    def bn_relu(x, name):
        # momentum 0.9: the short training here would leave 0.99-momentum statistics stale
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    inputs = keras.Input(shape=(28, 28, 1), name="image")
    x = layers.Concatenate(name="to_rgb")([inputs, inputs, inputs])
    x = layers.ZeroPadding2D(1, name="stem_pad")(x)
    x = bn_relu(layers.Conv2D(width, 3, strides=2, use_bias=False, name="stem")(x), "stem")
    blocks = [(2 * width, 1), (4 * width, 2), (4 * width, 1)]
    for i, (channels, stride) in enumerate(blocks, start=1):
        if stride == 2:   # explicit padding before a strided depthwise convolution, as asked
            x = layers.ZeroPadding2D(1, name=f"dw{i}_pad")(x)
        x = bn_relu(layers.DepthwiseConv2D(3, strides=stride,
                                           padding="valid" if stride == 2 else "same",
                                           use_bias=False, name=f"dw{i}")(x), f"dw{i}")
        x = bn_relu(layers.Conv2D(channels, 1, use_bias=False, name=f"pw{i}")(x), f"pw{i}")
    x = layers.GlobalAveragePooling2D(keepdims=True, name="mean")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="sparse_ready_cnn")


def prune_for_xnnpack(model, sparsity: float, begin_step: int = 0, frequency: int = 10):
    """tfmot's XNNPACK policy: wrap only the 1x1 convolutions, after checking the whole graph fits
    XNNPACK's sparse path (a ValueError says which layer breaks it)."""
    return sparsity_api.prune_low_magnitude(
        models.clone_with_weights(model),
        pruning_schedule=constant_schedule(sparsity, begin_step, frequency),
        pruning_policy=sparsity_api.PruneForLatencyOnXNNPack())


SPARSE_READY_TRAIN = models.FineTune(train_subset=20000, epochs=2, learning_rate=1e-2)
SPARSE_READY_PRUNE = models.FineTune(train_subset=20000, epochs=1, learning_rate=1e-3)


def sparse_ready_models(splits, sparsity: float = 0.75, *,
                        train_plan: models.FineTune = SPARSE_READY_TRAIN,
                        prune_plan: models.FineTune = SPARSE_READY_PRUNE,
                        directory: Path = PRUNING_DIR, progress: bool = True):
    """The sparse-ready CNN trained from scratch and a copy pruned by the XNNPACK policy, cached."""
    check_sparsity(sparsity)
    start = sparse_ready_cnn()
    dense, _ = models.cached("sparse-ready-cnn", {"plan": asdict(train_plan)}, [start], lambda: (
        start, models.fine_tune(start, splits, train_plan, progress=progress)), directory)

    def pruned():
        wrapped = prune_for_xnnpack(dense, sparsity)
        record = models.fine_tune(wrapped, splits, prune_plan,
                                  callbacks=[sparsity_api.UpdatePruningStep()],
                                  progress=progress, description="prune")
        return strip(wrapped), record
    settings = {"sparsity": sparsity, "plan": asdict(prune_plan)}
    return dense, models.cached("sparse-ready-cnn-pruned", settings, [dense], pruned, directory)[0]


def xnnpack_report(path) -> dict:
    """What the LiteRT interpreter itself says about a model under the XNNPACK delegate.

    XNNPACK considers its sparse path only when (1) the graph has the layout tfmot's
    PruneForLatencyOnXNNPack checks, (2) it takes the DENSIFY ops (weights stored sparse) into its
    partition, and (3) the CPU is not an x86 with AVX: there its sparse kernels (SSE only) are
    expected to lose to dense AVX code.
    """
    ops = tflite.delegated_ops(path).to_dict("records")   # as XNNPACK runs them
    delegated = [op for op in ops if op["op"] == "DELEGATE"]
    delegated_inputs = {i for op in delegated for i in op["inputs"]}
    densify = [op for op in ops if op["op"] == "DENSIFY"]
    cpuinfo = Path("/proc/cpuinfo")
    has_avx = (cpuinfo.is_file()
               and re.search(r"^flags.*\bavx\b", cpuinfo.read_text(), re.M) is not None)
    x86_avx = has_avx and platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    handed = bool(densify) and all(op["inputs"][0] in delegated_inputs for op in densify)
    return {"model ops": len(ops) - len(delegated), "XNNPACK partitions": len(delegated),
            "DENSIFY ops": len(densify), "sparse weights handed to XNNPACK": handed,
            "x86 CPU with AVX": x86_avx, "XNNPACK sparse kernels enabled on this CPU": not x86_avx}
