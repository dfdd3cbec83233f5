"""Structured pruning: rank filters, keep the strongest, rebuild a genuinely smaller network.

Owns filter ranking (`filter_scores`, an "l1" or an "io" score), choosing the filters to keep
(`strongest`), the surgery that removes the others (`shrink`), its same-size check
(`zero_filters`) and the structured fine-tune (`thin`: rank, shrink, fine-tune, set by a
`ThinSettings`); the pipeline thins its folded model with it. Models are laid out as
`models.build_cnn` builds them (see `layout`). Single weights set to zero are labkit.pruning's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from labkit import ARTIFACTS_DIR, models

STRUCTURED_DIR = ARTIFACTS_DIR / "pruning"
SCORES = ("l1", "io")
# The book's structured model (and `python -m labkit.targets.pruning`'s): filters and units kept,
# and the fine-tune.
HEADLINE_KEEP = {"conv1": 16, "conv2": 32, "dense1": 64}
HEADLINE_PLAN = models.FineTune(train_subset=27500, epochs=2, learning_rate=1e-3)


def layout(model) -> tuple[list[str], bool]:
    """(the conv<i> block names in model order, whether the blocks have batch norm), checked.

    The layout is `models.build_cnn`'s: conv<i> blocks, each with its own batch norm bn<i>
    (`batchnorm=True`) or with a bias and a fused ReLU (`batchnorm=False`, which is also what
    `folding.fold_batchnorm` returns), then flatten, dense1, an optional dropout and logits.
    Filters can be removed from every conv<i> and units from dense1; logits keeps its 10 classes.
    """
    names = [layer.name for layer in model.layers]
    blocks = [n for n in names if n.startswith("conv") and n[4:].isdigit()]
    with_bn = [f"bn{n[4:]}" in names for n in blocks]
    missing = any(n not in names for n in ("flatten", "dense1", "logits"))
    if not blocks or missing or len(set(with_bn)) > 1:
        raise ValueError(f"structured pruning expects models.build_cnn's layout (conv<i> blocks, "
                         f"all with or all without bn<i>, then flatten, dense1, logits); "
                         f"{model.name} has {names}")
    batchnorm = with_bn[0]
    if not batchnorm and not all(model.get_layer(n).use_bias for n in blocks):
        raise ValueError("a conv block without batch norm needs a bias "
                         "(as build_cnn(batchnorm=False) builds it)")
    return blocks, batchnorm


def _removable(model) -> list[str]:
    return layout(model)[0] + ["dense1"]


def _features(model, kernel: np.ndarray) -> np.ndarray:
    """dense1's kernel as (row, column, channel, unit): flatten lays the last conv block out
    that way."""
    height, width, channels = model.get_layer("flatten").input_shape[1:]
    return kernel.reshape(height, width, channels, -1)


def _reads(model, layer: str) -> np.ndarray:
    """For each output filter of conv `layer`, the weights of the next layer that read its channel
    (channels first, flattened)."""
    blocks = layout(model)[0]
    position = blocks.index(layer)
    if position + 1 < len(blocks):
        following = models.kernel(model, blocks[position + 1])        # (h, w, in, out)
        return np.moveaxis(following, 2, 0).reshape(following.shape[2], -1)
    following = _features(model, models.kernel(model, "dense1"))      # (h, w, channel, unit)
    return np.moveaxis(following, 2, 0).reshape(following.shape[2], -1)


def filter_scores(model, layer: str, score: str = "l1", inputs=None) -> np.ndarray:
    """One number per output filter of conv<i> (or unit of dense1): how much it matters.

    "l1": the L1 norm of the filter's own weights (Li et al., 2017).
    "io": what flows in times what flows out: for a filter, the L1 norm of its kernel times the
    L2 norm of the next layer's weights that read its channel; for a dense1 unit, the L2 norm of
    its incoming weights times the L2 norm of its outgoing (logits) weights. A filter with large
    weights that the next layer ignores is as useless as one the next layer needs but that never
    fires. `inputs` (the kept filters of the layer before) restricts what flows in to them.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if layer not in _removable(model):
        raise ValueError(f"unknown layer {layer!r}: filters can be removed from "
                         f"{_removable(model)}")
    kernel = models.kernel(model, layer)
    if inputs is not None:
        inputs = np.asarray(inputs, dtype=int)
        if layer == "dense1":
            kernel = _features(model, kernel)[:, :, inputs, :].reshape(-1, kernel.shape[-1])
        else:
            kernel = kernel[:, :, inputs, :]
    incoming = kernel.reshape(-1, kernel.shape[-1])
    if score == "l1":
        return np.abs(incoming).sum(axis=0)
    if layer == "dense1":
        outgoing = models.kernel(model, "logits")
        return np.linalg.norm(incoming, axis=0) * np.linalg.norm(outgoing, axis=1)
    return np.abs(incoming).sum(axis=0) * np.linalg.norm(_reads(model, layer), axis=1)


def strongest(model, keep: dict, score: str = "l1") -> dict:
    """For each layer in `keep` ({name: count}), the indices of its `count` best-scored filters,
    sorted.

    Layers are ranked in model order; with "io", a layer's inflow counts only the filters the
    layer before keeps (so dense1's units are ranked on the conv channels that remain).
    """
    removable = _removable(model)
    unknown = set(keep) - set(removable)
    if unknown:
        raise ValueError(f"unknown layer(s) {sorted(unknown)}: filters can be removed from "
                         f"{removable}")
    out, previous = {}, None
    for name in removable:
        if name not in keep:
            previous = None
            continue
        scores = filter_scores(model, name, score, inputs=previous if score == "io" else None)
        count = keep[name]
        whole = not isinstance(count, bool) and isinstance(count, (int, np.integer))
        if not whole or not 1 <= count <= len(scores):
            raise ValueError(f"{name} has {len(scores)} filters: keep between 1 and {len(scores)} "
                             f"of them (removing every filter cuts the network), got {count!r}")
        out[name] = previous = np.sort(np.argsort(-scores, kind="stable")[:count])
    return out


def _checked(model, kept: dict) -> dict:
    """Every removable layer's kept indices (all of them where `kept` says nothing), checked."""
    removable = _removable(model)
    unknown = set(kept) - set(removable)
    if unknown:
        raise ValueError(f"unknown layer(s) {sorted(unknown)}: filters can be removed from "
                         f"{removable}")
    out = {}
    for name in removable:
        n = models.kernel(model, name).shape[-1]
        chosen = np.asarray(kept.get(name, np.arange(n)), dtype=int)
        if chosen.size == 0:
            raise ValueError(f"cannot remove every filter of {name}: keep at least one")
        if len(set(chosen.tolist())) != chosen.size or chosen.min() < 0 or chosen.max() >= n:
            raise ValueError(f"{name}: kept indices must be distinct and in [0, {n}), "
                             f"got {chosen}")
        out[name] = np.sort(chosen)
    return out


def shrink(model, kept: dict):
    """A genuinely smaller model holding only the kept filters, with their trained weights.

    `kept` maps conv<i> or dense1 to the indices of the filters or units to keep; the others keep
    everything. Removing output filter j of conv<i> also removes channel j of bn<i> (or entry j of
    the conv's bias) and input channel j of the next layer; after the last block, flatten lays
    features out as (row, column, channel), so dense1 loses those rows for every pixel.
    """
    blocks, batchnorm = layout(model)
    keep = _checked(model, kept)
    names = [layer.name for layer in model.layers]
    dropout = float(model.get_layer("dropout").rate) if "dropout" in names else 0.0
    small = models.build_cnn(tuple(int(keep[n].size) for n in blocks), int(keep["dense1"].size),
                             batchnorm=batchnorm, dropout=dropout, name=model.name)
    previous = np.arange(model.input_shape[-1])   # input channels of conv1: the image's
    for name in blocks:
        out = keep[name]
        kernel, *bias = model.get_layer(name).get_weights()
        small.get_layer(name).set_weights([kernel[:, :, previous, :][..., out],
                                           *(b[out] for b in bias)])
        if batchnorm:
            bn = "bn" + name[4:]
            bn_weights = model.get_layer(bn).get_weights()
            small.get_layer(bn).set_weights([w[out] for w in bn_weights])
        previous = out
    kernel, bias = model.get_layer("dense1").get_weights()
    kernel = _features(model, kernel)[:, :, previous, :].reshape(-1, kernel.shape[-1])
    units = keep["dense1"]
    small.get_layer("dense1").set_weights([kernel[:, units], bias[units]])
    kernel, bias = model.get_layer("logits").get_weights()
    small.get_layer("logits").set_weights([kernel[units], bias])
    return small


def zero_filters(model, kept: dict):
    """A same-size copy in which every filter or unit *not* in `kept` contributes exactly nothing.

    Its kernel slice and bias are zeroed. With batch norm a zero filter alone still feeds a
    constant channel forward (the norm adds its shift), so its batch-norm scale and shift are
    zeroed too. Removing these filters with `shrink` must then leave the outputs unchanged.
    """
    blocks, batchnorm = layout(model)
    _checked(model, kept)
    copy = models.clone_with_weights(model)
    for name, indices in kept.items():
        layer = copy.get_layer(name)
        weights = layer.get_weights()
        drop = np.setdiff1d(np.arange(weights[0].shape[-1]), indices)
        for w in weights:   # the kernel's last axis and the bias are both per output filter
            w[..., drop] = 0
        layer.set_weights(weights)
        if batchnorm and name != "dense1":
            bn = copy.get_layer("bn" + name[4:])
            gamma, beta, mean, variance = bn.get_weights()
            gamma[drop], beta[drop] = 0, 0
            bn.set_weights([gamma, beta, mean, variance])
    return copy


@dataclass(frozen=True)
class ThinSettings:
    """What `thin` does; `cached_thin` keys its entry by these and the input model's weights.

    `keep`: {layer: count} of filters (units) kept, the best by `score` ("l1" or "io"); `plan`:
    the fine-tune after the surgery (None: none).
    """
    keep: dict
    plan: models.FineTune | None = None
    score: str = "l1"

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")


def thin(model, settings: ThinSettings, splits=None, *, progress: bool = True, callbacks=()):
    """Keep the best-scored filters, shrink, and fine-tune when settings.plan is given.

    Returns (smaller model, record): the kept indices, the score and, after a fine-tune,
    models.fine_tune's record.
    """
    kept = strongest(model, settings.keep, settings.score)
    small = shrink(model, kept)
    record = {"keep": {n: int(c) for n, c in settings.keep.items()}, "score": settings.score,
              "kept": {n: i.tolist() for n, i in kept.items()}}
    if settings.plan is not None:
        if splits is None:
            raise ValueError("a fine-tune needs the data splits: pass splits with plan")
        record.update(models.fine_tune(small, splits, settings.plan, callbacks=callbacks,
                                       progress=progress, description="thin"))
    return small, record


def cached_thin(name: str, model, settings: ThinSettings, splits, *, directory=STRUCTURED_DIR,
                progress: bool = True):
    """`thin` through models.cached: the entry's key covers the settings and `model`'s weights."""
    return models.cached(name, asdict(settings), [model],
                         lambda: thin(model, settings, splits, progress=progress), directory)
