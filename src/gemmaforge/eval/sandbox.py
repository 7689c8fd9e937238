"""Running model-written code (MBPP's pass@1) in a sandboxed subprocess.

    verdict = run_program("def f(): return 1\\nassert f() == 1")   # Verdict(passed=True, result="passed")
    verdicts = run_programs(programs, Limits(timeout_s=3.0))       # in parallel, in order

The pass rule is that of HF evaluate's ``code_eval`` (what lm-eval's MBPP calls): the program (the
generation, a newline, the problem's assertions) is ``exec``-ed in a fresh namespace with stdin,
stdout and stderr swallowed, after the same destructive functions are disabled (``os.system``,
``os.kill``, ``os.remove``, ``subprocess.Popen``, ``shutil.rmtree``, ``exit``, ...), under a
``timeout_s`` alarm; it passes iff ``exec`` returns without raising (``SystemExit`` is a failure).

Isolation, each program in its own process:
- its own temporary directory (cwd, HOME and TMPDIR), removed afterwards; a minimal environment;
  ``python -I`` (no user site-packages, no PYTHON* variables);
- resource limits (``resource.setrlimit``, set by the sandboxed interpreter before it reads the
  program): address space ``memory_bytes`` (1 GiB by
  default: an allocation beyond it raises MemoryError), CPU time ``timeout_s + 2`` s (SIGXCPU), files
  written ``file_bytes`` (16 MiB), no core dumps;
- its own session (process group); past ``wall_s`` (``timeout_s + 5`` s: the alarm can be cleared
  by the program) the whole group is SIGKILLed;
- on Linux, where unprivileged user namespaces are allowed (``unshare --user`` works), also a new
  network namespace (only a down loopback device: no network at all) and a new PID namespace, so
  that killing its init (the program's interpreter) kills every process it started, even one that
  left the process group. Elsewhere (macOS, namespaces disabled) there is no network isolation:
  ``isolation()`` says which applies, and ``gemmaforge eval`` prints it before running MBPP.
This is defence in depth for benchmark code, not a security boundary against a determined
attacker (the program runs as your user, with your filesystem permissions outside its directory).
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 3.0  # code_eval's default: the program's exec time
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE
    wall_s: float | None = None  # hard limit on the whole process (default timeout_s + 5)

    @property
    def wall(self) -> float:
        return self.wall_s if self.wall_s is not None else self.timeout_s + 5.0


@dataclass(frozen=True)
class Verdict:
    passed: bool
    result: str  # "passed", "timed out", "failed: <Exception>: <message>", "killed: ..." (code_eval's words)


# Runs inside the sandboxed interpreter: argv = [nonce, timeout, memory, file bytes]; program.py in the
# cwd. The limits are set first thing (not in a preexec_fn: the caller runs programs from threads).
_RUNNER = r'''
import builtins, contextlib, faulthandler, io, os, resource, signal, sys
nonce, timeout, memory, file_bytes = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for what, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, int(timeout) + 2),
                    (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0)):
    try:
        resource.setrlimit(what, (value, value))
    except (ValueError, OSError):  # e.g. RLIMIT_AS on macOS
        pass
source = open("program.py", encoding="utf-8").read()
report, exit_now = os.fdopen(os.dup(1), "w"), os._exit

class TimeoutException(Exception):
    pass

class Swallow(io.StringIO):
    def write(self, s): return len(s)
    def read(self, *a, **k): raise OSError
    def readline(self, *a, **k): raise OSError
    def readlines(self, *a, **k): raise OSError
    def readable(self, *a, **k): return False

def on_alarm(signum, frame):
    raise TimeoutException("Timed out!")

def guard():
    faulthandler.disable()
    builtins.exit = builtins.quit = builtins.help = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
                 "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                 "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    import shutil, subprocess
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None

stream = Swallow()
try:
    code = compile(source, "program.py", "exec")
    guard()
    with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        sys.stdin = stream
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            exec(code, {})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    verdict = "passed"
except TimeoutException:
    verdict = "timed out"
except BaseException as e:
    verdict = f"failed: {type(e).__name__}: {e}"[:300].replace("\n", " ")
report.write(f"{nonce} {verdict}\n")
report.flush()
exit_now(0)
'''

_UNSHARE = ("--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child")


@functools.lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """``unshare`` with a network and PID namespace, if this machine allows it; else ()."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return ()
    try:
        probe = subprocess.run([exe, *_UNSHARE, sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ()
    return (exe, *_UNSHARE) if probe.returncode == 0 else ()


def isolation() -> str:
    """One line saying what the sandbox isolates on this machine."""
    base = "own temp dir, rlimits (memory, CPU, file size), process group killed on timeout"
    if _unshare_prefix():
        return base + ", no network (network namespace), PID namespace"
    return base + "; NO network isolation (unshare with user namespaces is not available here)"


def run_program(program: str, limits: Limits = Limits()) -> Verdict:
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="gemmaforge-sandbox-") as tmp:
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "PYTHONHASHSEED": "0"}
        cmd = [*_unshare_prefix(), sys.executable, "-I", "-c", _RUNNER, nonce, str(limits.timeout_s),
               str(limits.memory_bytes), str(limits.file_bytes)]
        # The report goes to a file (bounded by RLIMIT_FSIZE), not a pipe the program could flood.
        with open(os.path.join(tmp, "report"), "wb") as report:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=report,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=limits.wall)
        except subprocess.TimeoutExpired:
            return Verdict(False, "timed out")
        finally:
            _kill_group(proc)  # on timeout the program; otherwise anything it left behind in its group
            proc.wait()
        with open(os.path.join(tmp, "report"), "rb") as f:
            out = f.read(1 << 20).decode("utf-8", "replace")
    for line in out.splitlines():
        if line.startswith(nonce + " "):
            verdict = line[len(nonce) + 1:]
            return Verdict(verdict == "passed", verdict)
    # No verdict: the interpreter died (SIGXCPU at the CPU-time limit, os._exit, a crash).
    return Verdict(False, f"killed: no verdict (exit status {proc.returncode}; CPU-time limit "
                          f"{int(limits.timeout_s) + 2} s)")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_programs(programs: Sequence[str], limits: Limits = Limits(), workers: int | None = None,
                 progress: bool = False) -> list[Verdict]:
    """Every program in its own sandbox, ``workers`` at a time (default: the CPU count, at most 8)."""
    from tqdm import tqdm

    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(lambda p: run_program(p, limits), programs), total=len(programs),
                         desc="mbpp: running code", disable=not progress, leave=False))
