"""LiteRT's own quantizer, ai-edge-quantizer, on a .tflite file, next to the converter of
`labkit/quantization.py`; the pipeline and the search call it.

`Rule` and `Recipe` (per-op, per-layer settings, checked against what the tool supports; the named
`RECIPES`); `quantize(path, recipe)`, cached by `models.cached`; the result read back through
`labkit.tflite` (`weight_table`, `check_against_quantizers`, `op_precisions`, `validation_report`);
`tolerant_recipe` (int4 where validation accuracy allows) and `smallest` (the smallest gzipped
file above a validation floor). `python -m labkit.targets.litert_quant` prints the figures.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import labkit  # sets the legacy-Keras switch before TensorFlow loads

labkit.import_tensorflow_quietly(start_runtime=False)   # ai-edge-quantizer imports TensorFlow
from ai_edge_quantizer import quantizer, recipe_manager  # noqa: E402
from ai_edge_quantizer.utils import validation_utils  # noqa: E402

from labkit import files, measure, models, quantization, quantizers, tflite  # noqa: E402
from labkit.data import load_mnist  # noqa: E402

LITERT_DIR = labkit.ARTIFACTS_DIR / "litert_quant"
MODES = ("weight-only", "dynamic", "static", "float")
GRANULARITIES = {"channel": "CHANNELWISE", "tensor": "TENSORWISE",
                 "block32": "BLOCKWISE_32", "block64": "BLOCKWISE_64",
                 "block128": "BLOCKWISE_128", "block256": "BLOCKWISE_256"}
BLOCKS = tuple(g for g in GRANULARITIES if g.startswith("block"))
# What ai-edge-quantizer 0.10.0 accepts (its default_policy.py): (mode, weight bits) ->
# granularities, and the ops each may touch. Anything else the tool skips without a word, so it
# is refused here.
SUPPORTED = {("weight-only", 8): ("channel", "tensor"), ("weight-only", 4): ("channel", "tensor"),
             ("dynamic", 8): ("channel", "tensor"), ("dynamic", 4): ("channel", "tensor") + BLOCKS,
             ("dynamic", 2): ("channel", "tensor") + BLOCKS,
             ("static", 8): ("channel", "tensor"), ("static", 4): ("channel", "tensor")}
LOW_BIT_OPS = ("FULLY_CONNECTED", "CONV_2D")      # int4 and int2 weights: these ops only
BLOCK_OPS = ("FULLY_CONNECTED",)                  # blockwise scales: fully connected only
ACTIVATION_BITS = (8, 16)                         # static recipes: int8 or int16 activations
CALIBRATION_IMAGES = 200
SENSITIVITY_IMAGES = 50    # images for the tool's per-tensor comparison


# ============================================================================ 1. recipes

@dataclass(frozen=True)
class Rule:
    """One line of a recipe: ops of type `op` ("*": all) whose layer name matches `layers` get
    `mode`."""
    layers: str = ".*"                 # a regex over the op's output tensor name, as the tool does
    op: str = "*"
    mode: str = "weight-only"
    bits: int = 8                      # weight bits (ignored for "float")
    granularity: str = "channel"
    activation_bits: int = 8           # static only

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        try:
            re.compile(self.layers)
        except re.error as error:
            raise ValueError(f"layers must be a regular expression, got {self.layers!r}: "
                             f"{error}") from None
        if self.mode == "float":
            return
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {tuple(GRANULARITIES)}, "
                             f"got {self.granularity!r}")
        allowed = SUPPORTED.get((self.mode, self.bits))
        if allowed is None:
            bits = sorted(b for m, b in SUPPORTED if m == self.mode)
            raise ValueError(f"ai-edge-quantizer has no {self.bits}-bit {self.mode} weights; "
                             f"{self.mode} supports {bits} bits")
        if self.granularity not in allowed:
            raise ValueError(f"{self.bits}-bit {self.mode} weights come {allowed}, not "
                             f"{self.granularity!r} (blockwise scales need the dynamic mode)")
        if self.mode == "static" and self.activation_bits not in ACTIVATION_BITS:
            raise ValueError(f"static activations are {ACTIVATION_BITS} bits, "
                             f"got {self.activation_bits}")
        narrow = BLOCK_OPS if self.granularity in BLOCKS else LOW_BIT_OPS if self.bits < 8 else None
        if narrow and self.op != "*" and self.op not in narrow:
            raise ValueError(f"{self.bits}-bit {self.granularity} weights apply to {narrow} only, "
                             f"not {self.op}")


@dataclass(frozen=True)
class Recipe:
    """Rules in order; for an op several rules match, the later one wins (the tool's own rule)."""
    name: str
    rules: tuple = field(default_factory=tuple)

    def __post_init__(self):
        if not self.rules or not all(isinstance(r, Rule) for r in self.rules):
            raise ValueError(f"recipe {self.name!r} needs at least one Rule")

    @property
    def needs_calibration(self) -> bool:
        return any(r.mode == "static" for r in self.rules)

    def settings(self) -> dict:
        return {"name": self.name, "rules": [asdict(r) for r in self.rules]}

    def for_tool(self) -> list:
        """The recipe in the tool's JSON form (a list of {regex, operation, algorithm_key,
        op_config})."""
        manager = recipe_manager.RecipeManager()
        for r in self.rules:
            granularity = GRANULARITIES.get(r.granularity)
            if r.mode == "float":
                manager.add_quantization_config(r.layers, r.op, None, "no_quantize")
            elif r.mode == "static":
                manager.add_static_config(r.layers, r.op, r.activation_bits, r.bits, granularity)
            else:
                add = (manager.add_weight_only_config if r.mode == "weight-only"
                       else manager.add_dynamic_config)
                add(regex=r.layers, operation_name=r.op, num_bits=r.bits, granularity=granularity)
        return manager.get_quantization_recipe()


def weight_only(bits: int, granularity: str = "channel", layers: str = ".*") -> Recipe:
    return Recipe(f"weight-int{bits}" + ("" if granularity == "channel" else f"-{granularity}"),
                  (Rule(layers, "*", "weight-only", bits, granularity),))


RECIPES = {
    "weight-int8": weight_only(8),
    "weight-int4": weight_only(4),
    "dynamic-int8": Recipe("dynamic-int8", (Rule(mode="dynamic", bits=8),)),
    "dynamic-int4": Recipe("dynamic-int4", (Rule(mode="dynamic", bits=4),)),
    "dynamic-int4-block32": Recipe("dynamic-int4-block32", (
        Rule(mode="dynamic", bits=8),   # the convs: blockwise scales are for fully connected only
        Rule("dense1", "FULLY_CONNECTED", mode="dynamic", bits=4, granularity="block32"))),
    "static-int8": Recipe("static-int8", (Rule(mode="static", bits=8, activation_bits=8),)),
    # per layer: the big dense layer in int4, the convs in int8, the small first conv left in float
    "mixed": Recipe("mixed", (Rule(mode="weight-only", bits=8),
                              Rule("dense1", "*", "weight-only", 4), Rule("conv1", "*", "float"))),
}


def _op_outputs(path, with_weights: bool = False) -> list:
    """(op, output tensor name) of every op: what a rule's op and regex are matched against;
    with_weights adds the shape of the op's weight operand (or None)."""
    stored = tflite.stored_tensors(path)
    rows = []
    for row in tflite.ops(path).itertuples():
        shape = stored.loc[row.inputs[1], "shape"] if row.op in tflite.WEIGHT_OPS else None
        name = stored.loc[row.outputs[0], "name"]
        rows.append((row.op, name) + ((shape,) if with_weights else ()))
    return rows


def check_recipe(recipe: Recipe, path) -> Recipe:
    """The recipe, if every rule names at least one op of the file and every block fits the
    weights it splits; a ValueError that says what the file holds otherwise."""
    found = _op_outputs(path, with_weights=True)
    for rule in recipe.rules:
        hits = [(op, name, shape) for op, name, shape in found
                if rule.op in ("*", op) and re.search(rule.layers, name)]
        if not hits:
            weights = sorted({f"{op}: {name}" for op, name, _ in found if op in tflite.WEIGHT_OPS})
            raise ValueError(f"recipe {recipe.name!r}: the rule for op {rule.op!r}, layers "
                             f"{rule.layers!r} names no op of {Path(path).name}. Its weight ops "
                             "are: " + "; ".join(weights))
        if rule.mode != "float" and rule.granularity in BLOCKS:
            block = int(rule.granularity.removeprefix("block"))
            bad = [f"{name} {shape}" for op, name, shape in hits
                   if op in BLOCK_OPS and shape[-1] % block]
            if bad:
                raise ValueError(f"recipe {recipe.name!r}: {block}-weight blocks must divide each "
                                 f"input dimension, and these weights do not: {'; '.join(bad)}. "
                                 "Narrow the rule's layers, or use a smaller block or channel-wise "
                                 "scales")
    return recipe


# ============================================================================ 2. quantizing a file

def _signature_input(path) -> str:
    signatures = tflite.interpreter(path).get_signature_list()
    return next(iter(signatures.values()))["inputs"][0]


def _samples(path, x: np.ndarray) -> dict:
    """Images as the tool wants them: {signature: [{input name: one image}, ...]}."""
    name, x = _signature_input(path), np.asarray(x, np.float32)
    return {"serving_default": [{name: x[i:i + 1]} for i in range(len(x))]}


def apply(path, recipe: Recipe, calibration: np.ndarray | None = None) -> bytes:
    """The quantized file's bytes (nothing written): check the file and recipe, calibrate if
    static, quantize."""
    path = tflite.check(path)
    check_recipe(recipe, path)
    if recipe.needs_calibration and calibration is None:
        raise ValueError(f"recipe {recipe.name!r} quantizes activations (static): pass "
                         "calibration images")
    what = f"ai-edge-quantizer on {path.name} with recipe {recipe.name!r}"
    with models.converter_messages(what), warnings.catch_warnings():
        # calibration's
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
        tool = quantizer.Quantizer(str(path), recipe.for_tool())
        ranges = (tool.calibrate(_samples(path, calibration), num_threads=1)
                  if recipe.needs_calibration else None)
        return bytes(tool.quantize(ranges, enable_progress_report=False).quantized_model)


def quantize(path, recipe: Recipe | str, calibration: np.ndarray | None = None, *,
             name: str | None = None, directory: Path = LITERT_DIR) -> Path:
    """The file quantized by `recipe` (a Recipe or a key of RECIPES), from the model cache or
    made now."""
    recipe = RECIPES[recipe] if isinstance(recipe, str) and recipe in RECIPES else recipe
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe must be a Recipe or one of {tuple(RECIPES)}, got {recipe!r}")
    path = tflite.check(path)
    if calibration is not None and recipe.needs_calibration:
        calibration = np.ascontiguousarray(calibration[:CALIBRATION_IMAGES], np.float32)
    else:
        calibration = None
    settings = {"recipe": recipe.settings(),
                "calibration": None if calibration is None else files.content_key(calibration)}
    out, _ = models.cached(name or f"{path.stem[:40]}-{recipe.name}", settings, [path],
                           lambda: (apply(path, recipe, calibration), {"recipe": recipe.name}),
                           directory, kind="tflite")
    return out


# ============================================================================ 3. reading it back

def weight_table(path) -> pd.DataFrame:
    """Per weight tensor of the file: stored type, shape, bytes, scales and the most codes in one
    channel or block.

    A weight that a DEQUANTIZE op widens is followed back to the tensor the file stores.
    """
    stored, table = tflite.stored_tensors(path), tflite.ops(path)
    widened = {row.outputs[0]: row.inputs[0] for row in table.itertuples()
               if row.op == "DEQUANTIZE"}
    rows = []
    for row in table[table["op"].isin(tflite.WEIGHT_OPS)].itertuples():
        index = widened.get(row.inputs[1], row.inputs[1])
        t = stored.loc[index]
        values = tflite.stored_values(path, index)
        block = t["block_size"]
        per = values.reshape(-1, block) if block else values.reshape(values.shape[0], -1)
        scales = (int(np.prod(stored.loc[t["scales_tensor"], "shape"])) if block
                  else len(t["scales"]))
        rows.append({"layer": tflite.layer_like(t["name"]) or t["name"], "op": row.op,
                     "type": t["type"], "shape": t["shape"], "weights": values.size,
                     "stored_bytes": t["stored_bytes"],
                     "bits_per_weight": 8 * t["stored_bytes"] / values.size, "scales": scales,
                     "block_size": block,
                     "max_codes_per_scale": max(len(np.unique(r)) for r in per),
                     "code_min": values.min(), "code_max": values.max(),
                     "zeros": float(np.mean(values == 0)),
                     "dequantized_at_run_time": row.inputs[1] in widened})
    return pd.DataFrame(rows).set_index("layer")


def check_against_quantizers(float_path, quant_path) -> pd.DataFrame:
    """The tool's int4 channel-wise scales and codes against
    `quantizers.symmetric_params(w, 4, axis=0)`.

    Per INT4 layer: the largest scale difference and the number of codes that differ. Both are
    0 when the tool uses the book's scheme: symmetric, zero point 0, codes -7..7, scale max|w|/7.
    """
    float_weights = tflite.weights(float_path)
    stored = tflite.stored_tensors(quant_path)
    rows = []
    for index, t in stored[(stored["type"] == "INT4") & (stored["block_size"] == 0)].iterrows():
        layer = tflite.layer_like(t["name"])
        w = float_weights[layer]["values"].astype(np.float32)
        params = quantizers.symmetric_params(w, 4, axis=0)
        codes = tflite.stored_values(quant_path, index)
        rows.append({"layer": layer, "channels": len(t["scales"]),
                     "max_scale_difference": float(np.max(np.abs(params.scale - t["scales"]))),
                     "codes_differing": int(np.sum(quantizers.quantize(w, params) != codes)),
                     "weights": int(w.size)})
    return pd.DataFrame(rows).set_index("layer")


def xnnpack_ops(path) -> set:
    """Positions (execution order) of the ops XNNPACK takes over. The interpreter lists every op
    of the file and then one DELEGATE op per partition: walk back from each partition's outputs to
    its inputs."""
    nodes = tflite.delegated_ops(path)
    original, taken = nodes[nodes["op"] != "DELEGATE"], set()
    producer = {t: i for i, outputs in zip(original.index, original["outputs"]) for t in outputs}
    for partition in nodes[nodes["op"] == "DELEGATE"].itertuples():
        waiting, inputs = list(partition.outputs), set(partition.inputs)
        while waiting:
            i = producer.get(t := waiting.pop())
            if t not in inputs and i is not None and i not in taken:
                taken.add(i)
                waiting.extend(original.loc[i, "inputs"])
    return taken


def op_precisions(path) -> pd.DataFrame:
    """What each op computes in (its input and weight types as stored) and what runs it (XNNPACK
    or not).

    "integer": integer activations and weights. "float, weights dequantized": a DEQUANTIZE op
    widens the weights to float32, once (XNNPACK takes int8 ones at load time; LiteRT 2.3's
    built-in kernel, which runs int4 ones, on the first invocation, then keeps the result).
    "hybrid": integer weights, float activations quantized on the fly inside the op. runs_on:
    "XNNPACK", or "built-in kernel" where XNNPACK left the op.
    """
    stored, table = tflite.stored_tensors(path), tflite.ops(path)
    made_by_dequantize = {o[0] for o in table.loc[table["op"] == "DEQUANTIZE", "outputs"]}
    delegated, rows = xnnpack_ops(path), []
    for row in table.itertuples():
        activation = stored.loc[row.inputs[0], "type"]
        weight = stored.loc[row.inputs[1], "type"] if row.op in tflite.WEIGHT_OPS else ""
        if row.op == "DEQUANTIZE":
            kind = "dequantize (weights to float32)"
        elif row.op in tflite.WEIGHT_OPS and row.inputs[1] in made_by_dequantize:
            kind = "float, weights dequantized"
        elif (row.op in tflite.WEIGHT_OPS and activation == "FLOAT32"
              and weight in ("INT8", "INT4", "INT2")):
            kind = "hybrid (activations quantized on the fly)"
        elif activation in ("INT8", "INT16") and row.op != "QUANTIZE":
            kind = "integer"
        else:
            kind = "float" if activation == "FLOAT32" else activation.lower()
        rows.append({"op": row.op, "input": activation, "weights": weight, "computes_in": kind,
                     "runs_on": "XNNPACK" if row.Index in delegated else "built-in kernel"})
    return pd.DataFrame(rows)


def validation_report(float_path, quant_path, x: np.ndarray) -> pd.DataFrame:
    """The tool's per-tensor comparison of the quantized model with the float one, on images `x`.

    One row per tensor: kind (input, output, constant, intermediate), layer, MSE and SNR in dB
    (the tool reports signal power over noise power; here 10 log10 of it); sorted by SNR, worst
    first. Constants compare the weights themselves, intermediates the activations.
    """
    tool = quantizer.Quantizer(str(tflite.check(float_path)),
                               previous_quantized_model=str(tflite.check(quant_path)))
    metric = validation_utils.ValidationErrorMetric
    with labkit.quiet_stderr(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
        result = tool.validate(_samples(float_path, x), error_metrics=[metric.MSE, metric.SNR],
                               num_threads=1).get_signature_comparison_result()
    rows = [{"tensor": name, "kind": kind, "layer": tflite.layer_like(name) or "",
             "mse": metrics["mse"], "snr_db": 10 * np.log10(max(metrics["snr"], 1e-12))}
            for kind in ("input", "output", "constant", "intermediate")
            for name, metrics in getattr(result, f"{kind}_tensors").items()]
    return pd.DataFrame(rows).sort_values("snr_db").reset_index(drop=True)


def worst_layer(report: pd.DataFrame) -> str:
    """The layer whose weights lose most (lowest SNR among the constant tensors of a validation
    report)."""
    weights = report[(report["kind"] == "constant") & (report["layer"] != "")
                     & np.isfinite(report["snr_db"])]
    return weights.sort_values("snr_db").iloc[0]["layer"]


# ==================================================================== 4. int4 where it is tolerated

def _named(layer: str) -> str:
    """A regex for tensor names with `layer` as one of their parts (conv1 in "cnn/conv1/Conv2D",
    not conv10)."""
    return rf"(^|[/;]){re.escape(layer)}([/;]|$)"


def tolerant_recipe(path, x_val, y_val, max_drop: float = 0.001, fallback_bits: int = 8,
                    directory: Path = LITERT_DIR) -> tuple[Recipe, pd.DataFrame]:
    """int4 weights for each layer whose validation accuracy drops at most `max_drop` alone in int4.

    Every weight layer is tried in int4 on its own (the rest stays float): its sensitivity is the
    validation accuracy lost and the model output's SNR (validation_report on SENSITIVITY_IMAGES).
    Those that tolerate it get int4, the rest `fallback_bits` (or float with fallback_bits=None),
    all weight-only. A layer is named by its op's output tensor, as the tool matches rules: the last
    layer's output is the graph's output, so it keeps the fallback.
    Returns (recipe, the per-layer table: layer, val_accuracy, drop, output_snr_db, int4).
    """
    base = measure.accuracy(measure.litert(path), x_val, y_val)
    layers = [layer for op, layer in ((op, tflite.layer_like(n)) for op, n in _op_outputs(path))
              if op in LOW_BIT_OPS and layer]
    rows = []
    for layer in dict.fromkeys(layers):
        trial = Recipe(f"int4-{layer}", (Rule(_named(layer), "*", "weight-only", 4),))
        out = quantize(path, trial, directory=directory)
        accuracy = measure.accuracy(measure.litert(out), x_val, y_val)
        report = validation_report(path, out, x_val[:SENSITIVITY_IMAGES])
        rows.append({"layer": layer, "val_accuracy": accuracy, "drop": base - accuracy,
                     "output_snr_db": float(report.loc[report["kind"] == "output", "snr_db"].min()),
                     "int4": base - accuracy <= max_drop})
    table = pd.DataFrame(rows).set_index("layer")
    keep = [layer for layer in table.index if table.loc[layer, "int4"]]
    rules = [Rule(mode="float") if fallback_bits is None
             else Rule(mode="weight-only", bits=fallback_bits)]
    rules += [Rule(_named(layer), "*", "weight-only", 4) for layer in keep]
    return Recipe("int4-" + ("-".join(keep) or "none"), tuple(rules)), table


# =============================================================== 5. the smallest file above a floor

def validation_floor(test_target: float) -> float:
    """The validation accuracy that stands for `test_target` on the test split: the target less
    the baseline's own test-minus-validation gap (the same model scores differently on the two
    splits)."""
    splits = load_mnist()
    runner = measure.litert(models.baseline_tflite())
    gap = (measure.accuracy(runner, splits.x_test, splits.y_test)
           - measure.accuracy(runner, splits.x_val, splits.y_val))
    return round(test_target - gap, 4)


SMALLEST_RECIPES = ("weight-int4", "dynamic-int4", "weight-int8")


def smallest(candidates: dict, splits, floors: dict, recipes=SMALLEST_RECIPES,
             directory: Path = LITERT_DIR, test_all: bool = False) -> tuple[pd.DataFrame, dict]:
    """Every candidate float .tflite ({name: path}) under every recipe: gzip bytes and validation
    accuracy.

    For each {label: validation floor} in `floors` the smallest gzipped file at or above the floor
    is chosen, and only then measured on the test split (test_all: every row is, for reference).
    Returns (table, {label: chosen row}).
    """
    rows = []
    for name, path in candidates.items():
        for recipe in recipes:
            out = quantize(path, recipe, directory=directory, name=f"{name}-{recipe}")
            accuracy = measure.accuracy(measure.litert(out), splits.x_val, splits.y_val)
            rows.append({"candidate": name, "recipe": recipe, "artifact": str(out),
                         "gzip_bytes": measure.gzip_bytes(out),
                         "size_bytes": measure.size_bytes(out), "val_accuracy": accuracy})
    table = pd.DataFrame(rows).sort_values("gzip_bytes").reset_index(drop=True)
    if test_all:   # for reference only: what a choice made on the test split would have been
        table["test_accuracy"] = [measure.accuracy(measure.litert(p), splits.x_test, splits.y_test)
                                  for p in table["artifact"]]
    chosen = {}
    for label, floor in floors.items():
        above = table[table["val_accuracy"] >= floor]
        if above.empty:
            continue
        row = above.iloc[0].to_dict()
        row["test_accuracy"] = measure.accuracy(measure.litert(row["artifact"]), splits.x_test,
                                                splits.y_test)
        row["val_floor"] = floor
        chosen[label] = row
    return table, chosen


# ===================================================================== 6. the variants side by side

def variants(splits, directory: Path = LITERT_DIR) -> dict:
    """{label: .tflite}: the baseline, the converter's dynamic and int8, and the tool's recipes on
    the baseline."""
    baseline_path = models.baseline_tflite()
    baseline, _ = models.load_or_train_baseline()
    paths = {"baseline-float32-tflite": baseline_path,
             "converter-dynamic": quantization.export(baseline, "dynamic", name="ptq-dynamic"),
             "converter-int8": quantization.export(baseline, "int8", splits.x_train,
                                                   name="ptq-int8")}
    for recipe in RECIPES:
        paths[f"aeq-{recipe}"] = quantize(baseline_path, recipe, splits.x_train,
                                          directory=directory, name=f"baseline-{recipe}")
    return paths
