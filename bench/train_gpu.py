"""Training-step speed: tokens/s, MFU and peak memory against the HF anchors (docs/reference.md §9).

    python bench/train_gpu.py                         # gemma2-2b shape, cuda, batch 1 x 2048 and 2 x 4096
    python bench/train_gpu.py --preset tiny-gemma2 --device cpu --shapes 1x64 --steps 2    # smoke test (CI)

One step = forward, chunked fp32 cross-entropy with the final soft-cap (train/losses.py), backward,
fused AdamW, zero_grad -- the same code path as ``gemmaforge train``. Weights are random bf16 with
bf16 AdamW states, as in the anchor run; activation checkpointing is on (``--no-checkpointing`` to
turn it off). MFU uses the anchor's convention, 6 * parameters * tokens/s over the card's dense bf16
peak: 6 * 2,614,341,888 * 12,419 / 989.4e12 = 19.7%.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from gemmaforge import Gemma, preset
from gemmaforge.train.batches import Batch
from gemmaforge.train.objectives import CrossEntropy

ANCHORS = {  # HF transformers 5.17, torch 2.11, one H100, eager attention (docs/reference.md §9)
    "1x2048": {"tok_per_s": 12419, "mfu": 0.197, "peak_gib": 36.7},
    "2x4096": "out of memory (80 GB)",
}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build(config, device, dtype, seed: int = 0) -> Gemma:
    """Random weights created on the device (a 2.6B CPU init would dominate the benchmark)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Gemma(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.zero_() if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return model.to(dtype).train()


def bench_shape(config, batch: int, seq: int, args, device) -> dict:
    dtype = getattr(torch, args.dtype)
    model = build(config, device, dtype)
    model.activation_checkpointing = not args.no_checkpointing
    autocast = device.type == "cuda" and dtype == torch.float32  # fp32 master weights -> bf16 compute
    objective = CrossEntropy(model, chunk=args.loss_chunk, attn_impl=args.attn_impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=g).to(device)
    data = Batch(tokens[:, :-1], tokens[:, 1:])
    n = data.label_count()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = objective(data).loss
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item() / n

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    tok_s = batch * seq * args.steps / elapsed
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # whole-process high-water mark, the closest CPU equivalent
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    flops = peak_tflops(device, args.peak_tflops)
    return {"shape": f"{batch}x{seq}", "tok_per_s": round(tok_s, 1),
            "mfu": round(6 * config.num_params * tok_s / (flops * 1e12), 4) if flops else None,
            "peak_gib": round(peak, 2), "step_s": round(elapsed / args.steps, 4), "loss": round(loss, 4)}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gemma2-2b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="1x2048,2x4096", help="comma-separated BATCHxSEQ")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="parameter dtype")
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--attn-impl", default=None, help="eager, chunked, sdpa, flex (default: auto)")
    p.add_argument("--no-checkpointing", action="store_true", help="activation checkpointing off")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: from the GPU name)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    config = preset(args.preset)
    header = {"preset": args.preset, "params": config.num_params, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "dtype": args.dtype, "activation_checkpointing": not args.no_checkpointing}
    print(json.dumps(header))
    results = []
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.lower().split("x"))
        try:
            r = bench_shape(config, batch, seq, args, device)
        except torch.cuda.OutOfMemoryError:
            r = {"shape": shape, "error": "out of memory"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        r["hf_anchor"] = ANCHORS.get(shape) if args.preset == "gemma2-2b" else None
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
