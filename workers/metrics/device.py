"""Memory in use on the accelerators, as the Keras backend's framework reports it (no figure on the CPU).

TensorFlow: ``get_memory_info`` of each GPU; JAX: ``memory_stats()["bytes_in_use"]`` of each non-CPU device;
PyTorch: ``torch.cuda.memory_allocated``. Each is read only when that framework is already imported.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def device_memory() -> dict[str, int]:
    """Bytes in use per device name (``GPU:0``, ``cuda:0``); empty without an accelerator."""
    out: dict[str, int] = {}
    try:
        if "tensorflow" in sys.modules:
            tf = sys.modules["tensorflow"]
            for device in tf.config.list_logical_devices("GPU"):
                name = device.name.split("device:")[-1]
                out[name] = int(tf.config.experimental.get_memory_info(name)["current"])
        if "jax" in sys.modules:
            for device in sys.modules["jax"].local_devices():
                stats = device.memory_stats() if device.platform != "cpu" else None
                if stats and "bytes_in_use" in stats:
                    out[f"{device.platform}:{device.id}"] = int(stats["bytes_in_use"])
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            torch = sys.modules["torch"]
            for i in range(torch.cuda.device_count()):
                out[f"cuda:{i}"] = int(torch.cuda.memory_allocated(i))
    except Exception as exc:  # a metric must never fail a shard
        log.debug("cannot read device memory: %s", exc)
    return out


def resident_bytes() -> int | None:
    """This process's resident memory (Linux ``/proc``), or None elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
