"""The native CPU kernels, built once per machine: the block-quantized GEMV (block_gemv.c), its AMX
form for several rows (amx_gemm.c, on CPUs with AMX tiles) and the decode step over every layer that
calls them (decode_step.c, generation/native.py).

Why a C kernel: inductor's code for this reduction is fast only with every size static (one
compilation per weight shape and batch size), and eager torch ops write the float weight out.
The C file is compiled on first use with the system C compiler (``cc``/``gcc``/``clang``, the
one inductor needs anyway) and ``-march=native``, in under a second; the library is cached under
``~/.cache/gemmaforge/kernels`` (``GEMMAFORGE_CACHE``), keyed by the source, the compiler and the
CPU's flags, written atomically. No compiler: ``library()`` is None and callers take their torch
path (gguf_quant.py); so do they, with a warning, if the build fails.

``block_gemv`` is also a ``torch.library`` custom op (``torch.ops.gemmaforge.block_gemv``), so a
compiled decode step calls the kernel as one opaque node instead of breaking the graph.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(f) for f in ("block_gemv.c", "amx_gemm.c", "decode_step.c"))  # one library
HEADERS = (Path(__file__).with_name("simd.h"),)  # in the cache key, not on the command line
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build(cc: str, out: Path, sources: tuple[Path, ...] = SOURCES) -> None:
    """Compile ``sources`` (this package's by default; bench/kernel_ab.py passes another revision's)
    into the library ``out``, atomically. Raises RuntimeError with the compiler's complaint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, *map(str, sources), "-o", tmp, "-lm"], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"building {', '.join(s.name for s in sources)} with {cc} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent process sees the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it if needed; None without a C compiler."""
    cc = _compiler()
    if cc is None:
        return None
    from .default_model import cache_dir

    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([*(s.read_text() for s in SOURCES + HEADERS), cc, version, " ".join(FLAGS), _cpu_flags()]).encode())
    path = cache_dir() / "kernels" / f"cpu-{key.hexdigest()[:16]}.so"
    if not path.exists():
        try:
            build(cc, path)
        except RuntimeError as e:  # the compiler's own complaint, e.g. a GCC older than 12
            warnings.warn(f"{e}\ngemmaforge: decoding GGUF weights as stored takes the slower sgemm path")
            return None
    lib = declare(ctypes.CDLL(str(path)))
    global _amx
    _amx = lib.gf_amx_init(os.environ.get("GEMMAFORGE_AMX", "1") != "0") == 1
    return lib


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with the C functions' argument and result types set (the one copy of the C API)."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gf_block_gemv.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, ctypes.c_int, ptr, ctypes.c_int]
    lib.gf_block_gemv.restype = ctypes.c_int
    lib.gf_dequantize.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, ctypes.c_int]
    lib.gf_dequantize.restype = ctypes.c_int
    lib.gf_decode_layers.argtypes = [ptr, ptr, i64, ptr, ptr, ctypes.c_int]
    lib.gf_decode_layers.restype = ctypes.c_int
    lib.gf_gelu_mul.argtypes = [ptr, ptr, ptr, i64]
    lib.gf_gelu_mul.restype = None
    lib.gf_argmax.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]
    lib.gf_argmax.restype = None
    lib.gf_amx_takes.argtypes = [i64, i64, i64]
    lib.gf_amx_takes.restype = ctypes.c_int
    lib.gf_amx_init.argtypes = [ctypes.c_int]
    lib.gf_amx_init.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernel can run here. Read when a BlockQuantLinear is built, never inside a
    compiled step (dynamo would trace the build)."""
    return library() is not None


_amx = False  # gf_amx_enabled's value, readable inside a compiled graph without a call into C


def use_amx(on: bool = True) -> bool:
    """Turn the AMX kernel (amx_gemm.c) on or off for this process; returns whether it is on. On by
    default where the CPU and the compiler have AMX (``GEMMAFORGE_AMX=0`` turns it off at start)."""
    global _amx
    lib = library()
    _amx = lib is not None and lib.gf_amx_init(int(on)) == 1
    return _amx


def amx_on() -> bool:
    """Whether gf_block_gemv takes the AMX kernel for 6 rows or more (block_gemv.c's AMX_MIN_ROWS)
    of a weight that ``amx_takes``, so that prefill goes to it too instead of the dequantize-and-
    sgemm path."""
    return _amx


def amx_takes(n: int, k: int, group: int) -> bool:
    """Whether the AMX kernel takes an [n, k] weight in groups of ``group`` (amx_gemm.c's rule),
    when it is on; false without the library."""
    lib = library()
    return lib is not None and lib.gf_amx_takes(n, k, group) == 1


_HUGE = 2 << 20  # a transparent huge page on x86-64 and most Linux arm64 kernels
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def empty_on_huge_pages(shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU whose whole 2 MB pages are marked for
    transparent huge pages (``madvise(MADV_HUGEPAGE)``) before anything is written, where Linux
    allows it (THP "madvise" or "always"); a plain tensor elsewhere. For weights the decode GEMV
    streams once per token: on 4 KB pages every page it reads is a TLB miss, and the embedded
    model's Q8_0 head took 4.75 ms instead of 4.39 ms (AMD EPYC, 2 threads, interleaved calls;
    docs/quantization.md, "Huge pages")."""
    t = torch.empty(shape, dtype=dtype)
    madvise = _madvise()
    start = -(-t.data_ptr() // _HUGE) * _HUGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE * _HUGE
    if madvise is not None and end > start:
        madvise(start, end - start, _MADV_HUGEPAGE)  # a refusal (EINVAL: THP off) leaves 4 KB pages
    return t


def run_block_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                   offset: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] float32, codes [N, K] int8, scale/offset [N, G] both float32 or both float16
    (contiguous, CPU) -> [M, N]."""
    m, k = x.shape
    n, g = scale.shape
    x = x.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    rc = library().gf_block_gemv(x.data_ptr(), m, k, codes.data_ptr(), scale.data_ptr(),
                                 None if offset is None else offset.data_ptr(), n, k // g, half_flag(scale, offset),
                                 y.data_ptr(), torch.get_num_threads())
    if rc:
        raise MemoryError("block_gemv: out of memory for the offset sums")
    return y


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of a float32 [R, V] CPU tensor, the same indices (first maximum, NaN
    first), in decode_step.c's vector loop; torch's own where the kernel cannot take ``x``."""
    takes = x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0
    lib = library() if takes and not torch.compiler.is_compiling() else None
    if lib is None:
        return x.argmax(dim=-1)
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.gf_argmax(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def dequantize_into(out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                    offset: torch.Tensor | None) -> torch.Tensor:
    """codes [R, K] int8, scale/offset [R, G] float32 or float16 (contiguous) -> ``out`` [R, K] float32
    (contiguous): the values of gguf_quant.dequantize_codes, bit for bit, in one pass."""
    r, k = codes.shape
    library().gf_dequantize(codes.data_ptr(), scale.data_ptr(), None if offset is None else offset.data_ptr(),
                            r, k, k // scale.shape[1], half_flag(scale, offset), out.data_ptr(), torch.get_num_threads())
    return out


def half_flag(scale: torch.Tensor, offset: torch.Tensor | None) -> int:
    """The kernels' ``half`` flag: 1 for float16 block scales (and offsets), 0 for float32."""
    if offset is not None and offset.dtype != scale.dtype:
        raise ValueError(f"block scales are {scale.dtype} but offsets {offset.dtype}: the kernels take one type")
    if scale.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"block scales must be float16 or float32, got {scale.dtype}")
    return int(scale.dtype == torch.float16)


# The op, declared with the plain torch.library API: torch.library.custom_op's wrapper costs ~25 us a
# call against ~10 us for this, and a compiled decode step makes 73 calls per token.
_LIB = torch.library.Library("gemmaforge", "DEF")
_LIB.define("block_gemv(Tensor x, Tensor codes, Tensor scale, Tensor? offset) -> Tensor")
_LIB.impl("block_gemv", run_block_gemv, "CPU")


@torch.library.register_fake("gemmaforge::block_gemv", lib=_LIB)
def _(x, codes, scale, offset):
    return x.new_empty(x.shape[0], codes.shape[0])
