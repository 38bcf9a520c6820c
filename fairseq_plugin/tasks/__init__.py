"""Tasks the plugin registers: ``associative_recall`` (MQAR sequences generated from a seed)."""

from . import associative_recall  # noqa: F401

associative_recall.install_help()
