"""What the fairseq test files read back from a training run: its JSON log records and its
TensorBoard scalars (through tensorboard's own event reader)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

RECORD = re.compile(r"\| (train_inner|train|valid) \| (\{.*\})\s*$")


@dataclass
class Run:
    save_dir: Path
    tb_dir: Path
    output: str

    def records(self, tag: str) -> List[Dict[str, str]]:
        """The ``--log-format json`` records of one kind (train_inner, train, valid)."""
        matches = (RECORD.search(line) for line in self.output.splitlines())
        return [json.loads(m.group(2)) for m in matches if m and m.group(1) == tag]


def scalars(log_dir: Path) -> Dict[str, List[float]]:
    """Every scalar series of a TensorBoard log directory, by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [event.value for event in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
