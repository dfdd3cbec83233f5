"""One solution of each exercise, in plain NumPy (`check.solution(name)` prints one).

Written apart from labkit's own implementations, which the checkers compare against: a learner who
reads one here and labkit's beside it sees two correct ways to write the same math.
"""
import math

import numpy as np

# ----------------------------------------------------------------------------- 01 · baseline

def conv_macs(height, width, kernel_size, in_channels, out_channels, stride=1, padding="same"):
    if padding == "same":
        out_h, out_w = math.ceil(height / stride), math.ceil(width / stride)
    else:  # "valid": the kernel must fit inside the image
        out_h = (height - kernel_size) // stride + 1
        out_w = (width - kernel_size) // stride + 1
    # each output value: one multiply-accumulate per kernel tap and input channel
    return out_h * out_w * out_channels * kernel_size * kernel_size * in_channels


def latency_summary(times_s, warmup):
    kept = np.asarray(times_s, dtype=float)[warmup:] * 1e6   # drop the warm-up calls; seconds -> µs
    return float(np.percentile(kept, 50)), float(np.percentile(kept, 95))


# ----------------------------------------------------------------------------- 02 · pruning

def magnitude_mask(weights, sparsity):
    magnitudes = np.abs(weights).ravel()
    pruned = int(round(sparsity * magnitudes.size))
    mask = np.ones(magnitudes.size, dtype=bool)
    mask[np.argsort(magnitudes, kind="stable")[:pruned]] = False   # the smallest |w| go
    return mask.reshape(np.shape(weights))


def m_by_n_mask(kernel, m=2, n=4):
    inputs_last = np.moveaxis(np.abs(kernel), -2, -1)       # groups run along the input axis
    groups = inputs_last.reshape(-1, n)
    order = np.argsort(-groups, axis=1, kind="stable")        # largest first
    keep = np.zeros_like(groups, dtype=bool)
    # m zeros per group: keep the n - m largest
    np.put_along_axis(keep, order[:, :n - m], True, axis=1)
    return np.moveaxis(keep.reshape(inputs_last.shape), -1, -2)


# ----------------------------------------------------------------------------- 03 · clustering

def kmeans_step(weights, centroids):
    weights, centroids = np.ravel(weights), np.asarray(centroids, dtype=float)
    labels = np.argmin(np.abs(weights[:, None] - centroids[None, :]), axis=1)
    new_centroids = centroids.copy()
    for j in range(len(centroids)):
        members = weights[labels == j]
        if members.size:                                   # an empty cluster keeps its centroid
            new_centroids[j] = members.mean()
    return labels, new_centroids


def codebook_bytes(num_weights, clusters):
    index_bits = max(1, math.ceil(math.log2(clusters)))   # bits to name one of `clusters` centroids
    # float32 codebook + packed indices
    return clusters * 4 + math.ceil(num_weights * index_bits / 8)


# ----------------------------------------------------------------------------- 04 · quantization

def affine_params(x, bits):
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    lo, hi = min(float(np.min(x)), 0.0), max(float(np.max(x)), 0.0)   # the range must hold 0
    scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
    zero_point = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return scale, zero_point


def int8_dense(x_q, x_scale, x_zero_point, w_q, w_scale, b_q, y_scale, y_zero_point):
    accumulator = ((x_q.astype(np.int32) - x_zero_point) @ w_q.astype(np.int32)
                   + b_q.astype(np.int32))
    # one per tensor or per output channel
    real_multiplier = x_scale * np.asarray(w_scale) / y_scale
    y = np.round(accumulator * real_multiplier) + y_zero_point
    return np.clip(y, -128, 127).astype(np.int8)


# ----------------------------------------------------------------------------- 05 · graph

def batchnorm_inference(x, gamma, beta, mean, variance, epsilon):
    return gamma * (x - mean) / np.sqrt(variance + epsilon) + beta


def fold_conv_bn(kernel, bias, gamma, beta, mean, variance, epsilon):
    scale = gamma / np.sqrt(variance + epsilon)          # one factor per output channel (last axis)
    return kernel * scale, (bias - mean) * scale + beta


# ----------------------------------------------------------------------------- 07 · pipeline

def dominates(a, b):
    """a and b are (accuracy, latency_us, size_bytes): accuracy up, latency and size down."""
    no_worse = a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]
    better = a[0] > b[0] or a[1] < b[1] or a[2] < b[2]
    return no_worse and better


def pareto_front(points):
    def beats(a, b):   # the rule of dominates: no worse anywhere, better somewhere
        return (a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]) and \
            (a[0] > b[0] or a[1] < b[1] or a[2] < b[2])
    points = [tuple(p) for p in points]
    return np.array([not any(beats(other, p) for other in points) for p in points])


# ----------------------------------------------------------------------------- 08 · search

def low_rank(weights, rank):
    u, s, vt = np.linalg.svd(weights, full_matrices=False)
    return u[:, :rank] * s[:rank], vt[:rank]   # Eckart-Young: keep the largest singular values


def distillation_loss(student_logits, teacher_logits, labels, temperature, alpha):
    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    log_p = log_softmax(student_logits)
    hard = -np.mean(log_p[np.arange(len(labels)), labels])
    teacher_log_p = log_softmax(teacher_logits / temperature)
    student_log_p = log_softmax(student_logits / temperature)
    kl = np.mean(np.sum(np.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=1))
    return float(alpha * hard + (1 - alpha) * temperature ** 2 * kl)


# ----------------------------------------------------------------------------- 01 · roofline

def arithmetic_intensity(macs, weight_count, weight_bits, activation_count, activation_bits=32):
    bytes_moved = (weight_count * weight_bits + activation_count * activation_bits) / 8
    if bytes_moved == 0:
        raise ValueError("nothing is moved, so FLOPs per byte is undefined")
    return 2 * macs / bytes_moved   # a MAC is 2 FLOPs: a multiply and an add


def roofline_time(macs, bytes_moved, peak_flops_per_s, bandwidth_bytes_per_s):
    compute_s = 2 * macs / peak_flops_per_s
    memory_s = bytes_moved / bandwidth_bytes_per_s
    return max(compute_s, memory_s)   # the two overlap: the slower one sets the time


# ----------------------------------------------------------------------------- 09 · serving

def replicas_needed(rate_rps, service_time_s, slo_s, quantile=0.99):
    tail = -math.log(1 - quantile)   # the q-quantile of an exponential time, in units of its mean
    if tail * service_time_s >= slo_s:
        raise ValueError(f"even an idle replica's p{quantile * 100:g} exceeds {slo_s} s")
    c = max(1, math.floor(rate_rps * service_time_s))   # fewer replicas could not even keep up
    while True:
        spare = 1 / service_time_s - rate_rps / c        # mu - lambda of one replica
        if spare > 0 and tail / spare <= slo_s:
            return c
        c += 1
