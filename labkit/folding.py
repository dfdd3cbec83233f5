"""Batch-norm folding: each Conv2D -> BatchNormalization pair becomes one Conv2D with a bias.

`fold_conv_bn` is the math on one pair; `fold_batchnorm` rewrites a whole chain model. Every
technique that needs a folded model (clustering's codebooks, the int8 check, the pipeline, the
graph chapter) takes it from here.
"""
from __future__ import annotations

import numpy as np

import labkit  # sets the legacy-Keras switch before TensorFlow loads

labkit.import_tensorflow_quietly(start_runtime=False)  # its C++ start-up lines, kept quiet
import tf_keras as keras  # noqa: E402


def fold_conv_bn(kernel, bias, gamma, beta, mean, variance, epsilon):
    """One convolution that computes batchnorm(conv(x)) in inference mode: (kernel, bias).

    bn(z) = gamma * (z - mean) / sqrt(variance + epsilon) + beta is affine per output channel and
    z = conv(x, kernel) + bias is linear in the kernel, so with
    s = gamma / sqrt(variance + epsilon): bn(conv(x)) = conv(x, kernel * s) + (bias - mean) * s
    + beta. The kernel's last axis is the output channel (Keras HWIO layout), so `* s` scales each
    output channel's filter.
    """
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(variance, np.float64) + epsilon)
    new_kernel = np.asarray(kernel, np.float64) * scale
    new_bias = (np.asarray(bias, np.float64) - mean) * scale + beta
    return new_kernel.astype(np.float32), new_bias.astype(np.float32)


def _bn_parameters(bn) -> tuple:
    """gamma, beta, moving mean, moving variance of a BatchNormalization layer (ones/zeros if
    absent)."""
    channels = bn.moving_mean.shape[0]
    gamma = bn.gamma.numpy() if bn.scale else np.ones(channels, np.float32)
    beta = bn.beta.numpy() if bn.center else np.zeros(channels, np.float32)
    return gamma, beta, bn.moving_mean.numpy(), bn.moving_variance.numpy()


def _check_chain(model: keras.Model) -> list:
    """The model's layers, provided each takes the previous one's single output (no branches)."""
    if isinstance(model, keras.Sequential):
        return list(model.layers)
    layers = model.get_config()["layers"]
    for previous, layer in zip(layers, layers[1:]):
        inbound = layer["inbound_nodes"]
        sources = [t[0] for node in inbound for t in node]
        if sources != [previous["name"]]:
            raise ValueError(f"fold_batchnorm handles a plain chain of layers; layer "
                             f"{layer['name']!r} takes {sources or 'nothing'}, not just "
                             f"{previous['name']!r}")
    return [model.get_layer(layer["name"]) for layer in layers[1:]]


def foldable(layer, following) -> bool:
    """True for a Conv2D without activation followed by a BatchNormalization over its channel
    axis."""
    return (type(layer) is keras.layers.Conv2D
            and isinstance(following, keras.layers.BatchNormalization)
            and layer.activation is keras.activations.linear
            and layer.data_format == "channels_last" and list(following.axis) in ([3], [-1]))


def plain_relu(layer) -> bool:
    """True for a ReLU layer (or Activation("relu")) that a conv can take over as its own
    activation."""
    if isinstance(layer, keras.layers.ReLU):
        return (layer.max_value is None and float(layer.negative_slope) == 0
                and float(layer.threshold) == 0)
    return isinstance(layer, keras.layers.Activation) and layer.activation is keras.activations.relu


def fold_batchnorm(model: keras.Model, name: str | None = None) -> keras.Model:
    """A copy of a chain model with each Conv2D -> BatchNormalization pair merged into one Conv2D
    with a bias.

    A ReLU right after the pair becomes the conv's own activation, so a build_cnn(batchnorm=True)
    model comes out laid out as build_cnn(batchnorm=False): conv{i} (bias, ReLU) -> pool{i} ... with
    every other layer's name and weights kept. Raises ValueError for a model with branches.
    """
    layers = _check_chain(model)
    inputs = keras.Input(shape=model.input_shape[1:], name=model.input_names[0])
    x, i, pending = inputs, 0, []
    while i < len(layers):
        layer = layers[i]
        following = layers[i + 1] if i + 1 < len(layers) else None
        if foldable(layer, following):
            kernel = layer.kernel.numpy()
            bias = layer.bias.numpy() if layer.use_bias else np.zeros(kernel.shape[-1], np.float32)
            weights = fold_conv_bn(kernel, bias, *_bn_parameters(following), following.epsilon)
            relu = i + 2 < len(layers) and plain_relu(layers[i + 2])
            new = keras.layers.Conv2D.from_config({**layer.get_config(), "use_bias": True,
                                                   "activation": "relu" if relu else "linear"})
            i += 3 if relu else 2
        else:
            weights = layer.get_weights()
            new = layer.__class__.from_config(layer.get_config())
            i += 1
        x = new(x)
        pending.append((new, weights))
    folded = keras.Model(inputs, x, name=name or f"{model.name}_bn_folded")
    for new, weights in pending:
        new.set_weights(weights)
    return folded
