from . import speech_ctc  # noqa: F401  (registers --criterion speech_ctc)
