"""``gemmaforge reward-score --model RM --file FILE.jsonl``: score preference pairs
(``{"prompt", "chosen", "rejected"}``) or single completions (``{"prompt", "completion"}``) with a reward
model from ``gemmaforge reward``. One JSON object per input line on stdout; for pairs, the accuracy on
stderr."""

from __future__ import annotations

import json
import sys

from ..errors import GemmaforgeError


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="reward model directory (model/ of a gemmaforge reward run)")
    p.add_argument("--file", required=True, help="JSONL of pairs or of prompt + completion")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward")
    p.add_argument("--plain", action="store_true",
                   help="prompts and replies are plain text, no chat template (a model trained with chat_template: false)")


def run(args) -> int:
    from ..tokenizer import load_tokenizer
    from ..train.chats import Record, pair, scored
    from ..train.data import read_jsonl
    from ..train.reward import load_reward_model, score_sequences

    if args.batch < 1:
        raise GemmaforgeError(f"--batch must be >= 1, got {args.batch}")
    model = load_reward_model(args.model)
    tok = load_tokenizer(args.model)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    lines, seqs, kinds = [], [], []
    for n, row in read_jsonl(args.file):
        rec = Record(f"{args.file} line {n}", row)
        if "chosen" in row or "rejected" in row:
            p = pair(tok, rec, not args.plain)
            seqs += [p.chosen, p.rejected]
            kinds.append("pair")
        else:
            if not isinstance(row.get("completion"), str) or not row["completion"].strip():
                raise GemmaforgeError(f"{rec.where} has neither chosen/rejected nor a non-empty completion to score")
            seqs.append(scored(tok, rec, row["completion"], not args.plain))
            kinds.append("single")
        lines.append(n)
    if not lines:
        raise GemmaforgeError(f"{args.file} has no records to score")
    longest = max(len(s) for s in seqs)
    if longest > model.config.max_position_embeddings:
        raise GemmaforgeError(f"a sequence has {longest} tokens, more than the model's context "
                              f"{model.config.max_position_embeddings}: shorten it")
    scores = iter(score_sequences(model, seqs, pad, args.batch))
    right = pairs = 0
    for n, kind in zip(lines, kinds):
        if kind == "pair":
            c, r = next(scores), next(scores)
            pairs += 1
            right += c > r
            print(json.dumps({"line": n, "chosen": c, "rejected": r, "margin": c - r}))
        else:
            print(json.dumps({"line": n, "reward": next(scores)}))
    if pairs:
        print(f"gemmaforge: {pairs} pairs, accuracy {right / pairs:.3f}", file=sys.stderr)
    return 0
