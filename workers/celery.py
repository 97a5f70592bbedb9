"""Where ``celery -A workers`` finds the app (Celery looks for ``workers.celery`` when the package has no
``app`` of its own), so that importing ``workers`` does not import Celery."""

from workers.app import app

__all__ = ["app"]
