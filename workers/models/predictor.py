"""The predictor that batches go through: the host only checks the dtype, the device does the rest.

``preprocess`` keeps a batch as uint8 (the ``fast`` decoder's, and the ``keras`` decoder's whole-number
float pixels, converted exactly), so a quarter of float32's bytes cross to the device. ``predict`` pads
the batch to the compiled size; the compiled function preprocesses it on the device (a uint8 batch
through its ``PixelTable``, exactly the reference path's input) and runs the model and the head
(float32 outputs, softmax, top-k, pooling).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers.contract import ModelSpec
from workers.models.backends import Forward, from_dlpack

# extra outputs of a predictor built with ``expose_inputs`` (tests): the float32 pixels the device cast the
# batch to, and the preprocessed batch (the model's input)
PIXELS, MODEL_INPUT = "pixels", "model_input"
INPUT_DTYPES = ("uint8", "float32")
KDLCPU = 1  # DLPack's device type of host memory


def host_batch(x: np.ndarray) -> np.ndarray:
    """uint8 when that is exact (uint8 pixels, or whole-number floats in 0..255), else float32."""
    if x.dtype == np.uint8:
        return x
    if x.size and (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        if x.min() >= 0 and x.max() <= 255:
            as_uint8 = x.astype(np.uint8)
            if np.array_equal(as_uint8, x):
                return as_uint8
    return x.astype(np.float32, copy=False)


@dataclass(frozen=True)
class PixelTable:
    """A per-pixel preprocessing as a lookup: output channel ``c`` of a uint8 pixel ``p`` is
    ``values[c * 256 + p[source[c]]]``, computed once on the host by the numpy ``preprocess_input``.

    On the device this is one gather, and bit for bit the host's float path: the arithmetic itself, run
    on the device, differs from numpy by a unit in the last place (TensorFlow's graph optimiser and XLA
    turn ``x / 127.5`` into ``x * (1 / 127.5)``), enough to move a deep model's scores past 1e-4."""

    values: np.ndarray  # float32, 3 x 256, flattened
    source: tuple[int, ...]  # the input channel each output channel reads (caffe: BGR from RGB)
    identity: bool  # the preprocessing does nothing (``none``, or a model that rescales inside itself)

    @classmethod
    def of(cls, preprocess: Callable[[Any], Any]) -> PixelTable | None:
        """The table of ``preprocess``, or ``None`` when it is not a per-pixel function of one channel each
        (then the device runs ``preprocess`` itself)."""
        ramp = np.repeat(np.arange(256, dtype=np.float32)[:, None, None, None], 3, axis=-1)  # 256 x 1 x 1 x 3
        source = []
        for channel in range(3):
            alone = np.zeros_like(ramp)
            alone[..., channel] = ramp[..., channel]
            varies = np.ptp(np.asarray(preprocess(alone), np.float32), axis=0).reshape(3) > 0
            source.append(varies)
        reads = [[s for s in range(3) if source[s][c]] for c in range(3)]
        if any(len(r) != 1 for r in reads):
            return None
        values = np.asarray(preprocess(ramp.copy()), np.float32).reshape(256, 3).T.copy()
        order = tuple(r[0] for r in reads)
        probe = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
        looked_up = values.reshape(-1)[probe[..., list(order)].astype(np.int32) + np.arange(3) * 256]
        if not np.array_equal(looked_up, np.asarray(preprocess(probe.astype(np.float32)), np.float32)):
            return None
        identity = order == (0, 1, 2) and np.array_equal(values, ramp[:, 0, 0, :].T)
        return cls(values.reshape(-1), order, identity)

    def lookup(self, x: Any) -> Any:
        """A uint8 N x H x W x 3 tensor -> the preprocessed float32 batch, on its device."""
        from keras import ops

        if self.source != (0, 1, 2):
            x = ops.take(x, list(self.source), axis=-1)
        index = ops.cast(x, "int32") + ops.convert_to_tensor(np.arange(3, dtype=np.int32) * 256)
        return ops.take(ops.convert_to_tensor(self.values), index)


def make_forward(preprocess: Callable[[Any], Any], classify: bool, softmax: bool, k: int, columns: list[str],
                 pooling: str, expose_inputs: bool = False) -> Forward:
    """The function each backend compiles: pixels (uint8 or float32) -> the output columns, in ``keras.ops``
    so one implementation serves every backend. A uint8 batch is preprocessed through its ``PixelTable``
    (exactly the float path); a float32 one by ``preprocess`` on the device. Outputs are cast to float32
    before the head, so a mixed precision model yields the same schema."""
    import keras
    from keras import ops

    table = PixelTable.of(preprocess)

    def forward(call: Callable[[Any], Any], x: Any) -> dict[str, Any]:
        uint8 = keras.backend.standardize_dtype(x.dtype) == "uint8"
        if table is not None and uint8 and not table.identity:
            model_input = table.lookup(x)
        else:
            pixels = ops.cast(x, "float32")
            by_table = table is not None and uint8  # the identity
            model_input = pixels if by_table else preprocess(ops.copy(pixels) if expose_inputs else pixels)
        ys = call(model_input)
        ys = list(ys) if isinstance(ys, (list, tuple)) else [ys]
        out: dict[str, Any] = {}
        if classify:
            probs = ops.cast(ys.pop(0), "float32")
            if softmax:
                probs = ops.softmax(probs, axis=-1)
            values, indices = ops.top_k(probs, k=k)
            out["top_k_scores"], out["top_k_indices"] = values, ops.cast(indices, "int32")
        for column, y in zip(columns, ys):
            y = ops.cast(y, "float32")
            if len(y.shape) == 4 and pooling in ("avg", "max"):
                y = ops.mean(y, axis=(1, 2)) if pooling == "avg" else ops.max(y, axis=(1, 2))
            out[column] = ops.reshape(y, (y.shape[0], -1))
        if expose_inputs:  # torch's preprocess_input divides in place, hence the copy above
            out[PIXELS], out[MODEL_INPUT] = ops.cast(x, "float32"), model_input
        return out

    return forward


@dataclass
class Predictor:
    """A model ready for batches: ``preprocess`` on the host, then ``predict`` on the device.

    ``feature_columns`` maps each feature output column to its dimension; ``feature_shapes`` gives the
    unflattened shape of each (useful with ``--pooling none``). ``_compile(dtype, n)`` compiles the forward
    function for input batches of that dtype (``uint8`` or ``float32``) and ``n`` images; each is compiled
    once, on first use. A batch is padded to the smallest of ``batch_sizes`` that holds it: by default only
    ``spec.batch_size`` (one compiled shape for a shard's batches); the HTTP service adds smaller sizes so a
    lone request is not padded to a full batch (``with_batch_sizes``).
    """

    spec: ModelSpec
    model_name: str
    input_hw: tuple[int, int]
    feature_columns: dict[str, int]
    feature_shapes: dict[str, list[int]]
    labels: list[str] | None
    fingerprint: str
    _compile: Callable[[str, int], Callable[[Any], dict[str, Any]]]
    preprocess_name: str = "none"  # the family that runs (caffe, tf, torch, none), for the metadata
    top_k: int = 0  # classes per row: the requested top-k, cut to the model's class count
    batch_sizes: tuple[int, ...] = ()  # the padded sizes compiled, ascending (empty: spec.batch_size alone)
    _compiled: dict[tuple[str, int], Callable[[Any], dict[str, Any]]] = field(default_factory=dict, repr=False)

    def with_batch_sizes(self, sizes: tuple[int, ...]) -> Predictor:
        """The same model, padding each batch to the smallest of ``sizes`` (each at most
        ``spec.batch_size``, which is always one of them) that holds it; compiled forms are shared."""
        chosen = tuple(sorted({min(max(1, s), self.spec.batch_size) for s in sizes} | {self.spec.batch_size}))
        return dataclasses.replace(self, batch_sizes=chosen, _compiled=self._compiled)

    def padded(self, n: int) -> int:
        """The compiled batch size a batch of ``n`` images is padded to."""
        return next((s for s in self.batch_sizes if s >= n), self.spec.batch_size)

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        """The host's part of preprocessing: only the dtype (``host_batch``); the rest runs in ``predict``."""
        return host_batch(x)

    def predict(self, x: Any) -> dict[str, np.ndarray]:
        """Run one batch of N <= ``batch_size`` images of ``input_hw``, N x H x W x 3 RGB in 0..255; returns
        numpy arrays of N rows per output column.

        ``x`` may be a numpy array (uint8 or float32; any other dtype goes through ``host_batch``), a tensor
        of the running backend (``tf.Tensor``, ``jax.Array``, ``torch.Tensor``, uint8 or float32) already on
        the device, or any object with ``__dlpack__`` (e.g. a CUDA tensor of another framework), taken
        without a copy (one in host memory goes the numpy way). Padding to the compiled batch size happens
        where the batch is.
        """
        if not isinstance(x, np.ndarray) and hasattr(x, "__dlpack_device__") and x.__dlpack_device__()[0] == KDLCPU:
            x = np.from_dlpack(x)  # host memory: the numpy path (TensorFlow aborts on an unaligned DLPack buffer)
        if isinstance(x, np.ndarray):
            if x.dtype.name not in INPUT_DTYPES:
                x = host_batch(x)
            dtype, n = x.dtype.name, len(x)
            self._check(n, tuple(x.shape[1:]))
            batch = self.padded(n)
            if n < batch:
                x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), dtype=x.dtype)])
        else:
            import keras

            if not keras.ops.is_tensor(x):
                if not hasattr(x, "__dlpack__"):
                    raise TypeError(f"predict takes a numpy array, a {keras.backend.backend()} tensor or a DLPack "
                                    f"tensor, not {type(x).__name__}")
                x = from_dlpack(x)
            dtype, n = keras.backend.standardize_dtype(x.dtype), int(x.shape[0])
            if dtype not in INPUT_DTYPES:
                raise ValueError(f"a device batch must be uint8 or float32, got {dtype}")
            self._check(n, tuple(int(d) for d in x.shape[1:]))
            batch = self.padded(n)
            if n < batch:
                x = keras.ops.pad(x, [(0, batch - n), (0, 0), (0, 0), (0, 0)])
        out = self.compiled(dtype, batch)(x)
        return {name: _numpy(value)[:n] for name, value in out.items()}

    def compiled(self, dtype: str, batch: int | None = None) -> Callable[[Any], dict[str, Any]]:
        """The forward function compiled for ``dtype`` batches of ``batch`` images (default
        ``spec.batch_size``), compiled on first use."""
        key = (dtype, batch or self.spec.batch_size)
        if key not in self._compiled:
            self._compiled[key] = self._compile(*key)
        return self._compiled[key]

    def _check(self, n: int, shape: tuple[int, ...]) -> None:
        if n > self.spec.batch_size:
            raise ValueError(f"batch of {n} exceeds the compiled batch size {self.spec.batch_size}")
        if shape != (*self.input_hw, 3):
            raise ValueError(f"images of shape {shape} for a model compiled for {(*self.input_hw, 3)}")


def _numpy(value: Any) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(value))
