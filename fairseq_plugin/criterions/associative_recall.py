"""``--criterion associative_recall``: masked-LM cross-entropy on the query values, with accuracy.

fairseq's ``masked_lm`` criterion computes the same loss but logs no accuracy. This one runs the
model's masked-LM head on the target positions only (``masked_tokens``, as ``masked_lm`` does)
and logs ``accuracy``: the percentage of queries whose value is the argmax (so ``valid_accuracy``
in the JSON log and in TensorBoard, and ``--best-checkpoint-metric accuracy``).
"""

import math
from dataclasses import dataclass

from fairseq import modules
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics


@dataclass
class AssociativeRecallCriterionConfig(FairseqDataclass):
    pass


@register_criterion("associative_recall", dataclass=AssociativeRecallCriterionConfig)
class AssociativeRecallCriterion(FairseqCriterion):
    def forward(self, model, sample, reduce=True):
        masked = sample["target"].ne(self.padding_idx)  # (B, T): the query values
        logits = model(**sample["net_input"], masked_tokens=masked)[0]  # (n, V)
        targets = sample["target"][masked]  # (n,)
        loss = modules.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), reduction="sum")
        queries = int(masked.sum())
        logging_output = {
            "loss": loss.data,
            "ncorrect": int((logits.argmax(-1) == targets).sum()),
            "nqueries": queries,
            "ntokens": sample["ntokens"],
            "nsentences": sample["nsentences"],
            "sample_size": queries,
        }
        return loss, queries, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        loss = sum(log.get("loss", 0) for log in logging_outputs)
        size = sum(log.get("sample_size", 0) for log in logging_outputs)
        correct = sum(log.get("ncorrect", 0) for log in logging_outputs)
        queries = sum(log.get("nqueries", 0) for log in logging_outputs)
        metrics.log_scalar("loss", loss / max(size, 1) / math.log(2), size, round=3)
        metrics.log_scalar("accuracy", 100.0 * correct / max(queries, 1), queries, round=2)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
