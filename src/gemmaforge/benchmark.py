"""Inference benchmark: gemmaforge against HF transformers and llama.cpp on the same weights.

What is measured, per variant (a backend plus a weight precision):

    prefill tok/s    batch 1, ``prompt_len`` tokens, logits of the last position only (HF: ``logits_to_keep=1``)
    TTFT ms          prompt in -> first greedy token out (prefill + head + argmax)
    decode tok/s     greedy, after the first token, at batch 1 and at batch ``batch`` (all rows counted)
    load s           reading the weights into the form the variant runs (gemmaforge:gguf: the GGUF as stored)
    peak RSS MB      the variant's whole process: load, convert, run (each variant runs in its own
                     process so the numbers do not mix; ``isolate=False`` gives up this column)
    perplexity       teacher-forced on a fixed text (pydoc_data "for" statement topic): what the
                     weight precision costs, next to what it buys
    end to end       (``end_to_end``) wall time of ``gemmaforge generate`` against llama.cpp making
                     ``e2e_tokens`` tokens from a fresh process, on the source GGUF

"The same weights": every backend reads what ``gemmaforge.load(model)`` produced (for the embedded
model, the Q4_K_M GGUF dequantized to float32): HF from a safetensors directory, llama.cpp from GGUF
files written from it at f32 / q8_0, plus the source GGUF itself when there is one. Prompts are
random token ids (fixed seed) after <bos>, fed as ids, so no tokenizer differences enter.

Timing: the best of ``repeats`` runs after one warm-up (the minimum is the least disturbed by other
processes; two CPU cores shared with other work make means meaningless). The eager reference path
(``gemmaforge-eager``) is the model's plain forward with a cache, as the tests use it.

The report's markdown table is benchmark_report.py's ``format_table``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .benchmark_report import best_of_rounds
from .errors import GemmaforgeError

BACKENDS = ("gemmaforge", "gemmaforge-eager", "hf", "llama.cpp")
PRECISIONS = {
    # int8-bf16 / int4-f32: the other activation precision than each mode's default (quant.py)
    # gguf: the source GGUF file's own quantization, as stored (the default path, docs/quantization.md)
    "gemmaforge": ("gguf", "fp32", "bf16", "int8", "int8-h4", "int4", "int8-bf16", "int4-f32"),
    "gemmaforge-eager": ("fp32", "bf16"),
    "hf": ("fp32", "bf16"),
    "llama.cpp": ("f32", "f16", "q8_0", "source"),
}
DEFAULT_VARIANTS = ("gemmaforge:gguf", "gemmaforge:fp32", "gemmaforge:int8", "gemmaforge:int8-h4", "gemmaforge:int4",
                    "gemmaforge-eager:fp32",
                    "hf:fp32", "llama.cpp:f32", "llama.cpp:q8_0", "llama.cpp:source")
_MARK = "GEMMAFORGE-BENCH-RESULT "  # a child prints its result after this marker


@dataclass(frozen=True)
class BenchSettings:
    prompt_len: int = 128
    new_tokens: int = 32
    batch: int = 4
    threads: int = 2
    repeats: int = 3
    seed: int = 0
    ppl_chars: int = 1500  # characters of the fixed text scored for perplexity (0 = skip)
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    e2e_tokens: int = 64  # end-to-end `gemmaforge generate` vs llama.cpp on the source GGUF (0 = skip)
    isolate: bool = True  # one process per variant (peak memory per variant; thread settings stick)
    # The variant list run this many times, round-robin: on a shared host the machine's speed drifts by
    # 10-20% over minutes, so a variant measured right after another is the fair comparison. The best
    # of the rounds is reported, and every round's speeds are kept (``per_round``).
    rounds: int = 1

    def __post_init__(self):
        object.__setattr__(self, "variants", tuple(self.variants))
        for name in ("prompt_len", "new_tokens", "batch", "threads", "repeats", "rounds"):
            if getattr(self, name) < 1:
                raise GemmaforgeError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise GemmaforgeError("new-tokens must be >= 2: decode speed is timed after the first token")
        for v in self.variants:
            parse_variant(v)


def parse_variant(spec: str) -> tuple[str, str]:
    backend, _, precision = spec.partition(":")
    if backend not in PRECISIONS or precision not in PRECISIONS[backend]:
        choices = ", ".join(f"{b}:{p}" for b in PRECISIONS for p in PRECISIONS[b])
        raise GemmaforgeError(f"unknown benchmark variant {spec!r}: choose from {choices}")
    return backend, precision


def fixed_text(chars: int) -> str:
    """The perplexity text: the start of Python's own documentation of the "for" statement."""
    from pydoc_data.topics import topics

    return topics["for"][:chars]


def random_prompts(vocab_size: int, batch: int, length: int, seed: int) -> list[list[int]]:
    """<bos> + random ids, avoiding the low (special/control) ids of the Gemma vocabularies."""
    rng = random.Random(seed)
    lo = min(1000, vocab_size // 4)
    return [[2] + [rng.randrange(lo, vocab_size) for _ in range(length - 1)] for _ in range(batch)]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, repeats: int, device="cpu") -> float:
    """Seconds: one warm-up call, then the minimum of ``repeats`` timed calls."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def decode_timing(generate, s: BenchSettings, batch: int, device="cpu") -> tuple[float, float]:
    """(TTFT seconds, decode tok/s) from ``generate(mark)``, which makes ``new_tokens`` tokens per row and
    calls ``mark()`` once the first one exists. Both numbers come from the same runs: best of ``repeats``."""
    ttfts, decodes = [], []
    for i in range(s.repeats + 1):  # run 0 is the warm-up
        marks = []
        _sync(device)
        t0 = time.perf_counter()
        generate(lambda: (_sync(device), marks.append(time.perf_counter())))
        _sync(device)
        t1 = time.perf_counter()
        if i:
            ttfts.append(marks[0] - t0)
            decodes.append(t1 - marks[0])
    return min(ttfts), batch * (s.new_tokens - 1) / min(decodes)


def perplexity_from_logprobs(logprobs: torch.Tensor) -> float:
    return float(torch.exp(-logprobs.double().mean()))


# ---- gemmaforge ---------------------------------------------------------------------------------------
def gemmaforge_perplexity(model, ids: list[int], chunk: int = 128) -> float:
    """Teacher-forced: log p(ids[i+1] | ids[:i+1]), the head applied ``chunk`` positions at a time."""
    from .eval.perplexity import sequence_perplexity

    with torch.inference_mode():
        return sequence_perplexity(model, ids, chunk=chunk)


def bench_gemmaforge(model, s: BenchSettings, ppl_ids: list[int] | None, *, fast: bool = True) -> dict:
    """Times the real generation path: ``Engine`` (fast path unless ``fast=False``), greedy."""
    from .generation.engine import Engine
    from .generation.fast import FastForward
    from .generation.sampling import SamplingParams

    device = model.final_norm.weight.device
    engine = Engine(model, fast=fast)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=s.new_tokens)
    one = random_prompts(model.config.vocab_size, 1, s.prompt_len, s.seed)
    many = random_prompts(model.config.vocab_size, s.batch, s.prompt_len, s.seed + 1)

    forward = FastForward(model) if fast else None

    def prefill():
        tokens = torch.tensor(one, device=device)
        positions = torch.arange(s.prompt_len, device=device)[None]
        cache = model.new_cache(1, s.prompt_len + 1)
        if forward is not None:
            return forward(tokens, positions, cache)
        with torch.inference_mode():
            return model.logits(model.hidden_states(tokens, positions, cache)[:, -1])

    def generate(prompts):
        def go(mark):
            for i, _ in enumerate(engine.steps(prompts, greedy, max_new_tokens=s.new_tokens)):
                if i == 0:
                    mark()
        return go

    ppl = (lambda: gemmaforge_perplexity(model, ppl_ids)) if ppl_ids is not None else None
    return measure(prefill, generate(one), generate(many), ppl, s, device)


def measure(prefill, generate_one, generate_many, perplexity, s: BenchSettings, device) -> dict:
    """The same measurements for every backend: prefill tok/s, TTFT, decode at batch 1 and s.batch,
    and (if ``perplexity`` is given) the perplexity on the fixed text."""
    result = {"prefill_tok_s": s.prompt_len / best_time(prefill, s.repeats, device)}
    ttft, result["decode_tok_s_b1"] = decode_timing(generate_one, s, 1, device)
    result["ttft_ms"] = ttft * 1e3
    _, result[f"decode_tok_s_b{s.batch}"] = decode_timing(generate_many, s, s.batch, device)
    if perplexity is not None:
        result["perplexity"] = perplexity()
    return result


def load_gemmaforge(source, precision: str, device="cpu"):
    from . import load
    from .quant import quantize

    if precision == "gguf":
        return load(source, device=device, quant="gguf")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision, torch.float32)
    model = load(source, dtype=dtype, device=device)
    if precision == "int8-h4":
        quantize(model, "int8", head="int4")
    elif precision in ("int8", "int4"):
        quantize(model, precision)
    elif precision in ("int8-bf16", "int4-f32"):
        mode, acts = {"int8-bf16": ("int8", "bfloat16"), "int4-f32": ("int4", "float32")}[precision]
        quantize(model, mode, activations=acts)
    return model


# ---- HF transformers ----------------------------------------------------------------------------------
def hf_perplexity(model, ids: list[int]) -> float:
    tokens = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        logits = model(tokens[:, :-1]).logits.float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return perplexity_from_logprobs(logp)


def bench_hf(model, s: BenchSettings, ppl_ids: list[int] | None) -> dict:
    """HF ``generate`` (greedy, exactly ``new_tokens``, EOS ignored) and a ``logits_to_keep=1`` prefill."""
    vocab = model.config.vocab_size
    dev = model.device
    one = torch.tensor(random_prompts(vocab, 1, s.prompt_len, s.seed), device=dev)
    many = torch.tensor(random_prompts(vocab, s.batch, s.prompt_len, s.seed + 1), device=dev)

    def prefill():
        with torch.inference_mode():
            return model(one, use_cache=True, logits_to_keep=1).logits

    class Marker:  # HF's streamer protocol: put(prompt), then put(token) per step, then end()
        def __init__(self, mark):
            self.calls, self.mark = 0, mark

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.mark()

        def end(self):
            pass

    def generate(ids):
        def go(mark):
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.new_tokens,
                               min_new_tokens=s.new_tokens, do_sample=False, pad_token_id=0,
                               streamer=Marker(mark))
        return go

    ppl = (lambda: hf_perplexity(model, ppl_ids)) if ppl_ids is not None else None
    return measure(prefill, generate(one), generate(many), ppl, s, dev)


def load_hf(directory, precision: str, device="cpu"):
    import transformers

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # sdpa is HF's default for Gemma 3; Gemma 2's soft-cap needs eager (HF warns otherwise).
    with open(Path(directory) / "config.json") as f:
        attn = "eager" if json.load(f).get("model_type") == "gemma2" else "sdpa"
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


# ---- llama.cpp (llama-cpp-python) ---------------------------------------------------------------------
def llamacpp_available() -> str | None:
    """None if llama-cpp-python imports, else why not (the variant is then reported as skipped)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # ImportError, or a shared library that fails to load
        return f"llama-cpp-python not importable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); " \
               "pip install llama-cpp-python (compiles llama.cpp) to include it"
    return None


def _llama_logits(llm, row: int = -1):
    import llama_cpp
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, row)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def bench_llamacpp(path, s: BenchSettings, ppl_ids: list[int] | None) -> dict:
    """Single-sequence API: batch-N decode is not measured (reported as None)."""
    import llama_cpp

    n_ctx = max(s.prompt_len + s.new_tokens, len(ppl_ids or [])) + 8
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=max(512, s.prompt_len), n_threads=s.threads,
                          n_threads_batch=s.threads, logits_all=False, verbose=False)
    load_s = time.perf_counter() - t
    one = random_prompts(llm.n_vocab(), 1, s.prompt_len, s.seed)[0]

    def prefill():
        llm.reset()
        llm.eval(one)

    def generate(mark):
        prefill()
        tok = int(_llama_logits(llm).argmax())
        mark()
        for _ in range(s.new_tokens - 1):
            llm.eval([tok])
            tok = int(_llama_logits(llm).argmax())

    result = {"load_s": load_s, "prefill_tok_s": s.prompt_len / best_time(prefill, s.repeats)}
    ttft, result["decode_tok_s_b1"] = decode_timing(generate, s, 1)
    result["ttft_ms"] = ttft * 1e3
    result[f"decode_tok_s_b{s.batch}"] = None
    if ppl_ids is not None:
        result["perplexity"] = llamacpp_perplexity(path, ppl_ids, s.threads)
    return result


def llamacpp_perplexity(path, ids: list[int], threads: int) -> float:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + 8, n_batch=len(ids), n_ubatch=len(ids),
                          n_threads=threads, logits_all=True, verbose=False)
    llm.eval(ids[:-1])
    logits = torch.from_numpy(np.array(llm.scores[: len(ids) - 1], dtype=np.float32))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return perplexity_from_logprobs(logp)


# ---- one variant, and the orchestration ---------------------------------------------------------------
@dataclass
class Artifacts:
    """Files every backend loads the same weights from (written once by ``prepare_artifacts``)."""

    hf_dir: str
    gguf: dict[str, str] = field(default_factory=dict)  # llama.cpp precision -> file
    source_label: str | None = None  # e.g. "Q4_K_M" for the embedded GGUF
    source_gguf: str | None = None  # the source file, when the model came from a GGUF
    unavailable: dict[str, str] = field(default_factory=dict)  # llama.cpp precision -> why no file
    tokenizer: str | None = None  # the source's own file or directory, for the perplexity text


def prepare_artifacts(source, workdir: Path, variants: tuple[str, ...]) -> Artifacts:
    """HF directory (float32) and GGUF files of ``source``'s weights, reused on later runs."""
    from . import load
    from .checkpoint.gguf import read_gguf_metadata, write_gguf

    workdir.mkdir(parents=True, exist_ok=True)
    hf_dir = workdir / "hf"
    model = None
    if not (hf_dir / "config.json").exists():
        model = load(source, dtype=torch.float32)
        from .checkpoint.hf import save_pretrained

        save_pretrained(model, hf_dir)
    art = Artifacts(str(hf_dir))
    src = Path(str(source)) if source is not None else None
    if source is None:
        from .default_model import default_model_path

        src = default_model_path()
    is_gguf = src is not None and src.is_file() and src.suffix == ".gguf"
    art.tokenizer = str(src) if src is not None and src.exists() else None
    if is_gguf:
        art.source_gguf = str(src)
        ftype = read_gguf_metadata(src).get("general.file_type")
        art.source_label = _FILE_TYPES.get(ftype, f"file_type {ftype}")
    for v in variants:
        backend, precision = parse_variant(v)
        if backend != "llama.cpp":
            continue
        if precision == "source":
            if not is_gguf:
                continue
            art.gguf["source"] = str(src)
            continue
        path = workdir / f"model-{precision}.gguf"
        if not path.exists():
            model = model or load(str(hf_dir), dtype=torch.float32)
            extra = {k: v for k, v in read_gguf_metadata(src).items() if k.startswith("tokenizer.")} if is_gguf else {}
            try:
                write_gguf(path, model.config, dict(model.state_dict()), extra, dtype=precision)
            except GemmaforgeError as e:  # e.g. a test preset that GGUF cannot describe
                art.unavailable[precision] = f"no GGUF: {e}"
                continue
        art.gguf[precision] = str(path)
    return art


_LABELS = {"int8": "int8 per-channel (head too)", "int8-h4": "int8 layers, int4 g32 head",
           "int4": "int4 g32 (head too)", "int8-bf16": "int8, bf16 activations",
           "int4-f32": "int4 g32, float32 activations"}
_FILE_TYPES = {0: "F32", 1: "F16", 7: "Q8_0", 15: "Q4_K_M", 17: "Q5_K_M", 18: "Q6_K", 2: "Q4_0", 14: "Q4_K_S"}


def _ppl_ids(art: Artifacts, s: BenchSettings) -> list[int] | None:
    if not s.ppl_chars:
        return None
    from .tokenizer import load_tokenizer

    src = art.tokenizer or art.gguf.get("source") or art.hf_dir
    try:
        tok = load_tokenizer(src)
    except GemmaforgeError:
        return None
    return tok.encode(fixed_text(s.ppl_chars), add_bos=True)


def _weights_mb(backend: str, precision: str, model=None, path=None) -> float | None:
    if model is not None:
        from .quant import weight_bytes

        if backend == "hf":
            return sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
        return weight_bytes(model) / 1e6
    return os.path.getsize(path) / 1e6 if path else None


def run_variant(spec: str, art: Artifacts, s: BenchSettings, device="cpu") -> dict:
    """Measure one variant in this process."""
    torch.set_num_threads(s.threads)
    backend, precision = parse_variant(spec)
    out: dict = {"variant": spec}
    ppl_ids = _ppl_ids(art, s)
    if backend == "llama.cpp":
        why = llamacpp_available()
        path = art.gguf.get(precision)
        if why is None and path is None:
            why = art.unavailable.get(precision, "no source GGUF (the model was not loaded from a .gguf file)")
        if why:
            return out | {"skipped": why}
        out["weights"] = art.source_label if precision == "source" else precision.upper()
        out["weights_mb"] = _weights_mb(backend, precision, path=path)
        out.update(bench_llamacpp(path, s, ppl_ids))
    elif backend == "hf":
        model = load_hf(art.hf_dir, precision, device)
        out["weights"], out["weights_mb"] = precision, _weights_mb(backend, precision, model)
        out.update(bench_hf(model, s, ppl_ids))
    else:
        if precision == "gguf" and art.source_gguf is None:
            return out | {"skipped": "no source GGUF (the model was not loaded from a .gguf file)"}
        t = time.perf_counter()
        model = load_gemmaforge(art.source_gguf if precision == "gguf" else art.hf_dir, precision, device)
        out["load_s"] = time.perf_counter() - t
        out["weights"] = f"{art.source_label} as stored" if precision == "gguf" else _LABELS.get(precision, precision)
        out["weights_mb"] = _weights_mb(backend, precision, model)
        out.update(bench_gemmaforge(model, s, ppl_ids, fast=backend == "gemmaforge"))
    if s.isolate:
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _run_isolated(spec: str, art: Artifacts, s: BenchSettings) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(s.threads), MKL_NUM_THREADS=str(s.threads))
    payload = json.dumps({"spec": spec, "art": asdict(art), "settings": asdict(s)})
    proc = subprocess.run([sys.executable, "-m", "gemmaforge.benchmark", payload], env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"variant": spec, "skipped": f"failed (exit {proc.returncode}): {tail[:200]}"}


def run_benchmark(source, s: BenchSettings, workdir: Path | None = None, progress: bool = True) -> dict:
    """All variants of ``s`` on ``source`` -> {"settings", "environment", "results": [...]}."""
    from tqdm import tqdm

    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gemmaforge-bench-")))
        art = prepare_artifacts(source, Path(workdir), s.variants)
        runs: dict[str, list[dict]] = {spec: [] for spec in s.variants}
        with tqdm(total=s.rounds * len(s.variants), desc="benchmark", unit="variant", disable=not progress) as bar:
            for _ in range(s.rounds):
                for spec in s.variants:
                    runs[spec].append(_run_isolated(spec, art, s) if s.isolate else run_variant(spec, art, s))
                    bar.update()
        results = [best_of_rounds(r) for r in runs.values()]
        e2e = end_to_end(art.source_gguf, s) if s.e2e_tokens and art.source_gguf else None
    return {"model": str(source) if source is not None else "embedded gemma3-270m Q4_K_M",
            "settings": asdict(s), "environment": environment(s.threads), "results": results, "end_to_end": e2e}


E2E_PROMPT = "Here is a long story about a dragon who learned to cook. Once upon a time"
_LLAMA_E2E = """import sys
from llama_cpp import Llama
path, threads, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
out = llm.create_completion(sys.argv[4], max_tokens=n, temperature=0.0)
print(out["choices"][0]["text"], end="")
"""


def end_to_end(gguf: str, s: BenchSettings) -> dict:
    """Wall time of what a user types, each in a fresh process (interpreter start, imports, load,
    prefill, ``e2e_tokens`` greedy tokens, print): ``gemmaforge generate`` with its defaults, and
    llama-cpp-python's ``create_completion`` on the same file and thread count. The first run and
    the best of ``repeats``; the completions are returned so that equal work can be checked (their
    lengths; the texts may part, llama.cpp rounding activations to 8 bits)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(s.threads), MKL_NUM_THREADS=str(s.threads))
    commands = {"gemmaforge generate": [sys.executable, "-m", "gemmaforge", "generate", "--model", gguf,
                                        "--max-new-tokens", str(s.e2e_tokens), E2E_PROMPT]}
    if llamacpp_available() is None:
        commands["llama.cpp"] = [sys.executable, "-c", _LLAMA_E2E, gguf, str(s.threads), str(s.e2e_tokens), E2E_PROMPT]
    out = {"tokens": s.e2e_tokens, "prompt": E2E_PROMPT}
    for name, cmd in commands.items():
        times, text = [], None
        for _ in range(max(2, s.repeats)):
            t = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            times.append(time.perf_counter() - t)
            if proc.returncode:  # a crashing peer is reported, not fatal
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                out[name] = {"failed": f"exit {proc.returncode}: {tail[:200]}"}
                break
            text = proc.stdout
        else:
            out[name] = {"first_s": times[0], "best_s": min(times), "completion": text}
    return out


def environment(threads: int) -> dict:
    import platform

    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": threads,
           "cpu": _cpu_name(), "cores": os.cpu_count()}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("transformers", "llama-cpp-python", "gguf"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def write_json(report: dict, path) -> None:
    """Atomically: a reader never sees half a file."""
    from .atomic import write_json as atomic_write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report)


def _child(payload: str) -> None:
    d = json.loads(payload)
    s = BenchSettings(**d["settings"])
    print(_MARK + json.dumps(run_variant(d["spec"], Artifacts(**d["art"]), s)), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1])
