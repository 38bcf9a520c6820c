"""fairseq's ``ctc`` criterion, made to work on ``--task speech_to_text`` batches.

speech_to_text appends ``</s>`` to every target and counts it in ``target_lengths`` and
``ntokens``. fairseq's ``ctc`` criterion drops ``</s>`` from the targets but trusts
``target_lengths``, so ``F.ctc_loss`` gets lengths that add up past the targets and fails
("Expected tensor to have size ... for argument #2 'targets'"). ``speech_ctc`` withholds those two
counts, so ``ctc`` recounts them from the targets without ``</s>`` and padding; everything else
(options, blank index 0, validation ``uer`` / ``wer`` with ``--post-process``) is fairseq's ``ctc``.

    fairseq-train DATA --task speech_to_text --arch clustered_ctc --criterion speech_ctc \
        --post-process letter ...
"""

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.ctc import CtcCriterion, CtcCriterionConfig


@dataclass
class SpeechCtcCriterionConfig(CtcCriterionConfig):
    pass


@register_criterion("speech_ctc", dataclass=SpeechCtcCriterionConfig)
class SpeechCtcCriterion(CtcCriterion):
    def forward(self, model, sample, reduce=True, **kwargs):
        counts_with_eos = ("target_lengths", "ntokens")
        sample = {key: value for key, value in sample.items() if key not in counts_with_eos}
        return super().forward(model, sample, reduce=reduce, **kwargs)
