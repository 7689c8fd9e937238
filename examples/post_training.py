"""The demonstrations of docs/post_training.md, on the embedded Gemma 3 270M (pre-trained) and CPU.

    python examples/post_training.py sft      # (a) SFT on chats built from Python's documentation
    python examples/post_training.py reward   # (b) a reward model on a synthetic preference task
    python examples/post_training.py rl       # (c) RLOO on 3-shot addition, a verifiable reward
    python examples/post_training.py gkd      # (d) on-policy GKD (lmbda=1) vs supervised KD (lmbda=0)

Each part writes RUNS/<part>/ (data, runs, results.json) and a plot docs/post_training_<part>.png,
and prints the numbers the docs quote. Everything goes through the public commands' code paths:
``train(cfg, recipe=...)`` is what ``gemmaforge sft|reward|rl|gkd CONFIG.yaml`` runs.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

import gemmaforge
from gemmaforge import atomic
from gemmaforge.train.config import load_config
from gemmaforge.train.loop import train
from gemmaforge.train.metrics import plot_metrics

HERE = Path(__file__).resolve().parent


def common(out: Path, **kw) -> dict:
    return {**dict(model="default", out=str(out), warmup_steps=2, log_every=1, progress=False, tensorboard=False,
                   weight_decay=0.0, loss_chunk=256), **kw}  # kw wins (gkd's student is not the default)


def pydoc_paragraphs() -> list[tuple[str, list[str]]]:
    """(section title, its prose paragraphs) for every pydoc topic: local text that ships with Python."""
    import pydoc_data.topics

    out = []
    for _, text in sorted(pydoc_data.topics.topics.items()):
        blocks = [b for b in text.split("\n\n") if b.strip()]
        title = blocks[0].splitlines()[0].strip()
        prose = [" ".join(b.split()) for b in blocks[1:]
                 if not b.startswith(" ") and not re.match(r"^[=*-]{3,}", b.splitlines()[-1]) and len(b) > 80]
        if prose:
            out.append((title, prose))
    return out


def first_sentence(p: str) -> str:
    m = re.match(r"(.+?[.:])(\s|$)", p)
    return (m.group(1) if m else p)[:300]


def save(path: Path, results: dict) -> None:
    atomic.write_json(path, results)
    print(json.dumps(results, indent=2))


# ---- (a) SFT ------------------------------------------------------------------------------------------
def sft(args) -> dict:
    from gemmaforge.eval.perplexity import perplexity
    from gemmaforge.generation import SamplingParams
    from gemmaforge.train.recipes import SFT

    root = Path(args.runs) / "sft"
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for title, prose in pydoc_paragraphs():
        rows.append({"messages": [{"role": "user", "content": f"In one sentence, what is \"{title}\" in Python?"},
                                  {"role": "assistant", "content": first_sentence(prose[0])}]})
        for p in prose[1:3]:
            words = p.split()
            cut = max(8, len(words) // 2)
            rows.append({"messages": [
                {"role": "system", "content": "You complete passages of the Python language reference."},
                {"role": "user", "content": f"Section \"{title}\". Continue: {' '.join(words[:cut])}"},
                {"role": "assistant", "content": " ".join(words[cut:cut + 40])}]})
    data = root / "chats.jsonl"
    atomic.write_text(data, "".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, common(root / "run", data=str(data), seq_len=256, batch_size=4, max_steps=args.steps,
                                   lr=3e-4, min_lr=3e-5, lora_rank=16, lora_alpha=32.0, eval_every=max(1, args.steps // 2),
                                   save_every=args.steps, eval_batches=4, val_fraction=0.1, seed=0))
    recipe = SFT()
    meta = recipe.meta(cfg)
    val = recipe.batches(cfg, meta, "val")
    n = min(val.num_samples, cfg.eval_batches * cfg.batch_size)
    base = gemmaforge.load(None)
    before = perplexity(base, [val.batch(range(i, min(n, i + 4))) for i in range(0, n, 4)], chunk=256)
    tok = gemmaforge.load_tokenizer(None)
    question = [{"role": "user", "content": 'In one sentence, what is "The "assert" statement" in Python?'}]
    params = dict(temperature=0.0, max_new_tokens=40, chat=True)
    sample_before = gemmaforge.generate(base, tok, [question], **params)[0]
    del base
    t0 = time.time()
    result = train(cfg, recipe=SFT())
    seconds = time.time() - t0
    tuned = gemmaforge.load(root / "run" / "model")
    sample_after = gemmaforge.generate(tuned, tok, [question], **params)[0]
    plot_metrics(root / "run", ["loss"], Path(args.docs) / "post_training_sft.png")
    results = {"conversations": len(rows), "train_rows_packed": recipe.batches(cfg, meta, "train").num_samples,
               "val_conversations": len(val.seqs), "val_rows_packed": val.num_samples, "steps": args.steps, "train_seconds": round(seconds),
               "val_reply_loss_before": before.loss, "val_reply_loss_after": result["val"]["loss"],
               "val_reply_tokens": before.tokens, "sample_before": sample_before, "sample_after": sample_after}
    save(root / "results.json", results)
    return results


# ---- (b) reward model ---------------------------------------------------------------------------------
CATEGORIES = {
    "fruit": "apple banana cherry grape lemon mango orange peach pear plum melon kiwi",
    "color": "red blue green yellow purple orange brown black white pink gray violet",
    "animal": "dog cat horse lion tiger elephant rabbit wolf bear monkey zebra giraffe",
    "country": "France Germany Spain Italy Japan China Brazil Canada Mexico India Egypt Kenya",
    "musical instrument": "piano guitar violin drum flute trumpet cello harp saxophone clarinet banjo organ",
    "vehicle": "car bus truck bicycle train airplane boat motorcycle tractor scooter tram ship",
    "sport": "football tennis basketball golf hockey baseball cricket rugby boxing cycling skiing swimming",
    "vegetable": "carrot potato onion tomato cabbage lettuce pepper spinach broccoli pea bean garlic",
    "profession": "doctor teacher lawyer farmer engineer nurse pilot chef baker plumber writer painter",
    "planet": "Mercury Venus Earth Mars Jupiter Saturn Uranus Neptune",
}


def preference_pairs(held_out: bool, n: int, seed: int) -> list[dict]:
    """'Name a fruit:' -> a fruit (chosen) vs an item of another category (rejected). The held-out
    pairs use the last third of every category's items, which training never shows."""
    rng = random.Random(seed)
    items = {c: v.split() for c, v in CATEGORIES.items()}
    part = lambda xs: xs[len(xs) * 2 // 3:] if held_out else xs[:len(xs) * 2 // 3]
    rows = []
    for _ in range(n):
        cat, other = rng.sample(sorted(items), 2)
        rows.append({"prompt": f"Name a {cat}:", "chosen": " " + rng.choice(part(items[cat])),
                     "rejected": " " + rng.choice(part(items[other]))})
    return rows


def reward(args) -> dict:
    from gemmaforge.train.recipes import Reward

    root = Path(args.runs) / "reward"
    root.mkdir(parents=True, exist_ok=True)
    data, val = root / "pairs.jsonl", root / "heldout.jsonl"
    for path, rows in ((data, preference_pairs(False, 400, 0)), (val, preference_pairs(True, 64, 1))):
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, common(root / "run", data=str(data), val_data=str(val), chat_template=False, seq_len=32,
                                   batch_size=16, max_steps=args.steps, lr=1e-3, min_lr=1e-4, lora_rank=16,
                                   lora_alpha=32.0, eval_every=max(1, args.steps // 4), save_every=args.steps,
                                   eval_batches=4, seed=0))
    t0 = time.time()
    result = train(cfg, recipe=Reward())
    seconds = time.time() - t0
    plot_metrics(root / "run", ["loss", "accuracy", "margin"], Path(args.docs) / "post_training_reward.png")
    vals = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    results = {"train_pairs": 400, "heldout_pairs": result["val"]["tokens"], "steps": args.steps,
               "train_seconds": round(seconds), "chance": 0.5,
               "heldout_accuracy": result["val"]["accuracy"], "heldout_loss": result["val"]["loss"],
               "heldout_curve": [(r["step"], r["accuracy"]) for r in vals if r["split"] == "val"]}
    save(root / "results.json", results)
    return results


# ---- (c) RLOO -----------------------------------------------------------------------------------------
def addition_prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        shots = [(rng.randrange(2, 20), rng.randrange(2, 20)) for _ in range(3)]
        a, b = rng.randrange(2, 20), rng.randrange(2, 20)
        text = "".join(f"{x} + {y} = {x + y}\n" for x, y in shots) + f"{a} + {b} ="
        rows.append({"prompt": text, "answer": a + b})
    return rows


def rl(args) -> dict:
    from gemmaforge.train.recipes import RL

    root = Path(args.runs) / "rl"
    root.mkdir(parents=True, exist_ok=True)
    data, val = root / "prompts.jsonl", root / "heldout.jsonl"
    for path, rows in ((data, addition_prompts(400, 0)), (val, addition_prompts(128, 1))):
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    per_step = 32  # samples: 8 prompts x k=4 (16 gave a reward too noisy to follow)
    cfg = load_config(None, common(root / "run", data=str(data), val_data=str(val), chat_template=False, seq_len=64,
                                   batch_size=per_step, rollouts_per_prompt=4, max_new_tokens=4, max_steps=args.steps,
                                   lr=1e-4, min_lr=1e-5, lora_rank=16, lora_alpha=32.0, kl_coef=0.05,
                                   reward=f"{HERE / 'rewards.py'}:arithmetic", eval_every=max(1, args.steps // 4),
                                   save_every=args.steps, eval_batches=128 // per_step, seed=0))
    t0 = time.time()
    result = train(cfg, recipe=RL())
    seconds = time.time() - t0
    before = rl_heldout_reward(cfg, None)  # the same held-out prompts and seeds, the initial policy
    plot_metrics(root / "run", ["reward", "kl", "entropy", "length"], Path(args.docs) / "post_training_rl.png")
    recs = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in recs if r["split"] == "train"]
    q = max(1, len(tr) // 4)
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    results = {"steps": args.steps, "samples_per_step": per_step, "train_seconds": round(seconds),
               "train_reward_first_quarter": mean(tr[:q], "reward"), "train_reward_last_quarter": mean(tr[-q:], "reward"),
               "kl_last_quarter": mean(tr[-q:], "kl"), "kl_max": max(r["kl"] for r in tr),
               "heldout_reward_initial": before,
               "heldout": [(r["step"], r["reward"], r["kl"]) for r in recs if r["split"] == "val"]}
    save(root / "results.json", results)
    return results


def rl_heldout_reward(cfg, model_path) -> float:
    """Mean reward of one sample per held-out prompt, drawn exactly as the run's validation draws them."""
    from gemmaforge.train.recipes import RL
    from gemmaforge.train.rl import Rewarder

    recipe = RL()
    meta = recipe.meta(cfg)
    val = recipe.batches(cfg, meta, "val")
    rollouts = recipe._rollouts[-1]
    rollouts.policy = gemmaforge.load(model_path)
    rollouts.rewarder = Rewarder(cfg.reward, recipe.tokenizer(cfg), meta["pad_id"], "cpu", meta["tokenizer_sha256"])
    n = min(val.num_samples, cfg.eval_batches * cfg.batch_size)
    return float(val.batch(range(n)).extra["reward"].mean())


# ---- (d) GKD ------------------------------------------------------------------------------------------
def layer_dropped_student(path: Path, drop: list[int]) -> None:
    """The embedded 270M without some layers: a student that shares the teacher's tokenizer and starts
    close enough to it that its own samples mean something."""
    if (path / "config.json").is_file():
        return
    teacher = gemmaforge.load(None)
    keep = [i for i in range(teacher.config.num_layers) if i not in drop]
    config = teacher.config.replace(layer_types=tuple(teacher.config.layer_types[i] for i in keep))
    student = gemmaforge.Gemma(config)
    state = {}
    for k, v in teacher.state_dict().items():
        m = re.match(r"layers\.(\d+)\.(.+)", k)
        if m is None:
            state[k] = v
        elif int(m.group(1)) in keep:
            state[f"layers.{keep.index(int(m.group(1)))}.{m.group(2)}"] = v
    student.load_state_dict(state)
    gemmaforge.save_pretrained(student, path)
    gemmaforge.load_tokenizer(None).save(path / "tokenizer.json")


def gkd_prompts(n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    paragraphs = [p for _, prose in pydoc_paragraphs() for p in prose]
    random.Random(0).shuffle(paragraphs)
    prompts = [{"prompt": " ".join(p.split()[:16])} for p in paragraphs]
    return prompts[:n_train], prompts[n_train:n_train + n_val]


def teacher_completions(rows: list[dict], path: Path, max_new_tokens: int) -> None:
    """The teacher's own samples for the supervised-KD baseline (done once)."""
    from gemmaforge.generation import Engine, SamplingParams

    if path.is_file():
        return
    teacher, tok = gemmaforge.load(None), gemmaforge.load_tokenizer(None)
    engine = Engine.for_model(teacher)
    out = []
    for i in range(0, len(rows), 16):
        part = rows[i:i + 16]
        gens = engine.generate([tok.encode(r["prompt"]) for r in part],
                               SamplingParams(temperature=1.0, seed=i, max_new_tokens=max_new_tokens),
                               stop_ids={tok.eos_id})
        out += [dict(r, completion=tok.decode(g)) for r, g in zip(part, gens)]
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in out))


def divergence_on_own_samples(model_path, rows: list[dict], cfg, *, beta: float, max_new_tokens: int) -> dict:
    """Held-out generalized JSD (beta) between teacher and student per token, on completions the
    student samples itself (seeded) and on the teacher's samples."""
    from gemmaforge.train.objectives import GeneralizedJSD, LiveTeacher
    from gemmaforge.train.packing import Tokens, rows_batch
    from gemmaforge.train.rollouts import sample
    from gemmaforge.generation import SamplingParams

    tok = gemmaforge.load_tokenizer(None)
    student = gemmaforge.load(model_path)
    teacher = gemmaforge.load(None).requires_grad_(False)
    objective = GeneralizedJSD(student, LiveTeacher(teacher), beta=beta, tau=1.0, chunk=256).eval()
    prompts = [tok.encode(r["prompt"]) for r in rows]
    outs = sample(student, prompts, SamplingParams(temperature=1.0), [10**9 + i for i in range(len(rows))],
                  stop_ids={tok.eos_id}, max_new_tokens=max_new_tokens)
    result = {}
    for name, completions in (("own_samples", [g[0].tokens for g in outs]),
                              ("teacher_samples", [tok.encode(r["completion"], add_bos=False) for r in rows])):
        total, count = 0.0, 0
        for i in range(0, len(rows), 8):
            b = rows_batch([[Tokens.join(p, c)] for p, c in zip(prompts[i:i + 8], completions[i:i + 8])], tok.pad_id)
            s, n = objective(b, evaluate=True)
            total, count = total + float(s), count + int(n)
        result[name] = total / count
    return result


def gkd(args) -> dict:
    from gemmaforge.train.recipes import GKD

    root = Path(args.runs) / "gkd"
    root.mkdir(parents=True, exist_ok=True)
    student = root / "student-init"
    layer_dropped_student(student, drop=[6, 7, 8, 9, 12, 13])
    new = args.max_new_tokens
    train_rows, val_rows = gkd_prompts(args.steps * 8, 32)
    data, val = root / "prompts.jsonl", root / "heldout.jsonl"
    teacher_completions(train_rows, data, new)
    teacher_completions(val_rows, val, new)
    held = [json.loads(x) for x in val.read_text().splitlines()]
    results = {"student": "embedded 270M without layers 6-9, 12, 13 (12 of 18)", "beta": 0.5, "steps": args.steps,
               "prompts_per_step": 8, "max_new_tokens": new}
    t0 = time.time()
    results["initial"] = divergence_on_own_samples(student, held, None, beta=0.5, max_new_tokens=new)
    results["eval_seconds"] = round(time.time() - t0)
    for lmbda in (1.0, 0.0):
        name = f"lmbda{lmbda:g}"
        cfg = load_config(None, common(root / name, model=str(student), teacher="default", data=str(data),
                                       val_data=str(val), chat_template=False, seq_len=64, batch_size=8,
                                       max_steps=args.steps, lr=1e-4, min_lr=1e-5, lmbda=lmbda, beta=0.5,
                                       temperature=1.0, max_new_tokens=new, eval_every=args.steps,
                                       save_every=args.steps, eval_batches=1, seed=0))
        t0 = time.time()
        train(cfg, recipe=GKD())
        recs = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
        results[name] = {"train_seconds": round(time.time() - t0),
                         "student_target_tokens": sum(r["targets"] for r in recs if r["split"] == "train"),
                         **divergence_on_own_samples(root / name / "model", held, None, beta=0.5, max_new_tokens=new)}
    plot_gkd(root, Path(args.docs) / "post_training_gkd.png")
    save(root / "results.json", results)
    return results


def plot_gkd(root: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, label in (("lmbda1", "on-policy (lmbda=1)"), ("lmbda0", "teacher samples (lmbda=0)")):
        recs = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
        tr = [r for r in recs if r["split"] == "train"]
        tokens = torch.tensor([r["targets"] for r in tr]).cumsum(0).tolist()
        ax.plot(tokens, [r["jsd"] for r in tr], label=label)
    ax.set_xlabel("student target tokens")
    ax.set_ylabel("training JSD (beta 0.5) per token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=("sft", "reward", "rl", "gkd"))
    p.add_argument("--runs", default="runs/post-training")
    p.add_argument("--docs", default=str(HERE.parent / "docs"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=16, help="gkd: completion length")
    args = p.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # the plots come last: fail before the work
        sys.exit("post_training.py: the plots need matplotlib: pip install -e '.[train]'")
    args.steps = args.steps or {"sft": 16, "reward": 16, "rl": 32, "gkd": 12}[args.part]
    torch.manual_seed(0)
    t0 = time.time()
    {"sft": sft, "reward": reward, "rl": rl, "gkd": gkd}[args.part](args)
    print(f"{args.part}: {time.time() - t0:.0f}s in total", file=sys.stderr)


if __name__ == "__main__":
    main()
