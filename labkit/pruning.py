"""Pruning: tfmot magnitude pruning, masks from scratch, sensitivity, 2:4 and filter surgery (notebook 02).

Read it top to bottom next to the notebook:

1. settings checks and the cache of fine-tuned models;
2. tfmot: schedules, wrapping chosen layers, fine-tuning with a sparsity trace, stripping;
3. magnitude masks in NumPy (one threshold per layer, or one for the whole model) and tfmot's own
   mask on the same weights, to compare them;
4. per-layer sensitivity and the per-layer targets derived from it;
5. 2:4 (m:n) sparsity checks;
6. structured pruning: rank filters by L1 norm and build a genuinely smaller network;
7. LiteRT export, XNNPACK's sparse path, and the benchmark that prints the notebook's targets
   (`python -m labkit.pruning`).

Only the layers with a kernel are pruned. Biases and batch-norm parameters stay dense: together
they are 0.2% of the baseline's parameters.
"""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import labkit  # sets the legacy-Keras switch before TensorFlow loads
import numpy as np
import pandas as pd

with labkit.quiet_stderr():  # TensorFlow's C++ start-up lines, when this module is run as a script
    import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras
# The wrapper class is not exported by tfmot's public API; its own callbacks import it from here.
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import PruneLowMagnitude

from labkit import ARTIFACTS_DIR, measure, models

PRUNING_DIR = ARTIFACTS_DIR / "pruning"
sparsity_api = tfmot.sparsity.keras


# ----------------------------------------------------------------------------- 1. checks and cache

def check_sparsity(sparsity, name: str = "sparsity") -> float:
    """A sparsity is the fraction of weights set to zero: 0 <= sparsity < 1 (1 would remove everything)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the fraction of weights set to zero), got {sparsity}")
    return float(sparsity)


def _unwrap(layer):
    """The Keras layer inside a tfmot wrapper, or the layer itself."""
    return layer.layer if isinstance(layer, PruneLowMagnitude) else layer


def prunable_layers(model) -> list[str]:
    """Names of the layers that hold a kernel (Conv2D, DepthwiseConv2D, Dense), in model order."""
    kinds = (keras.layers.Conv2D, keras.layers.Dense)
    return [layer.name for layer in model.layers if isinstance(_unwrap(layer), kinds)]


def check_layers(model, names) -> list[str]:
    """The names, checked against the model's prunable layers (ValueError lists the allowed ones)."""
    names = [names] if isinstance(names, str) else list(names)
    allowed = prunable_layers(model)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown layer name(s) {unknown}: the prunable layers of {model.name} are {allowed}")
    return names


def kernel_of(model, name: str) -> np.ndarray:
    """A layer's kernel as a NumPy array, looking through a tfmot wrapper."""
    return _unwrap(model.get_layer(name)).kernel.numpy()


def cached(name: str, settings: dict, make, directory: Path = PRUNING_DIR):
    """A model built by `make() -> (model, info)`, saved as artifacts/pruning/<name>-<key>.keras.

    The key hashes `settings`, so changing any setting trains a new model; re-running a notebook
    with the same settings loads the file instead of training again.
    """
    path = Path(directory) / f"{name}-{models.settings_key(settings)}.keras"
    if (cached := models.load_cached(path)) is not None:
        return cached
    model, info = make()
    info = {"settings": settings, **info}
    models.save_cached(model, info, path)
    return model, info


# ----------------------------------------------------------------------------- 2. tfmot

def constant_schedule(sparsity: float, begin_step: int = 0, frequency: int = 10):
    """Jump to `sparsity` at begin_step and re-prune to it every `frequency` steps."""
    return sparsity_api.ConstantSparsity(check_sparsity(sparsity), begin_step=begin_step, frequency=frequency)


def polynomial_schedule(sparsity: float, end_step: int, begin_step: int = 0, frequency: int = 10,
                        initial_sparsity: float = 0.0):
    """Ramp from initial_sparsity to `sparsity` along a cubic curve between begin_step and end_step."""
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

    `schedules` is one schedule for every chosen layer or a dict {layer name: schedule}; a layer
    with target sparsity 0 may be given None and stays unwrapped. The model is cloned first
    because tfmot's wrappers reuse the layer objects they wrap.
    """
    if isinstance(schedules, dict):
        check_layers(model, schedules)
        per_layer = {name: s for name, s in schedules.items() if s is not None}
    else:
        names = check_layers(model, prunable_layers(model) if layers is None else layers)
        per_layer = {name: schedules for name in names}
    if m_by_n is not None:
        m, n = m_by_n
        if not 0 < m < n:
            raise ValueError(f"m_by_n=(m, n) means m zeros in every n weights, so 0 < m < n; got {m_by_n}")
    source = models.clone_with_weights(model)

    def clone_function(layer):
        if layer.name in per_layer:
            return sparsity_api.prune_low_magnitude(layer, pruning_schedule=per_layer[layer.name],
                                                    sparsity_m_by_n=m_by_n)
        return layer

    return keras.models.clone_model(source, clone_function=clone_function)


class SparsityTrace(keras.callbacks.Callback):
    """Records every wrapped layer's mask sparsity each `every` training steps."""

    def __init__(self, every: int = 5):
        super().__init__()
        self.every, self.rows = every, []

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every and step != 1:
            return
        for layer in self.model.layers:
            if isinstance(layer, PruneLowMagnitude):
                mask = layer.pruning_vars[0][1].numpy()
                self.rows.append({"step": step, "layer": layer.layer.name, "sparsity": float(1 - mask.mean())})


@dataclass(frozen=True)
class FineTune:
    """How a pruned model is fine-tuned: `train_subset` images of the training split, cosine rate."""
    train_subset: int = 20000
    epochs: int = 1
    batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 0

    def steps(self) -> int:
        return self.epochs * int(np.ceil(self.train_subset / self.batch_size))


def fine_tune(model, splits, plan: FineTune = FineTune(), progress: bool = True, trace_every: int = 5) -> dict:
    """Train a (possibly wrapped) model on the first `plan.train_subset` training images.

    Wrapped layers need tfmot's UpdatePruningStep callback, which advances their step counter;
    without it tfmot raises an error on the first batch.
    """
    trace = SparsityTrace(trace_every)
    callbacks = [sparsity_api.UpdatePruningStep(), trace]
    x, y = splits.x_train[:plan.train_subset], splits.y_train[:plan.train_subset]
    fit = models.train(model, x, y, epochs=plan.epochs, batch_size=plan.batch_size,
                       learning_rate=plan.learning_rate, seed=plan.seed, progress=progress,
                       callbacks=callbacks)
    return {"train_seconds": fit["train_seconds"], "trace": trace.rows,
            "history": fit["history"]}


def strip(model):
    """The plain Keras model inside the wrappers: same layers, masked weights, no mask variables."""
    return sparsity_api.strip_pruning(model)


def prune_and_fine_tune(name: str, baseline, schedules, splits, *, plan: FineTune = FineTune(),
                        layers=None, m_by_n=None, baseline_key: str = "", progress: bool = True):
    """Wrap, fine-tune and strip, cached under artifacts/pruning/ by every setting (notebook 02)."""
    if isinstance(schedules, dict):
        described = {k: (None if s is None else s.get_config()) for k, s in schedules.items()}
    else:
        described = schedules.get_config()
    settings = {"baseline": baseline_key, "schedules": described, "layers": layers,
                "m_by_n": m_by_n, "plan": asdict(plan)}

    def make():
        wrapped = wrap(baseline, schedules, layers=layers, m_by_n=m_by_n)
        record = fine_tune(wrapped, splits, plan, progress=progress)
        return strip(wrapped), record

    return cached(name, settings, make)


def layer_sparsity(model, layers=None) -> pd.DataFrame:
    """Zeros in each prunable kernel, and the total over them."""
    rows = []
    for name in prunable_layers(model) if layers is None else check_layers(model, layers):
        kernel = kernel_of(model, name)
        rows.append({"layer": name, "weights": kernel.size, "zeros": int(np.sum(kernel == 0))})
    table = pd.DataFrame(rows).set_index("layer")
    table.loc["all kernels"] = table.sum()
    table["sparsity"] = table["zeros"] / table["weights"]
    return table


# ----------------------------------------------------------------------------- 3. masks from scratch

def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """True for the weights kept: the round(n * (1 - sparsity)) largest magnitudes (at least one).

    The count is rounded in float32, half to even, as tfmot does, so the two agree exactly.
    """
    check_sparsity(sparsity)
    magnitudes = np.abs(weights)
    keep = max(int(np.round(np.float32(magnitudes.size) * (np.float32(1) - np.float32(sparsity)))), 1)
    threshold = np.partition(magnitudes.ravel(), magnitudes.size - keep)[magnitudes.size - keep]
    return magnitudes >= threshold


def layer_masks(model, sparsity) -> dict:
    """One threshold per layer: each layer loses the same fraction (a float) or its own (a dict)."""
    targets = sparsity if isinstance(sparsity, dict) else {n: sparsity for n in prunable_layers(model)}
    check_layers(model, targets)
    return {name: magnitude_mask(kernel_of(model, name), s) for name, s in targets.items()}


def global_masks(model, sparsity: float, layers=None) -> dict:
    """One threshold for all chosen layers together: small-magnitude layers lose more."""
    check_sparsity(sparsity)
    names = check_layers(model, prunable_layers(model) if layers is None else layers)
    kernels = {name: kernel_of(model, name) for name in names}
    everything = np.concatenate([np.abs(k).ravel() for k in kernels.values()])
    threshold = np.abs(everything[magnitude_mask(everything, sparsity)]).min()
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
    """The masks tfmot computes for `model`'s current weights, without any training step.

    Each layer is wrapped with ConstantSparsity(sparsity, begin_step=0), its step counter set
    to 0, and tfmot's own mask update run once.
    """
    targets = sparsity if isinstance(sparsity, dict) else {n: sparsity for n in prunable_layers(model)}
    schedules = {name: constant_schedule(s, frequency=1) for name, s in targets.items()}
    wrapped = wrap(model, schedules)
    wrapped(np.zeros((1, *model.input_shape[1:]), np.float32), training=False)  # build the masks
    masks = {}
    for layer in wrapped.layers:
        if isinstance(layer, PruneLowMagnitude):
            layer.pruning_step.assign(0)
            layer.pruning_obj.conditional_mask_update()
            masks[layer.layer.name] = layer.pruning_vars[0][1].numpy().astype(bool)
    return masks


def mask_sparsity(masks: dict) -> pd.Series:
    """Fraction of zeros per mask, and over all masks together."""
    out = {name: 1 - m.mean() for name, m in masks.items()}
    out["all kernels"] = 1 - sum(m.sum() for m in masks.values()) / sum(m.size for m in masks.values())
    return pd.Series(out, name="sparsity")


# ----------------------------------------------------------------------------- 4. sensitivity

def sensitivity_sweep(model, x_val, y_val, sparsities=(0.3, 0.5, 0.7, 0.8, 0.9, 0.95), layers=None,
                      progress: bool = True) -> pd.DataFrame:
    """Validation accuracy with one layer at a time magnitude-pruned (no fine-tuning), per sparsity.

    One working copy is reused: its kernel is overwritten and restored, so the traced graph is
    built once and each point costs one pass over the validation images.
    """
    sparsities = sorted({check_sparsity(s) for s in sparsities} | {0.0})
    names = check_layers(model, prunable_layers(model) if layers is None else layers)
    work = models.clone_with_weights(model)
    runner = measure.tf_function(work)
    base_accuracy = measure.accuracy(runner, x_val, y_val)
    rows = []
    with labkit.progress_bar(total=len(names) * (len(sparsities) - 1), desc="sensitivity", disable=not progress) as bar:
        for name in names:
            kernel = work.get_layer(name).kernel
            original = kernel.numpy()
            for s in sparsities:
                if s == 0.0:
                    rows.append({"layer": name, "sparsity": 0.0, "accuracy": base_accuracy})
                    continue
                kernel.assign(original * magnitude_mask(original, s))
                rows.append({"layer": name, "sparsity": s, "accuracy": measure.accuracy(runner, x_val, y_val)})
                bar.update(1)
            kernel.assign(original)
    return pd.DataFrame(rows)


def accuracy_drop_curve(sweep: pd.DataFrame, layer: str, step: float = 0.01) -> pd.Series:
    """One layer's accuracy drop (fraction) on a fine sparsity grid: interpolated between swept points
    and made non-decreasing, since pruning more can only be assumed to hurt more."""
    curve = sweep[sweep["layer"] == layer].sort_values("sparsity")
    grid = np.round(np.arange(0.0, curve["sparsity"].max() + 1e-9, step), 6)
    drop = curve["accuracy"].iloc[0] - np.interp(grid, curve["sparsity"], curve["accuracy"])
    return pd.Series(np.maximum.accumulate(np.maximum(drop, 0.0)), index=grid, name=layer)


def targets_from_sensitivity(sweep: pd.DataFrame, weights: dict, overall: float, step: float = 0.01) -> dict:
    """Per-layer sparsities that zero `overall` of all the weights for the least predicted accuracy loss.

    Greedy: start every layer at 0 and keep raising, by `step`, the layer whose next step costs the
    least validation accuracy per weight removed, until the weighted sparsity reaches `overall`.
    A small layer gives few zeros for its accuracy, so it stays dense unless its curve is flat.
    """
    check_sparsity(overall, "overall")
    missing = set(weights) - set(sweep["layer"])
    if missing:
        raise ValueError(f"no sensitivity curve for layers {sorted(missing)}; swept: {sorted(set(sweep['layer']))}")
    curves = {name: accuracy_drop_curve(sweep, name, step) for name in weights}
    total = sum(weights.values())
    if sum(weights[n] * curves[n].index[-1] for n in weights) / total < overall:
        raise ValueError(f"overall sparsity {overall} is beyond the swept range: sweep higher sparsities")
    position = {name: 0 for name in weights}
    zeros = 0.0
    while zeros / total < overall:
        def cost(name):
            curve, i = curves[name], position[name]
            if i + 1 >= len(curve):
                return np.inf
            return (curve.iloc[i + 1] - curve.iloc[i]) / (weights[name] * step)
        best = min(weights, key=lambda n: (cost(n), -weights[n]))
        position[best] += 1
        zeros += weights[best] * step
    # the last step may overshoot: take the excess back from the layer that moved last
    targets = {name: float(curves[name].index[position[name]]) for name in weights}
    excess = zeros - overall * total
    targets[best] = round(targets[best] - excess / weights[best], 6)
    return targets


# ----------------------------------------------------------------------------- 5. m:n sparsity

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
    groups = moved.reshape(-1, n)
    return int(np.sum((groups == 0).sum(axis=1) < m))


# ----------------------------------------------------------------------------- 6. structured pruning

def _conv_blocks(model) -> list[str]:
    """conv1, conv2, ...: the baseline's convolution blocks, each followed by bn<i>."""
    names = [layer.name for layer in model.layers]
    blocks = [n for n in names if n.startswith("conv") and n[4:].isdigit()]
    needed = [f"bn{n[4:]}" for n in blocks] + ["flatten", "dense1", "logits"]
    if not blocks or any(n not in names for n in needed):
        raise ValueError(f"structured pruning expects the baseline's layout (conv<i> + bn<i> blocks, flatten, "
                         f"dense1, logits); {model.name} has layers {names}")
    return blocks


def filter_l1(model) -> dict:
    """L1 norm of every output filter (conv) or unit (dense1): what each one puts into its layer."""
    blocks = _conv_blocks(model)
    norms = {name: np.abs(kernel_of(model, name)).sum(axis=(0, 1, 2)) for name in blocks}
    norms["dense1"] = np.abs(kernel_of(model, "dense1")).sum(axis=0)
    return norms


def strongest(model, keep: dict) -> dict:
    """For each layer in `keep` ({name: count}), the indices of its `count` largest-L1 filters, sorted."""
    norms = filter_l1(model)
    out = {}
    for name, count in keep.items():
        if name not in norms:
            raise ValueError(f"unknown layer {name!r}: filters can be removed from {sorted(norms)}")
        if not isinstance(count, (int, np.integer)) or not 1 <= count <= len(norms[name]):
            raise ValueError(f"{name} has {len(norms[name])} filters: keep between 1 and "
                             f"{len(norms[name])} of them (removing every filter cuts the network), got {count}")
        out[name] = np.sort(np.argsort(-norms[name], kind="stable")[:count])
    return out


def shrink(model, kept: dict):
    """A genuinely smaller model holding only the kept filters, with their trained weights.

    `kept` maps a layer (conv<i> or dense1) to the indices of the filters or units to keep; the
    others keep everything. Removing output filter j of conv<i> also removes channel j of bn<i>
    and input channel j of the next layer; after the last block, the flatten layer lays features
    out as (row, column, channel), so dense1 loses those rows for every pixel.
    """
    blocks = _conv_blocks(model)
    unknown = set(kept) - set(blocks) - {"dense1"}
    if unknown:
        raise ValueError(f"unknown layer(s) {sorted(unknown)}: filters can be removed from {blocks + ['dense1']}")
    full = {name: np.arange(len(norms)) for name, norms in filter_l1(model).items()}
    keep = {}
    for name, indices in full.items():
        chosen = np.asarray(kept.get(name, indices), dtype=int)
        if chosen.size == 0:
            raise ValueError(f"cannot remove every filter of {name}: keep at least one")
        if len(set(chosen.tolist())) != chosen.size or chosen.min() < 0 or chosen.max() >= indices.size:
            raise ValueError(f"{name}: kept indices must be distinct and in [0, {indices.size}), got {chosen}")
        keep[name] = np.sort(chosen)
    config = models.BaselineConfig(conv_filters=tuple(int(keep[n].size) for n in blocks),
                                   dense_units=int(keep["dense1"].size),
                                   dropout=float(model.get_layer("dropout").rate))
    small = models.build_baseline(config)
    previous = np.arange(model.input_shape[-1])  # input channels of conv1: the image's
    for name in blocks:
        out = keep[name]
        kernel = kernel_of(model, name)[:, :, previous, :][..., out]
        small.get_layer(name).set_weights([kernel])
        bn = "bn" + name[4:]
        small.get_layer(bn).set_weights([w[out] for w in model.get_layer(bn).get_weights()])
        previous = out
    height, width, channels = model.get_layer("flatten").input_shape[1:]
    kernel, bias = model.get_layer("dense1").get_weights()
    kernel = kernel.reshape(height, width, channels, -1)[:, :, previous, :].reshape(-1, kernel.shape[-1])
    units = keep["dense1"]
    small.get_layer("dense1").set_weights([kernel[:, units], bias[units]])
    kernel, bias = model.get_layer("logits").get_weights()
    small.get_layer("logits").set_weights([kernel[units], bias])
    return small


def zero_filters(model, kept: dict):
    """A same-size copy in which every filter or unit *not* in `kept` contributes exactly nothing.

    A convolution here has no bias, but its batch norm adds a shift, so a zero filter alone still
    feeds a constant channel forward: its batch-norm scale and shift are zeroed too. A dense1
    unit loses its kernel column and its bias.
    """
    blocks = _conv_blocks(model)
    copy = models.clone_with_weights(model)
    for name, indices in kept.items():
        if name not in blocks + ["dense1"]:
            raise ValueError(f"unknown layer {name!r}: filters can be removed from {blocks + ['dense1']}")
        drop = np.setdiff1d(np.arange(copy.get_layer(name).kernel.shape[-1]), indices)
        weights = copy.get_layer(name).get_weights()
        for w in weights:  # the kernel's last axis and the bias are both per output filter
            w[..., drop] = 0
        copy.get_layer(name).set_weights(weights)
        if name != "dense1":
            bn = copy.get_layer("bn" + name[4:])
            gamma, beta, mean, variance = bn.get_weights()
            gamma[drop], beta[drop] = 0, 0
            bn.set_weights([gamma, beta, mean, variance])
    return copy


def structured(name: str, baseline, keep: dict, splits, *, plan: FineTune = FineTune(),
               baseline_key: str = "", progress: bool = True):
    """Keep the largest-L1 filters, shrink, fine-tune; cached like prune_and_fine_tune (notebook 02)."""
    settings = {"baseline": baseline_key, "keep": keep, "plan": asdict(plan), "rank": "l1"}

    def make():
        small = shrink(baseline, strongest(baseline, keep))
        record = fine_tune(small, splits, plan, progress=progress)
        return small, record

    return cached(name, settings, make)


# ----------------------------------------------------------------------------- 7. LiteRT and XNNPACK

def export_tflite(model, path, sparse_encoding: bool = False) -> Path:
    """Float32 .tflite; with sparse_encoding the converter stores sparse weights compactly, unpacked at load
    by DENSIFY ops (tf.lite.Optimize.EXPERIMENTAL_SPARSITY)."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if sparse_encoding:
        converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    with labkit.quiet_stderr():
        return models.save_tflite(converter, path)


def sparse_ready_cnn(width: int = 16, seed: int = 0):
    """A small MobileNet-style CNN that tfmot's PruneForLatencyOnXNNPack policy accepts.

    XNNPACK's sparse path needs a 3x3 stride-2 convolution with 3 input channels and explicit
    1-pixel padding first, then depthwise 3x3 and 1x1 convolutions only, ending in a spatial mean.
    MNIST has one channel, so the image is repeated three times before the first convolution.
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
    for i, (channels, stride) in enumerate([(2 * width, 1), (4 * width, 2), (4 * width, 1)], start=1):
        if stride == 2:
            x = layers.ZeroPadding2D(1, name=f"dw{i}_pad")(x)
            x = layers.DepthwiseConv2D(3, strides=2, use_bias=False, name=f"dw{i}")(x)
        else:
            x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"dw{i}")(x)
        x = bn_relu(x, f"dw{i}")
        x = bn_relu(layers.Conv2D(channels, 1, use_bias=False, name=f"pw{i}")(x), f"pw{i}")
    x = layers.GlobalAveragePooling2D(keepdims=True, name="mean")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="sparse_ready_cnn")


def prune_for_xnnpack(model, sparsity: float, begin_step: int = 0, frequency: int = 10):
    """tfmot's XNNPACK policy: wrap only the 1x1 convolutions, after checking the whole graph fits
    XNNPACK's sparse path (a ValueError says which layer breaks it)."""
    return sparsity_api.prune_low_magnitude(
        models.clone_with_weights(model), pruning_schedule=constant_schedule(sparsity, begin_step, frequency),
        pruning_policy=sparsity_api.PruneForLatencyOnXNNPack())


def sparse_ready_models(splits, sparsity: float = 0.75, *, train_plan: FineTune = FineTune(20000, 2, 128, 1e-2),
                        prune_plan: FineTune = FineTune(20000, 1, 128, 1e-3), progress: bool = True):
    """The sparse-ready CNN trained from scratch, and a copy pruned with the XNNPACK policy (both cached)."""
    check_sparsity(sparsity)

    def train_dense():
        model = sparse_ready_cnn()
        return model, fine_tune(model, splits, train_plan, progress=progress)

    dense, dense_info = cached("sparse-ready-cnn", {"plan": asdict(train_plan)}, train_dense)

    def prune():
        wrapped = prune_for_xnnpack(dense, sparsity)
        record = fine_tune(wrapped, splits, prune_plan, progress=progress)
        return strip(wrapped), record

    pruned, pruned_info = cached("sparse-ready-cnn-pruned", {"dense": asdict(train_plan), "sparsity": sparsity,
                                                             "plan": asdict(prune_plan)}, prune)
    return dense, pruned


def cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def xnnpack_report(path) -> dict:
    """What the LiteRT interpreter itself says about a model under the XNNPACK delegate.

    XNNPACK considers its sparse path only when (1) the graph has the layout tfmot's
    PruneForLatencyOnXNNPack checks, (2) it takes DENSIFY ops (weights stored sparse) into its
    partition, and (3) the CPU is not an x86 with AVX: there XNNPACK keeps its dense kernels,
    because its sparse kernels target SSE only and dense AVX code is expected to be faster.
    """
    model = measure.LiteRTModel(path, num_threads=1, xnnpack=True)
    ops = model.interpreter._get_ops_details()
    delegates = [op for op in ops if op["op_name"] == "DELEGATE"]
    delegated_inputs = set(np.concatenate([op["inputs"] for op in delegates]).tolist()) if delegates else set()
    densify = [op for op in ops if op["op_name"] == "DENSIFY"]
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    has_avx = "avx" in cpu_flags()
    taken = bool(densify) and all(int(op["inputs"][0]) in delegated_inputs for op in densify)
    return {"model ops": len(ops) - len(delegates), "XNNPACK partitions": len(delegates),
            "DENSIFY ops": len(densify), "sparse weights handed to XNNPACK": taken,
            "x86 CPU with AVX": x86 and has_avx,
            "XNNPACK sparse kernels enabled on this CPU": not (x86 and has_avx)}


# ----------------------------------------------------------------------------- the benchmark

HEADLINE_SPARSITY = 0.8
SWEEP_SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
UNSTRUCTURED_PLAN = FineTune(train_subset=20000, epochs=1, learning_rate=5e-4)
STRUCTURED_KEEP = {"conv1": 16, "conv2": 32, "dense1": 64}
STRUCTURED_PLAN = FineTune(train_subset=27500, epochs=2, learning_rate=1e-3)


def polynomial_schedules(targets: dict, plan: FineTune) -> dict:
    """One PolynomialDecay per layer, reaching its target 60% of the way through the fine-tune."""
    end_step = int(0.6 * plan.steps())
    return {n: polynomial_schedule(s, end_step=end_step) if s > 0 else None for n, s in targets.items()}


def cached_sweep(baseline, splits, sparsities=SWEEP_SPARSITIES, baseline_key: str = "",
                 progress: bool = True) -> pd.DataFrame:
    """sensitivity_sweep on the validation split, saved as CSV under artifacts/pruning/."""
    key = models.settings_key({"baseline": baseline_key, "sparsities": list(sparsities)})
    path = PRUNING_DIR / f"sensitivity-{key}.csv"
    if path.is_file():
        return pd.read_csv(path)
    sweep = sensitivity_sweep(baseline, splits.x_val, splits.y_val, sparsities, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep.to_csv(path, index=False)
    return sweep


def headline_models(splits, baseline=None, progress: bool = True) -> dict:
    """The two models the targets are about, built (or loaded) with the same calls as notebook 02."""
    config = models.BaselineConfig()
    if baseline is None:
        baseline, _ = models.load_or_train_baseline(config, splits)
    sweep = cached_sweep(baseline, splits, baseline_key=config.key(), progress=progress)
    sizes = {name: kernel_of(baseline, name).size for name in prunable_layers(baseline)}
    targets = targets_from_sensitivity(sweep, sizes, HEADLINE_SPARSITY)
    unstructured, _ = prune_and_fine_tune("unstructured-80", baseline,
                                          polynomial_schedules(targets, UNSTRUCTURED_PLAN), splits,
                                          plan=UNSTRUCTURED_PLAN, baseline_key=config.key(), progress=progress)
    small, _ = structured("structured-l1", baseline, STRUCTURED_KEEP, splits, plan=STRUCTURED_PLAN,
                          baseline_key=config.key(), progress=progress)
    return {"baseline": baseline, "unstructured": unstructured, "structured": small, "targets": targets}


def target_checks(table: pd.DataFrame) -> pd.DataFrame:
    """The issue's targets from a table indexed baseline / unstructured / structured with columns
    accuracy, gzip_bytes, macs and latency_p50_us (all measured in one run)."""
    base, sparse, small = (table.loc[n] for n in ("baseline", "unstructured", "structured"))
    rows = [  # (target, measured, unit, at most or at least, goal)
        ("80% unstructured: test accuracy drop", 100 * (base["accuracy"] - sparse["accuracy"]), "points", "<=", 0.3),
        ("80% unstructured: gzipped .tflite smaller by", base["gzip_bytes"] / sparse["gzip_bytes"], "x", ">=", 3),
        ("structured: MACs cut by", base["macs"] / small["macs"], "x", ">=", 2),
        ("structured: test accuracy drop", 100 * (base["accuracy"] - small["accuracy"]), "points", "<=", 0.5),
        ("structured: LiteRT p50 speed-up", base["latency_p50_us"] / small["latency_p50_us"], "x", ">=", 1.5),
    ]
    out = pd.DataFrame(rows, columns=["target", "measured", "unit", "bound", "goal"])
    out["met"] = np.where(out["bound"] == "<=", out["measured"] <= out["goal"], out["measured"] >= out["goal"])
    return out.set_index("target")


def benchmark(repeats: int = 300, threads: int = 1) -> pd.DataFrame:
    """Print the targets measured in one run: test accuracy, gzip size, MACs, LiteRT p50 at batch 1."""
    from labkit.data import load_mnist
    splits = load_mnist()
    found = headline_models(splits, progress=False)
    paths = {"baseline": models.baseline_tflite(),
             "unstructured": export_tflite(found["unstructured"], PRUNING_DIR / "unstructured-80.tflite"),
             "structured": export_tflite(found["structured"], PRUNING_DIR / "structured-l1.tflite")}
    runners = [measure.litert(p, num_threads=threads, name=n) for n, p in paths.items()]
    latency = measure.measure_latency(runners, splits.x_test[:200], warmup=30, repeats=repeats)
    table = pd.DataFrame({
        "accuracy": [measure.accuracy(r, splits.x_test, splits.y_test) for r in runners],
        "gzip_bytes": [measure.gzip_bytes(p) for p in paths.values()],
        "macs": [measure.count_macs(found[n]) for n in paths],
        "latency_p50_us": [latency.p50(n) for n in paths],
        "latency_p95_us": [latency.p95(n) for n in paths]}, index=list(paths))
    checks = target_checks(table)
    print(f"machine: {measure.machine_string()}")
    print(f"LiteRT XNNPACK, {threads} thread(s), batch 1, {repeats} interleaved calls per model")
    with pd.option_context("display.width", 160):
        print(table.round(4).to_string())
        print(checks.round(3).to_string())
    return checks


if __name__ == "__main__":
    labkit.setup(seed=0)
    benchmark()
