"""The code-execution sandbox: opt-in only, a fresh interpreter per program, limits that actually bite
(wall clock, CPU, address space, file size), nothing left running, no network where ``unshare`` works.
Timing bounds are generous (CI has 2 busy cores): they only have to separate 'killed at the limit'
from 'ran to its natural end' (100 s sleeps, 10 GiB)."""
import os
import time

import pytest

from rasa_megatron.eval.sandbox import (
    CPU_LIMIT_EXIT_CODE,
    OPT_IN_VARIABLE,
    CodeExecutionRefused,
    SandboxLimits,
    namespace_prefix,
    require_opt_in,
    run_program,
    run_programs,
)

needs_namespaces = pytest.mark.skipif(not namespace_prefix(), reason="unprivileged user namespaces "
                                      "(unshare -rn) are unavailable on this machine")


@pytest.fixture
def opted_in(monkeypatch):
    monkeypatch.setenv(OPT_IN_VARIABLE, "1")


@pytest.mark.parametrize("value", [None, "0", "true", "yes"])
def test_refuses_without_the_opt_in(monkeypatch, tmp_path, value):
    if value is None:
        monkeypatch.delenv(OPT_IN_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(OPT_IN_VARIABLE, value)
    marker = tmp_path / "ran"
    with pytest.raises(CodeExecutionRefused, match=f"{OPT_IN_VARIABLE}=1"):
        run_program(f"open({str(marker)!r}, 'w').write('x')")
    with pytest.raises(CodeExecutionRefused):
        run_programs([f"open({str(marker)!r}, 'w').write('x')"], progress=False)
    with pytest.raises(CodeExecutionRefused):
        require_opt_in()
    assert not marker.exists()


def test_exit_status_and_output(opted_in):
    ok = run_program("print('hello')")
    assert ok.passed and ok.returncode == 0 and ok.stdout == "hello\n"
    failed = run_program("assert 1 == 2, 'wrong answer'")
    assert failed.status == "failed" and "AssertionError: wrong answer" in failed.stderr
    assert run_program("raise SystemExit(3)").returncode == 3
    assert run_program("def f(:\n  pass").status == "failed"


def test_infinite_loop_is_killed_at_the_wall_clock_limit(opted_in):
    started = time.perf_counter()
    result = run_program("import time\nwhile True:\n    time.sleep(0.01)", SandboxLimits(timeout_s=1.5))
    assert result.status == "timeout" and not result.passed
    assert 1.4 < time.perf_counter() - started < 20


def test_busy_loop_hits_the_cpu_limit(opted_in):
    result = run_program("while True:\n    pass", SandboxLimits(timeout_s=60, cpu_s=1))
    assert result.status == "timeout" and result.returncode == CPU_LIMIT_EXIT_CODE and result.duration_s < 30


def test_ten_gib_allocation_fails_inside_the_limit(opted_in):
    result = run_program("x = bytearray(10 * 1024 ** 3)\nprint('allocated')", SandboxLimits(memory_bytes=1 << 30))
    assert result.status == "failed" and "MemoryError" in result.stderr and "allocated" not in result.stdout
    assert result.duration_s < 20


def test_file_size_limit(opted_in):
    result = run_program("open('big', 'wb').write(b'x' * (8 << 20))", SandboxLimits(file_size_bytes=1 << 20))
    assert result.status == "failed" and "File too large" in result.stderr


def test_fresh_cwd_minimal_env_and_closed_stdin(opted_in, monkeypatch):
    monkeypatch.setenv("RASA_TEST_SECRET", "do-not-leak")
    program = ("import os, sys\n"
               "print(sorted(os.listdir('.')))\n"
               "open('left_behind.txt', 'w').write('x')\n"
               "print(os.getcwd())\n"
               "print('RASA_TEST_SECRET' in os.environ, os.environ.get('HF_HUB_OFFLINE'), len(os.environ) < 16)\n"
               "print(repr(sys.stdin.read()))\n"
               "print(sys.flags.isolated)\n")
    first, second = run_program(program), run_program(program)
    assert first.passed and second.passed, (first.stderr, second.stderr)
    for result in (first, second):
        listing, cwd, env_line, stdin, isolated = result.stdout.splitlines()
        assert "left_behind.txt" not in listing and env_line == "False None True"
        assert stdin == "''" and isolated == "1"
        assert not os.path.exists(cwd)  # removed afterwards
    assert first.stdout.splitlines()[1] != second.stdout.splitlines()[1]


def test_processes_left_behind_are_killed(opted_in, tmp_path):
    marker = tmp_path / "child_survived"
    child = f"import time; time.sleep(2); open({str(marker)!r}, 'w')"
    program = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\nprint('parent exits')\n"
    assert run_program(program).passed
    time.sleep(3)
    assert not marker.exists()


@needs_namespaces
def test_a_detached_grandchild_dies_with_the_program(opted_in, tmp_path):
    marker = tmp_path / "escaped"
    program = ("import os, time\n"
               "if os.fork() == 0:\n"
               "    os.setsid()\n"
               "    time.sleep(2)\n"
               f"    open({str(marker)!r}, 'w').write('x')\n"
               "    os._exit(0)\n"
               "print('parent exits')\n")
    result = run_program(program)
    assert result.passed and result.network_isolated
    time.sleep(3)
    assert not marker.exists()


@needs_namespaces
def test_no_network(opted_in):
    program = ("import socket\n"
               "print(sorted(name for _, name in socket.if_nameindex()))\n"
               "try:\n"
               "    socket.create_connection(('1.1.1.1', 53), timeout=3)\n"
               "    print('connected')\n"
               "except OSError as err:\n"
               "    print('refused', err.errno)\n")
    result = run_program(program)
    assert result.passed and result.network_isolated, result.stderr
    interfaces, outcome = result.stdout.splitlines()
    assert interfaces == "['lo']" and outcome.startswith("refused")


def test_run_programs_keeps_order(opted_in):
    sources = [f"import time; time.sleep({0.3 * (i % 2)}); print({i})" for i in range(6)] + ["raise ValueError"]
    results = run_programs(sources, SandboxLimits(timeout_s=20), workers=2, progress=False)
    assert [r.stdout.strip() for r in results[:6]] == [str(i) for i in range(6)]
    assert results[-1].status == "failed"
    with pytest.raises(ValueError, match="workers must be positive, got 0"):
        run_programs(sources, workers=0)


@pytest.mark.parametrize("field,value", [("timeout_s", 0), ("memory_bytes", -1), ("cpu_s", 0),
                                         ("file_size_bytes", 0)])
def test_bad_limits(field, value):
    with pytest.raises(ValueError, match=f"SandboxLimits.{field} must be positive"):
        SandboxLimits(**{field: value})


def test_a_failure_cancels_the_queue(opted_in, monkeypatch):
    from rasa_megatron.eval import sandbox

    started = []

    def failing_run(source, limits):  # 0.2 s per "program"; the second one is interrupted
        started.append(source)
        time.sleep(0.2)
        if len(started) == 2:
            raise KeyboardInterrupt
        return sandbox.ExecutionResult("passed", 0, "", "", 0.2, False)

    monkeypatch.setattr(sandbox, "run_program", failing_run)
    with pytest.raises(KeyboardInterrupt):
        sandbox.run_programs([f"print({i})" for i in range(50)], workers=1, progress=False)
    assert len(started) <= 5  # not all 50: the queue was dropped
