"""Run untrusted Python code in a confined process and say how it ended.

    from alignflow.sandbox import SandboxLimits, run_python
    res = run_python("print(sum(range(10)))", limits=SandboxLimits(wall_s=5))
    res.ok, res.cause, res.stdout            # True, 'ok', '45\\n'

The code runs as ``main.py`` in a fresh private directory (deleted afterwards) with an empty environment, in a
process confined by :mod:`alignflow.sandbox.child` (namespaces, resource limits, Landlock, seccomp; see
``docs/sandbox.md``). This side enforces the wall-clock limit and the output limit: on either it kills the
whole process group, and the kernel then kills everything left in the sandbox's PID namespace.

:attr:`SandboxResult.cause` is one of :data:`CAUSES`:

==============  ==================================================================================
ok              exited with status 0
exit            exited with another status (``returncode``)
error           an exception escaped the program (``exception`` names it)
denied          an operation the sandbox forbids: ``PermissionError`` (a write outside the directory,
                a socket, a signal to another process, ...)
timeout         still running after ``wall_s`` seconds
cpu_time        used more than ``cpu_s`` seconds of CPU (killed by the kernel)
memory          ``MemoryError``: the address-space limit ``memory_mb`` was reached
processes       a ``fork`` or a thread failed against the ``processes`` limit
open_files      an ``open`` failed against the ``open_files`` limit
file_size       a file grew past ``file_bytes``
output_limit    stdout + stderr passed ``output_bytes``
signal          killed by another signal (``signal`` names it)
sandbox_error   the sandbox itself could not be set up (``detail`` says why); the program did not run
==============  ==================================================================================
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from alignflow.config import ConfigError

CAUSES = (
    "ok",
    "exit",
    "error",
    "denied",
    "timeout",
    "cpu_time",
    "memory",
    "processes",
    "open_files",
    "file_size",
    "output_limit",
    "signal",
    "sandbox_error",
)
CHILD = Path(__file__).with_name("child.py")
_EXCEPTION_CAUSES = {"MemoryError": "memory", "PermissionError": "denied"}
_ERRNO_CAUSES = {
    errno.EAGAIN: "processes",
    errno.EMFILE: "open_files",
    errno.ENFILE: "open_files",
    errno.EFBIG: "file_size",
    errno.EACCES: "denied",
    errno.EPERM: "denied",
}
_SIGNAL_CAUSES = {signal.SIGXCPU: "cpu_time", signal.SIGXFSZ: "file_size"}
_STATUS_BYTES = 1 << 16  # the status pipe's records kept (a fork bomb's copies each report once)
_UID_BASE, _UID_SPAN = 200_000, 100_000  # as root, each run gets its own uid from this range


@dataclasses.dataclass
class SandboxLimits:
    """What one run may use. ``processes`` counts processes and threads of the run together."""

    wall_s: float = 10.0
    cpu_s: float = 5.0
    memory_mb: int = 512
    processes: int = 32
    open_files: int = 64
    output_bytes: int = 1 << 20
    file_bytes: int = 16 << 20

    def __post_init__(self):
        for name in ("wall_s", "cpu_s", "memory_mb", "processes", "open_files", "output_bytes", "file_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"sandbox limit {name}: must be a number > 0, got {value!r}")
        if self.memory_mb < 64:
            raise ConfigError(
                f"sandbox limit memory_mb: {self.memory_mb} is too small for a Python interpreter (at least 64)"
            )
        if self.processes < 2 or self.open_files < 16:
            raise ConfigError(
                "sandbox limits: processes must be >= 2 and open_files >= 16 for the interpreter to "
                f"start (got processes={self.processes}, open_files={self.open_files})"
            )


@dataclasses.dataclass
class SandboxResult:
    """How a run ended: ``cause`` (one of :data:`CAUSES`), its output, and the layers that confined it."""

    cause: str
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None
    exception: str | None = None
    signal: str | None = None
    detail: str = ""
    wall_s: float = 0.0
    layers: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.cause == "ok"


SYSTEM_READ = (
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/bin",
    "/sbin",
    "/dev",
    "/proc",
    "/sys",
    "/etc/ld.so.cache",
    "/etc/localtime",
)


def _reachable_by_others(path: str) -> bool:
    """Whether a user other than the owner can reach and read ``path`` (o+x on every parent, o+r on it)."""
    p = Path(os.path.realpath(path))
    return all(os.stat(d).st_mode & 0o001 for d in p.parents) and bool(os.stat(p).st_mode & 0o004)


def _run_uid() -> int | None:
    """As root: a fresh unprivileged uid for this run, when the interpreter is usable by other users."""
    if os.geteuid() != 0 or not all(_reachable_by_others(p) for p in (sys.executable, sys.prefix, CHILD)):
        return None
    return _UID_BASE + random.SystemRandom().randrange(_UID_SPAN)


def _pids_cgroup_parent() -> Path | None:
    """A cgroup directory with the pids controller that this process may create children in, or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "pids" in controllers.split(","):  # cgroup v1
            base = Path("/sys/fs/cgroup/pids") / rel.lstrip("/")
        elif controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():  # cgroup v2
            base = Path("/sys/fs/cgroup") / rel.lstrip("/")
            try:
                if "pids" not in (base / "cgroup.subtree_control").read_text().split():
                    continue
            except OSError:
                continue
        else:
            continue
        if (base / "cgroup.procs").exists() and os.access(base, os.W_OK):
            return base
    return None


def _make_cgroup(limits: SandboxLimits) -> str | None:
    """A fresh pids cgroup with ``pids.max = processes`` for one run (used when RLIMIT_NPROC cannot hold: the
    kernel does not apply it to uid 0, even inside a user namespace)."""
    parent = _pids_cgroup_parent()
    if parent is None:
        return None
    path = parent / f"alignflow-sandbox-{os.getpid()}-{random.SystemRandom().randrange(1 << 30)}"
    try:
        path.mkdir()
        (path / "pids.max").write_text(str(limits.processes))
    except OSError:
        _remove_cgroup(str(path))
        return None
    return str(path)


def _remove_cgroup(path: str | None) -> None:
    for _ in range(50):  # its processes die a moment after the PID namespace's init
        try:
            if path and os.path.isdir(path):
                os.rmdir(path)
            return
        except OSError:
            time.sleep(0.02)


def read_paths() -> list[str]:
    """What a sandboxed program may read (and execute): the system's libraries, this interpreter and its
    packages, and this package's ``child.py``; nothing else outside its own directory."""
    paths = list(SYSTEM_READ) + [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        str(CHILD.parent),
    ]
    paths += [p for p in sys.path if p and ("site-packages" in p or p.endswith(".zip"))]
    paths += [os.path.dirname(p) for p in sys.path if p.endswith("lib-dynload")]
    return sorted({os.path.realpath(p) for p in paths if os.path.exists(p)})


def _prepare_dir(code: str, files: dict | None, uid: int | None) -> str:
    workdir = tempfile.mkdtemp(prefix="alignflow-sandbox-")
    for rel, text in {**(files or {}), "main.py": code}.items():
        path = Path(workdir, rel)
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            shutil.rmtree(workdir)
            raise ValueError(f"sandbox file {rel!r}: must be a relative path inside the sandbox directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if uid is not None:
        for root, dirs, names in os.walk(workdir):
            for name in [root, *(os.path.join(root, n) for n in dirs + names)]:
                os.chown(name, uid, uid)
    return workdir


def _remove_dir(workdir: str) -> None:
    def unlock(func, path, _exc):  # the program may have made its own files read-only
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700) if os.path.isdir(path) else None
        func(path)

    shutil.rmtree(workdir, onerror=unlock)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _collect(proc: subprocess.Popen, status_fd: int, limits: SandboxLimits) -> tuple[bytes, bytes, bytes, str]:
    """Read stdout, stderr and the status pipe until they close; kill on the wall or output limit."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), status_fd: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    deadline, killed = time.monotonic() + limits.wall_s, ""
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            killed = "timeout"
            break
        for key, _ in sel.select(min(left, 0.5)):
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:
                sel.unregister(key.fd)
            if key.fd != status_fd or len(bufs[status_fd]) < _STATUS_BYTES:
                bufs[key.fd] += chunk
        if len(bufs[proc.stdout.fileno()]) + len(bufs[proc.stderr.fileno()]) > limits.output_bytes:
            killed = "output_limit"
            break
    sel.close()
    if killed:
        _kill(proc)
    out, err = bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()])
    return out[: limits.output_bytes], err[: limits.output_bytes], bytes(bufs[status_fd]), killed


def _classify(records: list[dict], killed: str) -> dict:
    """The result's fields from the status records (see :mod:`alignflow.sandbox.child`)."""
    fields: dict = {"layers": {}}
    child_causes = {_ERRNO_CAUSES.get(r.get("errno")) for r in records if "child_exception" in r}
    for rec in records:
        fields["layers"].update(rec.get("layers", {}))
        if "setup_error" in rec:
            fields.update(cause="sandbox_error", detail=rec["setup_error"])
        if "exception" in rec:
            fields["exception"] = rec["exception"]
            fields["detail"] = rec.get("message", "")
            fields["cause"] = _EXCEPTION_CAUSES.get(rec["exception"]) or _ERRNO_CAUSES.get(rec.get("errno"), "error")
            if rec["exception"] == "RuntimeError" and "thread" in rec.get("message", ""):
                fields["cause"] = "processes"
        if "exit" in rec:
            fields["returncode"] = rec["exit"]
        if "signal" in rec:
            sig = signal.Signals(rec["signal"])
            fields.update(returncode=-int(sig), signal=sig.name)
    if killed == "timeout" and "processes" in child_causes:  # a fork bomb: its copies hit the limit
        fields.update(
            cause="processes", detail="the program's processes hit the process limit until the wall clock stopped it"
        )
    elif killed:
        fields["cause"] = killed
    elif "cause" not in fields:
        if fields.get("signal"):
            fields["cause"] = _SIGNAL_CAUSES.get(signal.Signals[fields["signal"]], "signal")
        elif fields.get("returncode") is None:
            fields.update(cause="sandbox_error", detail="the sandbox ended without reporting how")
        else:
            fields["cause"] = "ok" if fields["returncode"] == 0 else "exit"
    return fields


def run_python(
    code: str, limits: SandboxLimits | None = None, files: dict | None = None, stdin: str = ""
) -> SandboxResult:
    """Run ``code`` as ``main.py`` in a fresh sandbox; ``files``: more files (relative path -> text) beside it."""
    limits = limits or SandboxLimits()
    uid = _run_uid()
    cgroup = _make_cgroup(limits) if os.geteuid() == 0 and uid is None else None
    workdir = _prepare_dir(code, files, uid)
    status_r, status_w = os.pipe()
    cfg = {
        **dataclasses.asdict(limits),
        "workdir": workdir,
        "uid": uid,
        "cgroup": cgroup,
        "read_paths": read_paths(),
        "status_fd": status_w,
    }
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-X", "utf8", str(CHILD), "setup", json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={},
            cwd=workdir,
            pass_fds=(status_w,),
            start_new_session=True,
        )
        os.close(status_w)
        try:
            proc.stdin.write(stdin.encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        out, err, status, killed = _collect(proc, status_r, limits)
        proc.wait()
    finally:
        os.close(status_r)
        _remove_dir(workdir)
        _remove_cgroup(cgroup)
    records = []
    for line in status.decode(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut at _STATUS_BYTES, or written by the program itself
            continue
    records = [r for r in records if isinstance(r, dict)]
    fields = _classify(records, killed)
    return SandboxResult(
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
        wall_s=time.monotonic() - start,
        **fields,
    )


def probe() -> dict:
    """The confinement layers a run gets on this machine (runs a trivial program)."""
    res = run_python("pass", SandboxLimits(wall_s=30))
    if res.cause != "ok":
        raise RuntimeError(f"the sandbox could not run a trivial program: {res.cause} {res.detail} {res.stderr[-500:]}")
    return res.layers
