"""GPU inference benchmark, one device call: build, check every fast kernel against eager, time every
variant (HF transformers eager as the baseline), write JSON to $OUT.

    python bench/gpu_inference.py                  # one H100: gemma2-2b shape, random bf16 weights
    python bench/gpu_inference.py --device cpu --preset tiny-gemma2 --prefill-lens 16,32 \\
        --long-prefill 64 --batches 1,2 --prompt-len 8 --new-tokens 4 --repeats 1   # CI smoke run

Targets (issue 4; anchors in docs/reference.md §9, HF 5.17 on one H100): decode batch 1 >= 350 tok/s
(HF 29.6, bandwidth floor ~500), batch 16 >= 3,000 tok/s (HF 430), prefill 4096 >= 2x HF eager, and
an 8192-token prefill without a T x T score matrix. Random weights are fine for speed; correctness is
checked separately against the eager path on the same device, soft-caps included.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from gemmaforge import Gemma, preset
from gemmaforge.attention import Mask, attention, chunked_attention
from gemmaforge.benchmark import BenchSettings, best_time, decode_timing, environment, random_prompts, write_json
from gemmaforge.checkpoint.hf import to_hf_name
from gemmaforge.config import to_hf_config
from gemmaforge.generation.engine import Engine
from gemmaforge.generation.fast import FastForward
from gemmaforge.generation.sampling import SamplingParams


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="gemma2-2b")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--prefill-lens", default="2048,4096")
    p.add_argument("--long-prefill", type=int, default=8192, help="prefill checked for memory (no T^2 scores)")
    p.add_argument("--batches", default="1,16", help="decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt before the timed decode")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true", help="no HF transformers baseline")
    p.add_argument("--out", default=None, help="default: $OUT/gpu_inference.json")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(args, device, dtype) -> Gemma:
    config = preset(args.preset)
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # random norms too (a (1 + w) slip would show), small enough to keep activations sane
            p.normal_(0.0, 0.1 if name.endswith("norm.weight") else 0.02)
    return model.to(dtype).eval()


def hf_model(model: Gemma, device, dtype):
    import transformers

    hf = to_hf_config(model.config)
    cls = transformers.Gemma2Config if model.config.family == "gemma2" else transformers.Gemma3TextConfig
    cfg = cls(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "eager"  # the baseline of docs/reference.md §9 (and soft-cap exact)
    arch = transformers.Gemma2ForCausalLM if model.config.family == "gemma2" else transformers.Gemma3ForCausalLM
    with torch.device(device):
        ref = arch(cfg).to(dtype)
    state = {to_hf_name(k): v for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def low(config) -> int:
    """Smallest random token id: above Gemma's special/control ids (tiny test vocabularies: a quarter)."""
    return min(1000, config.vocab_size // 4)


def guarded(fn):
    """fn() or, if it raises, the error as text: one failing variant must not lose the whole device run."""
    try:
        return fn()
    except Exception as e:  # recorded in the JSON, printed, and the run goes on
        print(f"  ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
        return f"error: {type(e).__name__}: {str(e)[:300]}"


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# ---- correctness: every fast kernel against eager, on this device -----------------------------------
def correctness(model, hf, device, dtype) -> list[dict]:
    c = model.config
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    checks = []

    def check(name, err, limit=tol):
        checks.append({"name": name, "max_rel_err": err, "limit": limit, "ok": bool(err <= limit)})
        print(f"  {name}: {err:.2e} (limit {limit:.0e})", flush=True)

    g = torch.Generator(device=device).manual_seed(0)
    t = 512 if device.type == "cuda" else 24
    q = torch.randn(2, c.num_heads, t, c.head_dim, device=device, dtype=dtype, generator=g) * 4
    k = torch.randn(2, c.num_kv_heads, t, c.head_dim, device=device, dtype=dtype, generator=g) * 4
    v = torch.randn(2, c.num_kv_heads, t, c.head_dim, device=device, dtype=dtype, generator=g)
    pos = torch.arange(t, device=device).expand(2, t).clone()
    pos[1, : t // 3] = -1  # a left-padded row
    cap = c.attn_logit_softcap or 50.0
    for window in (None, max(2, t // 4)):
        mask = Mask(pos, pos, window)
        ref = attention(q, k, v, mask, scale=c.attn_scale, softcap=cap, impl="eager")
        kind = "local" if window else "global"
        # an explicit block smaller than T, or the chunked path would be one eager call
        out = chunked_attention(q, k, v, Mask(pos, pos, window), scale=c.attn_scale, softcap=cap, block=t // 4)
        check(f"attention chunked vs eager ({kind}, soft-cap {cap})", rel_err(out[:, :, t // 3 :], ref[:, :, t // 3 :]))
        if device.type == "cuda":
            out = attention(q, k, v, Mask(pos, pos, window), scale=c.attn_scale, softcap=cap, impl="flex")
            check(f"attention flex vs eager ({kind}, soft-cap {cap})", rel_err(out[:, :, t // 3 :], ref[:, :, t // 3 :]))
    try:  # sdpa has no soft-cap hook: asking it to cap must fail loudly, never run uncapped
        attention(q, k, v, Mask(pos, pos), scale=c.attn_scale, softcap=cap, impl="sdpa")
        check("sdpa refuses a soft-cap", 1.0, 0.0)
    except ValueError:
        check("sdpa refuses a soft-cap", 0.0, 0.0)

    tokens = torch.randint(low(c), c.vocab_size, (2, t), device=device, generator=g)
    with torch.inference_mode():
        ref = model(tokens, attn_impl="eager")[:, -8:]
        check("prefill logits auto impl vs eager", rel_err(model(tokens)[:, -8:], ref))
        if hf is not None:
            check("prefill logits vs HF transformers eager", rel_err(ref, hf(tokens).logits[:, -8:]))
        # decode: the fast step (compiled + CUDA graphs on CUDA) against the eager forward, past the window
        fast = FastForward(model)
        steps = 12
        ref_cache, fast_cache = model.new_cache(2, t + steps), fast.new_cache(2, t + steps)
        model(tokens, cache=ref_cache)
        fast(tokens, torch.arange(t, device=device).expand(2, t), fast_cache)
        worst = 0.0
        for i in range(steps):
            new = tokens[:, i : i + 1]
            p = torch.full((2, 1), t + i, device=device)
            worst = max(worst, rel_err(fast(new, p, fast_cache), model(new, p, ref_cache)[:, -1]))
        check("decode fast vs eager", worst)
    return checks


# ---- timings --------------------------------------------------------------------------------------
def time_prefill(model, hf, lens, repeats, device) -> list[dict]:
    rows = []
    for t in lens:
        tokens = torch.randint(low(model.config), model.config.vocab_size, (1, t), device=device)
        row = {"tokens": t}

        def ours(impl=None):
            with torch.inference_mode():
                return model.logits(model.hidden_states(tokens, attn_impl=impl)[:, -1])

        def theirs():
            with torch.inference_mode():
                return hf(tokens, logits_to_keep=1).logits

        variants = {"gemmaforge": ours, "gemmaforge_eager": lambda: ours("eager"),
                    "hf_eager": theirs if hf is not None else None}
        if device.type == "cuda":  # the whole forward compiled too (fuses norms, rope, GeGLU)
            forward_last = torch.compile(lambda x: model.logits(model.hidden_states(x)[:, -1]), dynamic=False)

            def compiled():
                with torch.inference_mode():
                    return forward_last(tokens)
            variants["gemmaforge_compiled"] = compiled
        for name, fn in variants.items():
            if fn is not None:
                row[name] = guarded(lambda: t / best_time(fn, repeats, device))
        if isinstance(row.get("hf_eager"), float):
            best = max(v for k, v in row.items() if k.startswith("gemmaforge") and isinstance(v, float))
            row["best_vs_hf"] = best / row["hf_eager"]
        print(f"  prefill {t}: {row}", flush=True)
        rows.append(row)
    return rows


def time_decode(model, hf, batches, s: BenchSettings, device) -> list[dict]:
    rows = []
    greedy = SamplingParams(temperature=0.0, max_new_tokens=s.new_tokens)
    engines = {"gemmaforge": Engine(model), "gemmaforge_eager": Engine(model, fast=False)}
    for b in batches:
        prompts = random_prompts(model.config.vocab_size, b, s.prompt_len, s.seed + b)
        row = {"batch": b}
        for name, engine in engines.items():
            def go(mark, engine=engine):
                for i, _ in enumerate(engine.steps(prompts, greedy, max_new_tokens=s.new_tokens)):
                    if i == 0:
                        mark()

            def measure(go=go, name=name):
                t0 = time.perf_counter()
                go(lambda: None)  # compile / CUDA-graph capture happen here, outside the timed runs
                sync(device)
                row[f"{name}_warmup_s"] = time.perf_counter() - t0
                ttft, rate = decode_timing(go, s, b, device)
                row[f"{name}_ttft_ms"] = ttft * 1e3
                return rate
            row[name] = guarded(measure)
        if hf is not None:
            ids = torch.tensor(prompts, device=device)

            def theirs(mark):
                class Marker:
                    n = 0

                    def put(self, _):
                        self.n += 1
                        if self.n == 2:
                            mark()

                    def end(self):
                        pass
                with torch.inference_mode():
                    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.new_tokens,
                                min_new_tokens=s.new_tokens, do_sample=False, pad_token_id=0, streamer=Marker())
            def measure_hf():
                ttft, rate = decode_timing(theirs, s, b, device)
                row["hf_eager_ttft_ms"] = ttft * 1e3
                return rate
            row["hf_eager"] = guarded(measure_hf)
            if isinstance(row["hf_eager"], float) and isinstance(row["gemmaforge"], float):
                row["vs_hf"] = row["gemmaforge"] / row["hf_eager"]
        print(f"  decode batch {b}: {row}", flush=True)
        rows.append(row)
    return rows


def long_prefill(model, t, device) -> dict:
    """Peak memory of a ``t``-token prefill against the size of one layer's T x T fp32 scores."""
    c = model.config
    t = min(t, c.max_position_embeddings)
    tokens = torch.randint(low(c), c.vocab_size, (1, t), device=device)
    scores_bytes = c.num_heads * t * t * 4
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.logits(model.hidden_states(tokens)[:, -1])
    sync(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    out = {"tokens": t, "seconds": seconds, "peak_bytes": peak, "t2_scores_bytes": scores_bytes,
           "no_t2_scores": None if peak is None else peak < scores_bytes}
    print(f"  long prefill: {out}", flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_inference: no CUDA device here: pass --device cpu (with a tiny --preset) to smoke-test",
              file=sys.stderr)
        return 2
    dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
             None: torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
    s = BenchSettings(prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=max(map(int, args.batches.split(","))),
                      repeats=args.repeats, threads=torch.get_num_threads(), variants=())
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_inference.json")
    report = {"preset": args.preset, "dtype": str(dtype), "settings": vars(args),
              "environment": environment(torch.get_num_threads())}
    if device.type == "cuda":
        report["environment"]["gpu"] = torch.cuda.get_device_name(device)

    t0 = time.perf_counter()
    model = build(args, device, dtype)
    hf = None if args.skip_hf else hf_model(model, device, dtype)
    print(f"built {args.preset} ({dtype}) on {device} in {time.perf_counter() - t0:.1f}s", flush=True)

    print("correctness against eager:", flush=True)
    report["correctness"] = correctness(model, hf, device, dtype)
    write_json(report, out)  # partial results survive a later crash or timeout
    print("prefill:", flush=True)
    report["prefill"] = time_prefill(model, hf, [int(x) for x in args.prefill_lens.split(",")], args.repeats, device)
    write_json(report, out)
    print("decode:", flush=True)
    report["decode"] = time_decode(model, hf, [int(x) for x in args.batches.split(",")], s, device)
    write_json(report, out)
    report["long_prefill"] = long_prefill(model, args.long_prefill, device)
    write_json(report, out)
    print(f"wrote {out}")
    return 0 if all(c["ok"] for c in report["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
