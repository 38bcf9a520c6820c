"""Registered models and their named architectures (importing registers them with fairseq)."""

from . import text  # noqa: F401
from . import speech_ctc, speech_s2t  # noqa: F401
from . import hardmax  # noqa: F401
