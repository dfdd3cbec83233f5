"""The served application: request checking, the model replica, dynamic batching.

One Ray Serve deployment, `Classifier`, answers GET /health and POST /predict
({"images": [28x28 lists of pixels in [0, 1], ...]} -> {"predictions": [...], ...}) on 127.0.0.1;
any other path is a 404, a wrong method a 405. Every client mistake is a 4xx with a JSON
{"error": "..."} from `parse_images`, before the model sees anything. A replica runs a .tflite in
LiteRT or a SavedModel (the only case that imports TensorFlow); with batching on, Serve's
`serve.batch` lets concurrent requests share one model call.
"""
from __future__ import annotations

import difflib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
from ray import serve
from starlette.responses import JSONResponse

import labkit  # noqa: F401  (legacy-Keras and log switches before anything loads TensorFlow)
from labkit import measure
from labkit.serving import MAX_BODY_BYTES, MAX_IMAGES  # the package set Ray's 127.0.0.1 switch

IMAGE_SHAPE = (28, 28)
KEYS = ("images",)


class ClientError(ValueError):
    """A request the client got wrong: `status` is the 4xx to answer, the message says what."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- checking a request

def _no_constants(name: str):
    raise ClientError(422, f"pixel values must be numbers in [0, 1]; JSON has no {name} "
                           "(Python's json writes it, but it is not a pixel value)")


def parse_images(body: bytes) -> np.ndarray:
    """A request body -> float32 images (n, 28, 28, 1), or ClientError with the status and why.

    Checked in order: size, JSON, keys, a non-empty list of at most MAX_IMAGES images, each
    28x28 numbers (a trailing channel of 1 is accepted), none NaN or infinite, all in [0, 1].
    """
    images = _images_field(body)
    if not isinstance(images, list):
        raise ClientError(422, '"images" must be a list of 28x28 images, '
                               f"got a JSON {type(images).__name__}")
    if not images:
        raise ClientError(422, '"images" is an empty list; send at least one image')
    if len(images) > MAX_IMAGES:
        raise ClientError(413, f'"images" holds {len(images)} images; '
                               f"the limit is {MAX_IMAGES} per request")
    return _pixels(images)


def _images_field(body: bytes):
    """The "images" value of a JSON object body: size, JSON and keys checked."""
    if len(body) > MAX_BODY_BYTES:
        raise ClientError(413, f"the body has {len(body)} bytes; "
                               f"the limit is {MAX_BODY_BYTES} bytes")
    if not body.strip():
        raise ClientError(400, 'the body is empty; send JSON {"images": [...]}')
    try:
        request = json.loads(body, parse_constant=_no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClientError(400, f'the body is not JSON ({error}); send {{"images": [...]}}') \
            from None
    if not isinstance(request, dict):
        raise ClientError(400, f"the body is a JSON {type(request).__name__}; "
                               'send an object {"images": [...]}')
    unknown = [key for key in request if key not in KEYS]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], KEYS, n=1)
        raise ClientError(400, f"unknown key {unknown[0]!r}"
                          + (f"; did you mean {hint[0]!r}?" if hint
                             else f"; the only key is {KEYS[0]!r}"))
    if "images" not in request:
        raise ClientError(400, 'the key "images" is missing')
    return request["images"]


def _pixels(images: list) -> np.ndarray:
    """A list of images as float32 (n, 28, 28, 1): numbers, 28x28, finite, in [0, 1]."""
    try:
        x = np.asarray(images)
    except ValueError:   # NumPy refuses ragged nesting
        raise ClientError(422, "every image must be 28 rows of 28 pixels; "
                               "the lists have uneven lengths") from None
    if x.dtype.kind not in "iuf":   # strings, null, nested objects, or booleans only
        raise ClientError(422, "pixel values must be numbers in [0, 1]; found JSON values that "
                               f"are not numbers (NumPy read them as {x.dtype})")
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.shape[1:] != IMAGE_SHAPE:
        raise ClientError(422, "every image must be 28x28 pixels; "
                               f"got images of shape {x.shape[1:]}")
    if not np.isfinite(x).all():   # JSON numbers can overflow to infinity, e.g. 1e999
        raise ClientError(422, "pixel values must be finite numbers in [0, 1]")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise ClientError(422, "pixel values must lie in [0, 1] (as labkit.data returns them); "
                               f"got values from {low:g} to {high:g} "
                               "(pixels in 0-255? divide by 255)")
    return x.astype(np.float32)[..., np.newaxis]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits, row by row (numerically stable)."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------- the model a replica runs

def load_model(path):
    """A callable float32 images -> logits: a .tflite in LiteRT (1 thread), or a SavedModel."""
    path = Path(path)
    if path.is_dir():
        import tensorflow as tf  # not at the top: only a SavedModel replica pays for TensorFlow
        # one core per replica, like LiteRT's; a process whose TensorFlow already runs keeps its own
        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass
        return measure.saved_model(path, name=path.name)
    return measure.LiteRTModel(path, num_threads=1)


@dataclass(frozen=True)
class Settings:
    """What a deployment serves and how (python -m labkit.serving's options)."""
    model_path: str
    batching: bool = True
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005

    def __post_init__(self):
        if self.max_batch_size < 1 or not 0 <= self.batch_wait_timeout_s <= 1:
            raise ValueError("max_batch_size must be >= 1 and batch_wait_timeout_s in [0, 1] s, "
                             f"got {self.max_batch_size} and {self.batch_wait_timeout_s}")


def _json(status: int, content: dict, headers: dict | None = None):
    return JSONResponse(content, status_code=status, headers=headers)


class Classifier:
    """A Ray Serve replica: one model, loaded once, answering /health and /predict."""

    def __init__(self, settings: dict):
        self.settings = Settings(**settings)
        self.model = load_model(self.settings.model_path)
        self.model(np.zeros((1, 28, 28, 1), np.float32))   # warm-up: the first call allocates
        self.pid = os.getpid()
        context = serve.get_replica_context()
        self.replica = str(getattr(context.replica_id, "unique_id", context.replica_id))
        self.node = ray.get_runtime_context().get_node_id()
        self.model_name = Path(self.settings.model_path).name
        self._batched.set_max_batch_size(self.settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    async def __call__(self, request):
        path, method = request.url.path.rstrip("/") or "/", request.method
        routes = {"/health": "GET", "/predict": "POST"}
        if path not in routes:
            return _json(404, {"error": f"no route {path}; "
                                        "the routes are GET /health and POST /predict"})
        if method != routes[path]:
            return _json(405, {"error": f"{path} answers {routes[path]}, not {method}"},
                         {"Allow": routes[path]})
        if path == "/health":
            return _json(200, {"status": "ok", "model": self.model_name, "replica": self.replica,
                               "pid": self.pid, "node": self.node, **asdict(self.settings)})
        arrived = time.perf_counter()
        try:
            x = parse_images(await _read_body(request))
        except ClientError as error:
            return _json(error.status, {"error": str(error)})
        parsed = time.perf_counter()
        if self.settings.batching:
            logits, model_s, batch = await self._batched(x)
        else:
            (logits, model_s, batch), = self._predict([x])
        done = time.perf_counter()
        return _json(200, {
            "predictions": np.argmax(logits, axis=1).tolist(),
            "probabilities": np.round(softmax(logits), 6).tolist(),
            "logits": logits.tolist(), "model": self.model_name, "replica": self.replica,
            "pid": self.pid, "node": self.node, "batch_requests": batch,
            "timing_us": {"parse": 1e6 * (parsed - arrived), "model": 1e6 * model_s,
                          "queue": 1e6 * (done - parsed - model_s),
                          "replica": 1e6 * (done - arrived)}})

    def _predict(self, xs: list) -> list:
        """One model call for a list of requests' images; each request gets its rows back."""
        start = time.perf_counter()
        logits = self.model(np.concatenate(xs) if len(xs) > 1 else xs[0])
        seconds = time.perf_counter() - start
        out, row = [], 0
        for x in xs:
            out.append((np.asarray(logits[row:row + len(x)], np.float32), seconds, len(xs)))
            row += len(x)
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)   # __init__ sets its own values
    async def _batched(self, xs: list) -> list:
        return self._predict(xs)


async def _read_body(request) -> bytes:
    """The body, read no further than MAX_BODY_BYTES + 1 bytes (a bigger one is refused unread)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ClientError(413, f"the body has {declared} bytes; "
                               f"the limit is {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ClientError(413, f"the body is over the limit of {MAX_BODY_BYTES} bytes")
    return b"".join(chunks)


def application(settings: Settings, *, replicas: int = 1, max_ongoing_requests: int = 32,
                max_queued_requests: int = -1, max_replicas_per_node: int | None = None,
                num_cpus: float = 1.0):
    """The Ray Serve application for `settings`: `replicas` copies of Classifier.

    max_ongoing_requests: requests one replica holds at once (with batching, at least
    max_batch_size, or batches never fill). max_queued_requests: requests waiting for a replica
    beyond those; -1 waits without limit, a number turns the excess away at once with 503
    (admission control).
    """
    # A replica being replaced checks for unfinished requests every 0.2 s (Serve's default, 2 s,
    # made every redeploy between load runs wait 3 s with nothing in flight).
    options = dict(num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
                   max_queued_requests=max_queued_requests,
                   ray_actor_options={"num_cpus": num_cpus},
                   health_check_period_s=1.0, graceful_shutdown_wait_loop_s=0.2)
    if max_replicas_per_node:
        options["max_replicas_per_node"] = max_replicas_per_node
    deployment = serve.deployment(Classifier, name="Classifier").options(**options)
    return deployment.bind(asdict(settings))
