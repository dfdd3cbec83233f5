"""Model and hybrid parallelism with DTensor on logical CPU devices.

A mesh names axes over devices ("batch", "model"); a layout says which mesh axis each dimension
of a tensor is split along; a tf_keras LayoutMap gives each weight a layout by name, and DTensor
rewrites every op to run on the shards. Logical devices must be declared before TensorFlow
starts its runtime, so the checks run in a fresh process (`python -m labkit.distributed.dtensor`,
or `run()`, which returns its report), and TensorFlow is imported only inside functions here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import labkit
from labkit import ARTIFACTS_DIR, ROOT, files
from labkit.data import load_mnist

OUT_DIR = ARTIFACTS_DIR / "distributed" / "dtensor"
NUM_DEVICES = 4
MESHES = {  # name -> [(axis, size), ...]; the sizes multiply to NUM_DEVICES
    "model-parallel": [("model", 4)],
    "hybrid": [("batch", 2), ("model", 2)],
}


def split_cpu(num_devices: int = NUM_DEVICES) -> list:
    """Split the physical CPU into `num_devices` logical devices, before TensorFlow starts."""
    import tensorflow as tf  # not at the top: see the module docstring
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
    except RuntimeError as error:
        raise RuntimeError(f"TensorFlow has already started in this process ({error}). "
                           "Logical devices must be "
                           "declared first: run the DTensor part in a fresh process "
                           "(labkit.distributed.dtensor.run()).") from None
    return tf.config.list_logical_devices("CPU")


def make_mesh(axes):
    """A DTensor mesh over the logical CPUs, e.g. [("batch", 2), ("model", 2)]."""
    from tensorflow.experimental import dtensor  # not at the top: see the module docstring
    return dtensor.create_mesh(list(axes), device_type="CPU")


def layout_map(mesh):
    """Which weights are split and how: the dense head is sharded along the mesh's 'model' axis.

    dense1's kernel (3136 x 128) is split by columns, so each device owns some hidden units and
    their biases; the logits kernel (128 x 10) is split by rows, so each device multiplies its
    own hidden units and DTensor adds the partial sums (an all-reduce). Everything not named
    here, the conv kernels and batch norms included, is replicated: DTensor's Conv2D needs its
    filter whole on every device (`trap_conv_sharding` shows the error).
    """
    import tf_keras as keras  # not at the top: see the module docstring
    from tensorflow.experimental import dtensor
    whole = dtensor.UNSHARDED
    layouts = keras.dtensor.experimental.LayoutMap(mesh=mesh)
    layouts["dense1.kernel"] = dtensor.Layout([whole, "model"], mesh)
    layouts["dense1.bias"] = dtensor.Layout(["model"], mesh)
    layouts["logits.kernel"] = dtensor.Layout(["model", whole], mesh)
    return layouts


def _unfused(layer):
    """A copy of `layer`; batch norms use the plain (unfused) kernels, which DTensor can split."""
    import tf_keras as keras  # not at the top: see the module docstring
    config = layer.get_config()
    if isinstance(layer, keras.layers.BatchNormalization):
        config["fused"] = False
    return layer.__class__.from_config(config)


def sharded_copy(model, layouts, fused_batchnorm: bool = False):
    """The model rebuilt under a LayoutMap (its weights become DVariables) with the same weights."""
    import tf_keras as keras  # not at the top: see the module docstring
    with layouts.scope():
        copy = keras.models.clone_model(model, clone_function=None if fused_batchnorm else _unfused)
    copy.set_weights(model.get_weights())
    return copy


def input_layout(mesh, rank: int):
    """Images split along the 'batch' axis if the mesh has one, else whole on every device."""
    from tensorflow.experimental import dtensor  # not at the top: see the module docstring
    first = "batch" if "batch" in mesh.dim_names else dtensor.UNSHARDED
    return dtensor.Layout([first] + [dtensor.UNSHARDED] * (rank - 1), mesh)


def on_mesh(x: np.ndarray, mesh):
    """A batch of images as a DTensor on `mesh`, laid out by `input_layout`."""
    import tensorflow as tf  # not at the top: see the module docstring
    from tensorflow.experimental import dtensor
    batch = dtensor.copy_to_mesh(tf.constant(x), dtensor.Layout.replicated(mesh, 4))
    return dtensor.relayout(batch, input_layout(mesh, 4))


def predict(model, mesh, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Logits of `model` (sharded) as one NumPy array, batch by batch."""
    from tensorflow.experimental import dtensor  # not at the top: see the module docstring
    out = []
    for start in range(0, len(x), batch_size):
        logits = model(on_mesh(x[start:start + batch_size], mesh), training=False)
        whole = dtensor.relayout(logits, dtensor.Layout.replicated(mesh, 2))
        out.append(dtensor.unpack(whole)[0].numpy())  # every device holds all of it: the first
    return np.concatenate(out)


def shard_table(model, mesh) -> tuple[list[dict], list[str]]:
    """Where the pieces of each sharded weight live, and the names of the replicated weights.

    One row per (weight, device), with the device's place on the mesh and the slice it holds.
    """
    import tensorflow as tf  # not at the top: see the module docstring
    from tensorflow.experimental import dtensor
    places = mesh.local_device_locations()  # [{'batch': 0, 'model': 1}, ...] in device order
    rows, replicated = [], []
    for weight in model.weights:
        layout = dtensor.fetch_layout(weight)
        name = weight.name.split(":")[0]
        if layout.is_fully_replicated():
            replicated.append(name)
            continue
        pieces = dtensor.unpack(tf.convert_to_tensor(weight))
        for place, piece in zip(places, pieces):
            held = []
            for dim, axis in enumerate(layout.sharding_specs):
                if axis == dtensor.UNSHARDED:
                    held.append(":")
                else:
                    size = piece.shape[dim]
                    held.append(f"{place[axis] * size}:{(place[axis] + 1) * size}")
            rows.append({"weight": name, "layout": list(layout.sharding_specs),
                         "global_shape": list(weight.shape),
                         "device": piece.device.split("/")[-1].replace("device:", ""),
                         "mesh_place": ", ".join(f"{k}={v}" for k, v in place.items()),
                         "holds": f"[{', '.join(held)}]", "shard_shape": list(piece.shape)})
    return rows, replicated


def activation_layout(model, mesh, x: np.ndarray, layer: str = "dense1") -> dict:
    """The layout of one layer's output: where the activations live between layers."""
    import tf_keras as keras  # not at the top: see the module docstring
    from tensorflow.experimental import dtensor
    probe = keras.Model(model.input, model.get_layer(layer).output)
    h = probe(on_mesh(x, mesh), training=False)
    pieces = dtensor.unpack(h)
    return {"layer": layer, "layout": list(dtensor.fetch_layout(h).sharding_specs),
            "global_shape": list(h.shape), "shard_shapes": [list(p.shape) for p in pieces],
            "devices": [p.device.split("/")[-1] for p in pieces]}


def _first_line(error: Exception) -> str:
    """The sentence of a DTensor error that says what went wrong (its messages run to pages)."""
    text = str(error)
    for marker in ("Filter for convolution", "was expecting a DTensor"):
        if marker in text:
            line = next(l for l in text.splitlines() if marker in l).strip()
            end = line.index(marker) + len(marker)
            return line[:end] + line[end:].split(". ")[0]
    return text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__


def trap_fused_batchnorm(model, mesh, x: np.ndarray) -> str:
    """The error when the model keeps Keras's fused batch norm (DTensor has no FusedBatchNormV3)."""
    try:
        fused = sharded_copy(model, layout_map(mesh), fused_batchnorm=True)
        predict(fused, mesh, x[:8], batch_size=8)
    except Exception as error:  # noqa: BLE001 -- we report whatever DTensor says
        return f"{type(error).__name__}: {_first_line(error)}"
    return ""


def trap_conv_sharding(model, mesh, x: np.ndarray) -> str:
    """The error when a conv kernel is split along its output channels."""
    from tensorflow.experimental import dtensor  # not at the top: see the module docstring
    layouts = layout_map(mesh)
    layouts["conv1.kernel"] = dtensor.Layout([dtensor.UNSHARDED] * 3 + ["model"], mesh)
    try:
        predict(sharded_copy(model, layouts), mesh, x[:8], batch_size=8)
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {_first_line(error)}"
    return ""


def check_all(limit: int = 2000, throughput_images: int = 10000, num_devices: int = NUM_DEVICES,
              model_path=None, out=OUT_DIR) -> dict:
    """Run every mesh against the unsharded model; call only in a fresh process (see `main`).

    The model is the cached baseline unless `model_path` names another .keras file with the
    same layer names (tests use a small one). Each mesh's logits go to <out>/logits-<mesh>.npy.
    """
    with labkit.quiet_stderr():
        import tensorflow as tf  # not at the top: see the module docstring
    devices = split_cpu(num_devices)
    labkit.setup(seed=0)  # after the logical devices: setup starts TensorFlow's runtime
    baseline = _load(model_path)
    splits = load_mnist()
    x, y = np.asarray(splits.x_test), np.asarray(splits.y_test)
    plain = tf.function(lambda batch: baseline(batch, training=False))
    reference = np.concatenate([plain(x[i:i + 500]).numpy() for i in range(0, len(x), 500)])
    report = {"devices": [d.name for d in devices], "limit": limit, "meshes": {},
              "tensorflow": tf.__version__}
    start = time.perf_counter()
    np.concatenate([plain(x[i:i + 500]).numpy() for i in range(0, throughput_images, 500)])
    report["unsharded_throughput_ips"] = throughput_images / (time.perf_counter() - start)
    for name, axes in MESHES.items():
        report["meshes"][name], logits = check_mesh(baseline, axes, x, y, reference[:limit],
                                                    throughput_images)
        files.write_atomic(Path(out) / f"logits-{name}.npy", lambda tmp: np.save(tmp, logits))
    mesh = make_mesh(MESHES["model-parallel"])
    report["trap_fused_batchnorm"] = trap_fused_batchnorm(baseline, mesh, x)
    report["trap_conv_sharding"] = trap_conv_sharding(baseline, mesh, x)
    return report


def _load(model_path):
    """The model to shard: a .keras file, or the cached baseline."""
    import tf_keras as keras  # not at the top: see the module docstring
    keras.backend.experimental.enable_tf_random_generator()  # the LayoutMap needs it (dropout)
    if model_path:
        return keras.models.load_model(model_path, compile=False)
    from labkit import models  # not at the top: it loads TensorFlow
    return models.load_or_train_baseline()[0]


def check_mesh(baseline, axes, x, y, reference, throughput_images: int) -> tuple[dict, np.ndarray]:
    """One mesh's figures, against the unsharded `reference` logits of x[:len(reference)].

    Returns (the report's row for the mesh, its logits of those images).
    """
    limit = len(reference)
    mesh = make_mesh(axes)
    model = sharded_copy(baseline, layout_map(mesh))
    shards, replicated = shard_table(model, mesh)
    logits = predict(model, mesh, x[:limit])
    start = time.perf_counter()
    test_logits = predict(model, mesh, x[:throughput_images])
    seconds = time.perf_counter() - start
    return {
        "axes": axes, "mesh": str(mesh.dim_names),
        "max_abs_diff": float(np.max(np.abs(logits - reference))),
        "argmax_agree": float(np.mean(np.argmax(logits, 1) == np.argmax(reference, 1))),
        "accuracy": float(np.mean(np.argmax(test_logits, 1) == y[:throughput_images])),
        "throughput_ips": throughput_images / seconds, "images": throughput_images,
        "shards": shards, "replicated": replicated,
        "dense1_output": activation_layout(model, mesh, x[:8]),
        "output_layout": list(_output_layout(model, mesh, x[:8])),
    }, logits


def _output_layout(model, mesh, x):
    from tensorflow.experimental import dtensor  # not at the top: see the module docstring
    return dtensor.fetch_layout(model(on_mesh(x, mesh), training=False)).sharding_specs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="DTensor model and hybrid parallelism checks (fresh process).")
    parser.add_argument("--limit", type=int, default=2000,
                        help="test images compared with the unsharded model")
    parser.add_argument("--throughput-images", type=int, default=10000,
                        help="test images timed per mesh")
    parser.add_argument("--model", default=None,
                        help="a .keras file (default: the cached baseline)")
    parser.add_argument("--out", default=str(OUT_DIR), help="where report.json and the logits go")
    args = parser.parse_args(argv)
    if not 0 < args.limit <= 10000 or not 0 < args.throughput_images <= 10000:
        parser.error("--limit and --throughput-images must be in [1, 10000]")
    if args.limit % 2 or args.throughput_images % 2:
        parser.error("--limit and --throughput-images must be even "
                     "(the hybrid mesh splits each batch in 2)")
    out = Path(args.out)
    report = check_all(args.limit, args.throughput_images, model_path=args.model, out=out)
    files.write_json(out / "report.json", report)
    print(json.dumps({"event": "done", "report": str(out / "report.json")}), flush=True)
    return 0


def run(limit: int = 2000, throughput_images: int = 10000, *, model_path=None, out=OUT_DIR,
        timeout_s: float = 300.0) -> dict:
    """Run the DTensor checks in a fresh Python process and return their report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "labkit.distributed.dtensor", "--limit", str(limit),
           "--throughput-images", str(throughput_images), "--out", str(out)]
    if model_path:
        cmd += ["--model", str(model_path)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=str(ROOT),
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the DTensor checks did not finish within {timeout_s:.0f} s") from None
    if done.returncode != 0:
        noise = ("I0000", "W0000", "WARNING: All")
        tail = "\n".join(line for line in done.stderr.splitlines() if not line.startswith(noise))
        raise RuntimeError(f"the DTensor checks failed (exit code {done.returncode}):\n"
                           f"{tail[-2000:]}")
    return json.loads((out / "report.json").read_text())


if __name__ == "__main__":
    sys.exit(main())
