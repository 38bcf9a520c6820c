"""Greedy CTC decoding of a speech_to_text split with an ``efficient_ctc`` checkpoint.

Prints one ``H-<id>`` (hypothesis) and ``T-<id>`` (reference) line per utterance, as
fairseq-generate does, then the word and character error rates:

    python experiments/speech/decode_ctc.py CHECKPOINT --data DATA_DIR --split test \
        [--attention-type i_clustered --clusters 25 --topk 32] [--quiet]

Any attention option (``--attention-type``, ``--clusters``, ``--topk``, ...) overrides the
checkpoint's, e.g. to decode a softmax-trained model with clustered attention. WER counts word
edits, CER character edits of the post-processed text (the space included), both in percent.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import editdistance
import torch
from fairseq import checkpoint_utils, utils
from fairseq.data.data_utils import post_process

import fairseq_plugin
from fairseq_plugin.checkpoints import UntrustedCheckpointError
from fairseq_plugin.config import AttentionConfig, add_attention_args
from fairseq_plugin.models.speech_ctc import EfficientCTCModel, ctc_greedy_decode


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="an efficient_ctc checkpoint (checkpoint_best.pt, ...)")
    parser.add_argument("--data", type=Path, required=True, help="speech_to_text data directory")
    parser.add_argument("--config-yaml", default="config.yaml", help="data config file name under --data")
    parser.add_argument("--split", default="valid", help="manifest to decode (<split>.tsv)")
    parser.add_argument("--post-process", default="letter", help="units -> words as fairseq's post_process does")
    parser.add_argument("--max-tokens", type=int, default=50_000, help="frames per batch")
    parser.add_argument("--seed", type=int, default=1, help="seed of the clustering's random hash planes")
    parser.add_argument("--cpu", action="store_true", help="decode on CPU even when CUDA is available")
    parser.add_argument("--quiet", action="store_true", help="print only the error rates")
    add_attention_args(parser.add_argument_group("attention overrides (default: the checkpoint's)"))
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist; pass a .pt file written by fairseq-train")
    if not (args.data / f"{args.split}.tsv").is_file():
        manifest = args.data / f"{args.split}.tsv"
        parser.error(f"{manifest} does not exist; pass the --data directory and --split name of a manifest")
    return args


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    overrides = {"data": str(args.data.resolve()), "config_yaml": args.config_yaml}
    for f in dataclasses.fields(AttentionConfig):
        if getattr(args, f.name) is not None:
            overrides[f.name] = getattr(args, f.name)

    fairseq_plugin.register()
    try:
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(args.checkpoint)], arg_overrides=overrides)
    except UntrustedCheckpointError as err:
        raise SystemExit(f"decode_ctc.py: error: {err}") from None
    model = models[0]
    if not isinstance(model, EfficientCTCModel):
        raise SystemExit(
            f"decode_ctc.py: error: {args.checkpoint} holds a {type(model).__name__}, not an efficient_ctc model; "
            "decode encoder-decoder checkpoints with fairseq-generate"
        )
    use_cuda = torch.cuda.is_available() and not args.cpu
    model.eval()
    if use_cuda:
        model.cuda()
    torch.manual_seed(args.seed)

    task.load_dataset(args.split)
    dataset = task.dataset(args.split)
    batches = task.get_batch_iterator(
        dataset=dataset,
        max_tokens=args.max_tokens,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        required_batch_size_multiple=1,
        seed=args.seed,
    ).next_epoch_itr(shuffle=False)

    tgt_dict = task.target_dictionary
    word_errors = words = char_errors = chars = utterances = 0
    for sample in batches:
        sample = utils.move_to_cuda(sample) if use_cuda else sample
        hypotheses = ctc_greedy_decode(model, sample, tgt_dict, post_process_symbol=args.post_process)
        for index, target, hypothesis in zip(sample["id"].tolist(), sample["target"], hypotheses):
            units = target[(target != tgt_dict.pad()) & (target != tgt_dict.eos())]
            reference = post_process(tgt_dict.string(units), args.post_process)
            word_errors += editdistance.eval(hypothesis.split(), reference.split())
            words += len(reference.split())
            char_errors += editdistance.eval(hypothesis, reference)
            chars += len(reference)
            utterances += 1
            if not args.quiet:
                utt_id = dataset.ids[index]
                print(f"H-{utt_id}\t{hypothesis}\nT-{utt_id}\t{reference}")

    wer = 100.0 * word_errors / max(words, 1)
    cer = 100.0 * char_errors / max(chars, 1)
    attention = cfg.model.attention_type
    print(
        f"{args.split}: WER {wer:.2f} ({word_errors}/{words}) CER {cer:.2f} ({char_errors}/{chars}) "
        f"over {utterances} utterances, attention {attention}"
    )
    return {"wer": wer, "cer": cer}


if __name__ == "__main__":
    main()
