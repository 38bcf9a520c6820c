from . import speech_ctc  # noqa: F401  (registers --criterion speech_ctc)
from . import associative_recall  # noqa: F401  (registers --criterion associative_recall)
