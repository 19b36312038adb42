"""The sandbox's own side: run as ``python -I -X utf8 child.py setup CONFIG_JSON`` by :mod:`alignflow.sandbox.runner`.

Standard library only (it runs before, and outside of, alignflow's imports). Two stages:

``setup`` (process B, started by the runner in a new session with an empty environment):
    1. as root: join the run's pids cgroup when the runner made one, and switch to the run's own unprivileged
       uid when the runner chose one (only when the interpreter is readable by other users).
    2. ``unshare(USER | NET | PID)``: the current uid and gid are seen inside as 1000 (so the program holds no
       capabilities after ``execve``); the network namespace has no interface but a loopback that is down.
       When the kernel refuses, the run goes on without namespaces and says so.
    3. ``fork`` C, process 1 of the new PID namespace: when it exits the kernel kills every process left in
       the namespace (a fork bomb's copies included). C dies with B (``PR_SET_PDEATHSIG``), starts the program
       D and reports how D ended. D is not process 1 because the kernel drops signals such as SIGXCPU sent to a
       namespace's process 1.
    4. D: resource limits (CPU, address space, processes, open files, file size, no core); the private
       directory; ``no_new_privs``; Landlock (read and execute only beneath the runner's read paths, everything
       beneath the private directory, ``/dev/null`` read-write; no TCP bind/connect; no signals or abstract unix
       sockets outside the sandbox); a seccomp filter (``socket()`` of any family and io_uring fail with
       EACCES, system calls of another ABI fail with EPERM); then ``execve`` of the ``run`` stage with an
       empty environment.

``run`` (D after ``execve``): runs ``main.py`` of the private directory as ``__main__``; an exception that
escapes it is reported (its type and errno; ``child_exception`` from a forked copy) on the status pipe before the
usual traceback on stderr.

Every report is one JSON object per line on the status pipe (a file descriptor given by the runner).
"""

import ctypes
import json
import os
import resource
import runpy
import signal
import struct
import sys
import traceback

CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWUSER = 0x40000000, 0x20000000, 0x10000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT = 444, 445, 446
SETUP_FAILED = 121  # C's exit code when a sandbox layer could not be put in place

_libc = ctypes.CDLL(None, use_errno=True)


def report(fd: int, **record) -> None:
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    except OSError:  # the runner stopped listening (it killed the run)
        pass


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


# ----------------------------------------------------------------------------------------------- namespaces
def enter_namespaces(cfg: dict) -> dict:
    """As root, first become the run's own uid when the runner chose one; then unshare a user namespace (the
    current uid and gid seen inside as 1000, so the program has no capabilities after ``execve``), a network
    namespace (no interfaces but a down loopback) and a PID namespace."""
    layers = {}
    if cfg.get("cgroup"):  # join the run's pids cgroup before any fork
        with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    if os.geteuid() == 0 and cfg["uid"] is not None:
        drop_root(cfg["uid"])
        layers["uid"] = cfg["uid"]
    # the kernel never applies RLIMIT_NPROC to uid 0 (even inside a user namespace)
    layers["process_limit"] = "pids_cgroup" if cfg.get("cgroup") else "rlimit" if os.geteuid() else "none"
    uid, gid = os.geteuid(), os.getegid()
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) != 0:
        err = os.strerror(ctypes.get_errno())
        return {
            **layers,
            "user_namespace": False,
            "net_namespace": False,
            "pid_namespace": False,
            "namespace_error": err,
        }
    for name, text in (("setgroups", "deny"), ("uid_map", f"1000 {uid} 1"), ("gid_map", f"1000 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return {**layers, "user_namespace": True, "net_namespace": True, "pid_namespace": True}


# ----------------------------------------------------------------------------------------------- limits
def set_limits(cfg: dict) -> None:
    cpu = max(1, int(-(-cfg["cpu_s"] // 1)))
    mem = cfg["memory_mb"] << 20
    for res, soft, hard in (
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, mem, mem),
        (resource.RLIMIT_NPROC, cfg["processes"], cfg["processes"]),
        (resource.RLIMIT_NOFILE, cfg["open_files"], cfg["open_files"]),
        (resource.RLIMIT_FSIZE, cfg["file_bytes"], cfg["file_bytes"]),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(res, (soft, hard))


def drop_root(uid: int) -> None:
    """As root: become the run's own unprivileged uid/gid (no supplementary groups, no capabilities)."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


# ----------------------------------------------------------------------------------------------- Landlock
def _landlock_abi() -> int:
    return max(0, _libc.syscall(SYS_LANDLOCK_CREATE, None, 0, 1))  # LANDLOCK_CREATE_RULESET_VERSION


def _add_path(ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        attr = struct.pack("=QI", access, fd)  # landlock_path_beneath_attr (packed)
        _check(_libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.c_char_p(attr), 0), f"landlock rule {path}")
    finally:
        os.close(fd)


def apply_landlock(workdir: str, read_paths: list) -> int:
    """Read/execute beneath ``read_paths``, everything beneath ``workdir``; returns the ABI used (0: none)."""
    abi = _landlock_abi()
    if abi < 1:
        return 0
    fs_all = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    net_all = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, no rule: both denied
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets and signals stay inside the sandbox
    attr = struct.pack("=QQQ", fs_all, net_all, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = _check(_libc.syscall(SYS_LANDLOCK_CREATE, ctypes.c_char_p(attr), len(attr), 0), "landlock ruleset")
    read_exec = 0b1101  # EXECUTE | READ_FILE | READ_DIR
    file_rw = 0b110 | (1 << 14 if abi >= 3 else 0)  # WRITE_FILE | READ_FILE (| TRUNCATE)
    try:
        for path in read_paths:
            if os.path.exists(path):
                _add_path(ruleset, path, read_exec if os.path.isdir(path) else 0b101)  # files: EXECUTE | READ_FILE
        _add_path(ruleset, workdir, fs_all)
        _add_path(ruleset, "/dev/null", file_rw)
        _check(_libc.syscall(SYS_LANDLOCK_RESTRICT, ruleset, 0), "landlock restrict_self")
    finally:
        os.close(ruleset)
    return abi


# ----------------------------------------------------------------------------------------------- seccomp
AUDIT_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}  # (arch id, socket syscall number)
IO_URING = (425, 426, 427)  # io_uring_setup / enter / register: the same numbers on every architecture


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def apply_seccomp() -> bool:
    """socket() and io_uring fail with EACCES; system calls of another ABI (x32, 32-bit) fail with EPERM."""
    machine = os.uname().machine
    if machine not in AUDIT_ARCH:
        return False
    arch, sys_socket = AUDIT_ARCH[machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, eacces, eperm = 0x7FFF0000, 0x00050000 | 13, 0x00050000 | 1
    denied = (sys_socket,) + IO_URING
    prog = [
        _bpf(ld, 0, 0, 4),
        _bpf(jeq, 1, 0, arch),
        _bpf(ret, 0, 0, eperm),  # seccomp_data.arch
        _bpf(ld, 0, 0, 0),
        _bpf(jge, 0, 1, 0x40000000),
        _bpf(ret, 0, 0, eperm),
    ]  # .nr; x32 numbers
    for nr in denied:
        prog += [_bpf(jeq, 0, 1, nr), _bpf(ret, 0, 0, eacces)]
    prog.append(_bpf(ret, 0, 0, allow))
    buf = ctypes.create_string_buffer(b"".join(prog))
    fprog = struct.pack("=HxxxxxxQ", len(prog), ctypes.addressof(buf))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0), "seccomp")
    return True


# ----------------------------------------------------------------------------------------------- stages
def confine(cfg: dict, fd: int) -> None:
    """C's side of ``setup``: every layer after the namespaces, then ``execve`` of the ``run`` stage."""
    layers = {}
    set_limits(cfg)
    os.chdir(cfg["workdir"])
    os.umask(0o077)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    layers["landlock_abi"] = apply_landlock(cfg["workdir"], cfg["read_paths"])
    layers["seccomp"] = apply_seccomp()
    report(fd, layers=layers)
    argv = [sys.executable, "-I", "-X", "utf8", os.path.abspath(__file__), "run", str(fd)]
    os.execve(sys.executable, argv, {})


def _wait_and_report(pid: int, fd: int) -> None:
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        report(fd, signal=os.WTERMSIG(status))
    else:
        report(fd, exit=os.WEXITSTATUS(status))


def setup(cfg: dict) -> None:
    """B: namespaces, then C (process 1 of the PID namespace), which starts the program D and reports how D
    ended."""
    fd = cfg["status_fd"]
    report(fd, layers=enter_namespaces(cfg))
    if os.fork() != 0:
        os.wait()
        return
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # C dies with B, and D and the rest with C
    pid = os.fork()
    if pid == 0:
        try:
            confine(cfg, fd)
        except BaseException as e:  # a layer could not be put in place: the program does not run
            report(fd, setup_error=f"{type(e).__name__}: {e}")
        os._exit(SETUP_FAILED)
    _wait_and_report(pid, fd)
    os._exit(0)


def run(fd: int) -> None:
    main_pid = os.getpid()
    sys.path.insert(0, os.getcwd())
    sys.argv = ["main.py"]
    try:
        runpy.run_path("main.py", run_name="__main__")
    except SystemExit:
        raise
    except BaseException as e:
        key = "exception" if os.getpid() == main_pid else "child_exception"  # a forked copy of the program
        report(fd, **{key: type(e).__name__}, errno=getattr(e, "errno", None), message=str(e)[:200])
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    if sys.argv[1] == "setup":
        setup(json.loads(sys.argv[2]))
    else:
        run(int(sys.argv[2]))
