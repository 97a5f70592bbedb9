"""Celery workers for batch inference: ``celery -A workers worker``.

Importing this package creates the Celery app but never imports TensorFlow: the model is built
inside each worker process on its first shard.
"""

__version__ = "0.1.0"

from workers.app import app  # noqa: E402  (celery -A workers finds `app`)

__all__ = ["app", "__version__"]
