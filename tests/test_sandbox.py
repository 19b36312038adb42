"""The sandbox against the attacks it exists for: each one contained and reported with its cause."""

import dataclasses
import os
import socket
import time
import uuid

import psutil
import pytest

from alignflow.config import ConfigError
from alignflow.sandbox import CAUSES, SandboxLimits, probe, run_python
from alignflow.sandbox.runner import CHILD

FAST = SandboxLimits(
    wall_s=10, cpu_s=2, memory_mb=256, processes=16, open_files=32, output_bytes=100_000, file_bytes=1 << 20
)


def test_plain_program_runs_with_its_files_and_stdin():
    res = run_python(
        "import helper, sys\nprint(helper.x + int(sys.stdin.read()))", FAST, files={"helper.py": "x = 40\n"}, stdin="2"
    )
    assert (res.cause, res.stdout, res.returncode) == ("ok", "42\n", 0)
    assert res.ok


def test_layers_reported():
    layers = probe()
    assert {"landlock_abi", "seccomp", "net_namespace", "pid_namespace", "user_namespace"} <= set(layers)
    assert layers["process_limit"] in ("rlimit", "pids_cgroup")


def test_exit_status_and_exception():
    assert run_python("import sys; sys.exit(3)", FAST).cause == "exit"
    res = run_python("raise ValueError('bad')", FAST)
    assert (res.cause, res.exception, res.returncode) == ("error", "ValueError", 1)
    assert "ValueError: bad" in res.stderr


def test_infinite_loop_stopped_by_cpu_limit():
    """cpu_s=1 < wall_s=30: the kernel stops the loop on CPU time (however busy the machine), not the wall clock."""
    res = run_python("while True:\n    pass\n", dataclasses.replace(FAST, cpu_s=1, wall_s=30))
    assert res.cause == "cpu_time" and res.signal in ("SIGXCPU", "SIGKILL")


def test_sleeping_program_stopped_by_wall_clock():
    res = run_python("import time\nprint('start', flush=True)\ntime.sleep(60)", SandboxLimits(wall_s=1, cpu_s=2))
    assert res.cause == "timeout" and res.stdout == "start\n" and res.wall_s < 5


def _leftovers():
    return [p for p in psutil.process_iter(["cmdline"]) if str(CHILD) in " ".join(p.info["cmdline"] or [])]


def test_fork_bomb_contained_and_no_process_survives():
    res = run_python("import os\nwhile True:\n    os.fork()\n", dataclasses.replace(FAST, wall_s=3))
    assert res.cause == "processes" and res.exception == "BlockingIOError"
    # children that outlive the program are killed with it (PID namespace), even when it exits normally
    res = run_python(
        "import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n        time.sleep(120)\nprint('parent done')",
        FAST,
    )
    assert res.cause == "ok"
    time.sleep(0.5)
    assert _leftovers() == []


def test_memory_bomb():
    res = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(50 << 20))\n", FAST)
    assert (res.cause, res.exception) == ("memory", "MemoryError")


def test_write_outside_the_directory_denied(tmp_path):
    target = f"/tmp/alignflow-escape-{uuid.uuid4().hex}"
    res = run_python(
        f"open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())\n"
        f"open({target!r}, 'w').write('escaped')",
        FAST,
    )
    assert res.stdout == "fine\n" and res.cause == "denied" and res.exception == "PermissionError"
    assert not os.path.exists(target)
    res = run_python(f"open({str(tmp_path / 'x')!r}, 'w')", FAST)
    assert res.cause == "denied" and not (tmp_path / "x").exists()


def test_environment_not_visible(monkeypatch):
    monkeypatch.setenv("ALIGNFLOW_TEST_SECRET", "s3cr3t-value")
    code = (
        "import os, glob\nprint(sorted(os.environ))\nfound = []\nfor p in glob.glob('/proc/*/environ'):\n"
        "    try:\n        found.append(b's3cr3t' in open(p, 'rb').read())\n    except OSError:\n        pass\n"
        "print(any(found))"
    )
    res = run_python(code, FAST)
    assert res.cause == "ok"
    names, leaked = res.stdout.splitlines()
    assert "ALIGNFLOW_TEST_SECRET" not in names and leaked == "False"


def test_socket_denied():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    res = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", FAST)
    server.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing reached the listening socket
        server.accept()
    server.close()
    assert res.cause == "denied"
    res = run_python("import socket\nsocket.socket(socket.AF_UNIX)", FAST)
    assert res.cause == "denied"


def test_huge_print_cut_at_output_limit():
    res = run_python("while True:\n    print('x' * 1000)\n", FAST)
    assert res.cause == "output_limit" and len(res.stdout) <= FAST.output_bytes


def test_open_files_and_file_size_limits():
    res = run_python("fs = [open(f'f{i}', 'w') for i in range(1000)]", FAST)
    assert res.cause == "open_files"
    res = run_python("open('big', 'wb').write(b'x' * (2 << 20))", FAST)
    assert res.cause == "file_size"


def test_bad_limits_are_config_errors():
    with pytest.raises(ConfigError, match="memory_mb"):
        SandboxLimits(memory_mb=0)
    with pytest.raises(ConfigError, match="wall_s"):
        SandboxLimits(wall_s=-1)
    assert len(set(CAUSES)) == len(CAUSES)
