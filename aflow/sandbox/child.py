"""The untrusted side of the sandbox: a stdlib-only script run as its own process.

It is started by `aflow.sandbox.Sandbox` as ``python -I -S child.py`` with a scrubbed
environment, reads one JSON job from stdin, confines itself, runs the job and reports
one JSON ``done`` message. It imports nothing from the project, so the code it runs
never shares an interpreter with the trusted parent (keys, sockets, caches).

Confinement, strongest available first (each layer is recorded in the report):
  * namespaces: network (no interfaces but a downed loopback), PID (a fresh /proc,
    and every descendant dies with the sandbox's init), mount (a private root holding
    only the Python prefix without its site-packages, the system libraries, four
    devices and the job's working directory: nothing of the host to read), and a user
    namespace when not root;
  * capabilities dropped and no_new_privs set, so the job cannot undo the mounts;
  * a pids cgroup (root) or RLIMIT_NPROC (non-root) against fork bombs;
  * rlimits on CPU time, address space, file size and open files;
  * an in-process guard: no fork/exec/kill/socket through the os and socket modules.
Without a private root (namespaces refused, as in many containers) the job confines itself without
privileges instead (unprivileged.py): Landlock limits reads to the Python prefix without its
site-packages and the libraries, and writes to its directory; a seccomp filter refuses network
sockets, ptrace, mounts, namespaces and signals to other processes. The guard and rlimits apply in
every mode, and the parent enforces a wall-clock timeout by killing the process group.

Protocol (JSON lines). stdin carries the job, then replies; the job's own prints go to a
capped file, not to the channel.
  parent -> child  {"mode": "code", "code": ..., "entry": name|null, "limits": {...}}
                   {"mode": "workflow", "graph": ..., "prompt": ..., "format": "native"|"aflow",
                    "inputs": {...}, "operators": [...], "limits": {...}}
  child  -> parent {"type": "call", "id": n, "op": name, "kwargs": {...}}   (workflow mode)
  parent -> child  {"type": "reply", "id": n, "ok": bool, "value": ..., "error": ...}
  child  -> parent {"type": "done", "ok": bool, "value": ..., "error": ..., "isolation": [...]}
"""

import ctypes
import json
import os
import resource
import signal
import sys
import traceback


def _sibling(name):
    """A stdlib-only module next to this script, by path (`python -I` leaves this directory off sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


unprivileged = _sibling("unprivileged")  # Landlock and seccomp, for when there is no private root

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
MNT_DETACH = 2
# Per-mount options a bind remount must repeat: in a user namespace they are locked.
MOUNT_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                 "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
# pivot_root has no libc wrapper; architectures missing here keep the read-only host view.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}
# The host paths a job's root is built from, besides the Python prefix and the libraries.
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
LIBRARY_ALIASES = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib64")  # symlinks on merged-/usr systems
ROOT_SUBDIR = ".root"  # mount point of the new root, inside the (parent-deleted) working directory
OLD_ROOT = "/.old-root"  # where the host's root waits, between pivot_root and the fresh /proc
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
PIDS_CGROUP_ROOT = "/sys/fs/cgroup/pids"
# Who we are on the host, read before any user namespace can make us look like root.
HOST_UID, HOST_GID = os.geteuid(), os.getegid()
# Layers a zygote set up once for every child it forks (its network namespace).
INHERITED_LAYERS = []

# A workflow job runs on asyncio; importing it before confinement keeps its set-up
# (a socketpair for the event loop) out of reach of the guard. Code jobs import nothing.
WORKFLOW_PRELOAD = ("asyncio", "inspect", "types")
# What code answers and benchmark tests import most (AFlow preloads math, hashlib, re and
# typing's names into every solution). A zygote imports them once, so a forked child does not
# pay for them: typing alone costs ~20 ms of CPU per process.
CODE_PRELOAD = ("typing", "hashlib", "re", "math", "json", "collections", "itertools", "functools", "heapq",
                "bisect", "string", "random", "copy", "fractions", "decimal", "datetime", "statistics")


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    return libc


def _mounts():
    """Mount points and the flags that a bind remount of them (or below them) must keep."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            flags = sum(MOUNT_OPTIONS.get(opt, 0) for opt in fields[5].split(","))
            if not flags & (MS_NOATIME | MS_RELATIME):
                flags |= MS_STRICTATIME
            points.append((fields[4].replace("\\040", " "), flags))
    return points


def _flags_at(path, mounts):
    """Flags of the mount holding `path` (the deepest, and the last one stacked there)."""
    best, flags = "", 0
    for point, keep in mounts:
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, flags = point, keep
    return flags


def _mount(libc, source, target, fstype, flags, data=None):
    """mount(2) that raises, naming the target, instead of returning -1."""
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    if libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {target}: {os.strerror(errno)}")


def _library_dirs(prefixes):
    """Directories of the shared libraries this interpreter has mapped (libc, libm, the
    dynamic loader), outside the Python prefix: not all of /usr/lib, whose other trees
    hold more Python installations. The libraries extension modules load later
    (libsqlite3, libffi, libz...) sit beside libc on glibc systems (Debian's multiarch
    directory, /usr/lib64, /usr/lib)."""
    mapped = set()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/") and ".so" in fields[5]:
                mapped.add(fields[5].strip())
    inside = lambda d, tops: any(d == t or d.startswith(t + "/") for t in tops)  # noqa: E731
    prefixes = [os.path.realpath(p) for p in prefixes]
    found = {os.path.dirname(os.path.realpath(path)) for path in mapped}
    found = {d for d in found if not inside(d, prefixes)}
    return sorted(d for d in found if not inside(os.path.dirname(d), found))


def _package_dirs(top):
    """site-/dist-packages under `top` where Python layouts put them (top/python3*/...,
    top/lib*/python3*/...): installed packages must not be readable by path either."""
    found = []
    bases = [top] + [os.path.join(top, name) for name in ("lib", "lib64", "local/lib")
                     if os.path.isdir(os.path.join(top, name))]
    for base in bases:
        with os.scandir(base) as entries:
            pythons = [e.path for e in entries if e.name.startswith("python") and e.is_dir()]
        found += [os.path.join(p, name) for p in pythons for name in ("site-packages", "dist-packages")
                  if os.path.isdir(os.path.join(p, name))]
    return found


def _root_plan():
    """(directories a job's root binds read-only, site-packages to cover inside them).
    Worked out once per interpreter, at import: a zygote's children inherit it."""
    try:
        binds = sorted({sys.base_prefix, sys.base_exec_prefix})
        binds += _library_dirs(binds)
        return binds, [hidden for top in binds for hidden in _package_dirs(top)]
    except OSError:
        return None


ROOT_PLAN = _root_plan()


def _bind(libc, source, root, mounts, flags):
    """Bind host `source` at the same path under `root` (non-recursively: no mount below
    it comes along), then remount it with `flags` plus the source's locked ones."""
    target = root + source
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:  # a device node is bound onto an empty file
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
    _mount(libc, source, target, None, MS_BIND)
    _mount(libc, None, target, None, MS_REMOUNT | MS_BIND | flags | _flags_at(os.path.realpath(source), mounts))


def build_root(libc, workdir):
    """A tmpfs holding only what the job needs, at workdir/.root, to become its '/'.

    Read-only: the Python prefix (at its own path, so sys.path holds) with every
    site-packages covered by an empty tmpfs, and the system library directories (their
    /lib-style symlinks recreated as symlinks). Also /dev/{null,zero,random,urandom},
    empty /tmp and /proc (a fresh proc is mounted there once in the PID namespace), the
    old-root mount point, and the working directory read-write at its own path. Nothing
    else of the host exists in it: no /etc, /home, /root, /work, /sys, no other /tmp."""
    if ROOT_PLAN is None:
        raise OSError("no plan for a private root (is /proc mounted?)")
    binds, covered = ROOT_PLAN
    mounts = _mounts()
    root = os.path.join(workdir, ROOT_SUBDIR)
    os.mkdir(root, 0o755)
    _mount(libc, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    for path in binds:
        _bind(libc, path, root, mounts, MS_RDONLY | MS_NOSUID | MS_NODEV)
    for hidden in covered:
        _mount(libc, "tmpfs", root + hidden, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
    for alias in LIBRARY_ALIASES:
        if os.path.islink(alias):
            os.makedirs(root + os.path.dirname(alias), exist_ok=True)
            os.symlink(os.readlink(alias), root + alias)
    for device in DEVICES:
        _bind(libc, device, root, mounts, MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    for name in ("/tmp", "/proc", OLD_ROOT):
        os.makedirs(root + name, exist_ok=True)
    _bind(libc, workdir, root, mounts, MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return root


def enter_root(libc, root):
    """pivot_root into `root`, the host's root kept at OLD_ROOT until leave_host_root()."""
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(f"pivot_root: unknown system call number on {os.uname().machine}")
    os.chdir(root)
    if libc.syscall(number, b".", OLD_ROOT.lstrip("/").encode()) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"pivot_root: {os.strerror(errno)}")
    os.chdir("/")


def leave_host_root(workdir):
    """Detach the host's root and freeze the private one (after the fresh /proc is mounted:
    in a user namespace that mount needs a visible proc, the host's, to exist).

    Past pivot_root there is no way back: a failure here raises, and the job is refused."""
    libc = _libc()
    if libc.umount2(OLD_ROOT.encode(), MNT_DETACH) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"detaching the host root: {os.strerror(errno)}")
    os.rmdir(OLD_ROOT)
    _mount(libc, None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(workdir)
    try:
        os.rmdir(ROOT_SUBDIR)  # the mount point, seen through the working directory's bind
    except OSError:
        pass


def _readonly_host(libc, workdir):
    """The fallback view: the host's mounts, all read-only but the working directory.
    Returns how many mounts could not be made read-only."""
    wd = workdir.encode()
    if libc.mount(wd, wd, None, MS_BIND, None) != 0:
        return None
    os.chdir(workdir)  # the old cwd still points into the mount about to become read-only
    failed = 0
    for point, keep in _mounts():
        if point == workdir:
            continue
        if libc.mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None) != 0:
            failed += 1
    return failed


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _unshare_user(libc, flags):
    """unshare(flags), adding a user namespace when not root on the host."""
    if HOST_UID != 0:
        flags |= CLONE_NEWUSER
    if libc.unshare(flags) != 0:
        return False
    if HOST_UID != 0:
        try:
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"0 {HOST_UID} 1")
            _write("/proc/self/gid_map", f"0 {HOST_GID} 1")
        except OSError:
            pass
    return True


def isolate_network():
    """Move this process into an empty network namespace (done once by a zygote: a fresh
    namespace per child costs more than the rest of the confinement together)."""
    if _unshare_user(_libc(), CLONE_NEWNET):
        INHERITED_LAYERS.extend((["userns"] if HOST_UID != 0 else []) + ["netns"])


def enter_namespaces(workdir, layers):
    """Unshare user/mount/net/pid namespaces and pivot into a private root (build_root);
    if that cannot be built, fall back to the host's mounts, all read-only but workdir.

    Returns (in_pidns, pivoted). With a PID namespace the caller must fork, the child
    becoming the namespace's init; when pivoted, that init must mount its /proc and then
    call leave_host_root()."""
    libc = _libc()
    if "netns" in INHERITED_LAYERS:
        if libc.unshare(CLONE_NEWNS | CLONE_NEWPID) != 0:
            return False, False
        layers.extend(INHERITED_LAYERS)
    else:
        if not _unshare_user(libc, CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID):
            return False, False
        layers.extend((["userns"] if HOST_UID != 0 else []) + ["netns"])
    layers.append("pidns")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return True, False
    try:
        enter_root(libc, build_root(libc, workdir))
        layers.extend(["private-root", "readonly-fs"])
        return True, True
    except OSError as exc:  # nothing of a half-built root is kept: the host view, read-only
        root = os.path.join(workdir, ROOT_SUBDIR)
        libc.umount2(root.encode(), MNT_DETACH)
        try:
            os.rmdir(root)
        except OSError:
            pass
        layers.append(f"private-root(failed: {exc})")
    failed = _readonly_host(libc, workdir)
    if failed is not None:
        layers.append("readonly-fs" if failed == 0 else f"readonly-fs(partial:{failed})")
    return True, False


def join_pids_cgroup(max_pids, layers):
    """As root, put this process (and so its descendants) in a pids cgroup of its own."""
    if HOST_UID != 0 or not os.path.isdir(PIDS_CGROUP_ROOT):
        return
    try:
        path = os.path.join(PIDS_CGROUP_ROOT, "aflow-sandbox", str(os.getpid()))
        os.makedirs(path, exist_ok=True)
        _write(os.path.join(path, "pids.max"), str(max_pids))
        _write(os.path.join(path, "cgroup.procs"), str(os.getpid()))
        layers.append(f"pids-cgroup({max_pids})")
    except OSError:
        pass


def drop_privileges(layers):
    """Drop every capability so the job cannot remount, unshare back or change limits."""
    libc = _libc()
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)
    data = (Data * 2)()
    ok = libc.capset(ctypes.byref(header), data) == 0
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if ok:
        layers.append("no-capabilities")


def set_rlimits(limits, own_processes, layers):
    def cap(which, value, hard=None):
        try:
            resource.setrlimit(which, (value, value if hard is None else hard))
        except (ValueError, OSError):
            pass

    # Soft below hard: SIGXCPU (reported as the CPU limit) comes before the SIGKILL.
    cap(resource.RLIMIT_CPU, int(limits["cpu_seconds"]), int(limits["cpu_seconds"]) + 1)
    cap(resource.RLIMIT_AS, int(limits["memory_mb"]) << 20)
    cap(resource.RLIMIT_FSIZE, int(limits["file_size_mb"]) << 20)
    cap(resource.RLIMIT_NOFILE, 64)
    cap(resource.RLIMIT_CORE, 0)
    if HOST_UID != 0:
        # RLIMIT_NPROC counts every process of the user, so allow for those already running.
        cap(resource.RLIMIT_NPROC, own_processes + int(limits["max_processes"]))
    layers.append("rlimits")


def _owned(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid == HOST_UID
    except OSError:
        return False


def install_guard(layers):
    """Refuse process, signal and network primitives at the Python level (defence in depth)."""
    import _socket
    import builtins
    import posix
    import socket
    import subprocess

    def refused(name):
        def deny(*_args, **_kwargs):
            raise PermissionError(f"{name} is not allowed in the aflow sandbox")
        return deny

    for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "setsid", "setpgid",
                 "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
                 "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
                 "putenv", "unsetenv", "chroot", "setuid", "setgid", "unshare"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, refused(f"os.{name}"))
    subprocess.Popen = refused("subprocess")
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, refused(f"socket.{name}"))
    for name in ("socket", "socketpair", "fromfd"):
        setattr(_socket, name, refused(f"socket.{name}"))
    for name in ("ctypes", "_ctypes", "multiprocessing", "_posixsubprocess", "pty"):
        sys.modules[name] = None
    builtins.exit = builtins.quit = refused("exit")
    layers.append("guard")


class Channel:
    """JSON lines over private copies of stdin/stdout; fd 0/1/2 are then repointed.

    Reads go through our own buffer on the raw fd so that an event loop can wait on the
    fd and still see every line of a burst of replies."""

    def __init__(self):
        self.fd_in = os.dup(0)
        self.fd_out = os.dup(1)
        self.buffer = b""

    def send(self, message):
        data = (json.dumps(message, default=str) + "\n").encode()
        while data:
            data = data[os.write(self.fd_out, data):]

    def _fill(self):
        chunk = os.read(self.fd_in, 1 << 16)
        if not chunk:
            raise EOFError("parent closed the channel")
        self.buffer += chunk

    def pop_lines(self):
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def receive(self):
        while b"\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


def redirect_output(workdir):
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    log = os.open(os.path.join(workdir, "output.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


def _short_error(exc):
    tb = traceback.extract_tb(exc.__traceback__)
    where = ""
    for frame in reversed(tb):
        if frame.filename.startswith("<") or frame.filename.endswith(("graph.py", "prompt.py")):
            where = f" (line {frame.lineno})"
            break
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return (text[:1500] + where) if len(text) > 1500 else text + where


def run_code(job):
    """Execute a code string; call `entry()` when given and return its result as text."""
    namespace = {"__name__": "__main__"}
    exec(compile(job["code"], "<code>", "exec"), namespace)
    entry = job.get("entry")
    if entry:
        fn = namespace.get(entry)
        if not callable(fn):
            raise NameError(f"the code defines no callable '{entry}'")
        result = fn()
        return None if result is None else str(result)
    return None


def build_operator_module(names, call):
    """The `aflow_ops` module a workflow imports: one proxy per operator, plus the names
    an AFlow round file expects (`create_llm_instance`, `CostManager`)."""
    import types

    class Operator:
        def __init__(self, name):
            self.name = name

        async def __call__(self, **kwargs):
            return await call(self.name, kwargs)

    def factory(name):
        # Ours are built as `Custom()`, AFlow's as `operator.Custom(self.llm)`.
        return lambda *_args, **_kwargs: Operator(name)

    class CostManager:
        total_cost = 0.0

    class LLM:
        """AFlow's llm object: callable on a prompt, carrying a cost manager."""

        def __init__(self):
            self.cost_manager = CostManager()

        async def __call__(self, prompt):
            reply = await call("Custom", {"input": prompt, "instruction": ""})
            return reply.get("response", "")

        def get_usage_summary(self):  # cost is accounted by the trusted side
            return {"total_input_tokens": 0, "total_output_tokens": 0, "total_tokens": 0, "total_cost": 0.0}

    class Logger:
        def _log(self, *args, **_kwargs):
            print(*args)

        debug = info = warning = error = exception = _log

    module = types.ModuleType("aflow_ops")
    for name in names:
        setattr(module, name, factory(name))
    module.create_llm_instance = lambda *_args, **_kwargs: LLM()
    module.CostManager = CostManager
    module.DatasetType = str
    module.logger = Logger()
    return module


def load_module(name, source):
    import types

    module = types.ModuleType(name)
    module.__file__ = f"{name}.py"
    sys.modules[name] = module
    exec(compile(source or "", f"{name}.py", "exec"), module.__dict__)
    return module


def run_workflow(job, channel, loop):
    """Run `Workflow` from graph.py on the inputs; operator calls go to the parent."""
    import inspect
    import itertools

    pending = {}
    ids = itertools.count(1)

    def on_readable():
        try:
            channel._fill()
            messages = channel.pop_lines()
        except (EOFError, ValueError, OSError) as exc:
            loop.remove_reader(channel.fd_in)
            for future in pending.values():
                if not future.done():
                    future.set_exception(EOFError(f"channel to parent failed: {exc}"))
            return
        for message in messages:
            future = pending.pop(message.get("id"), None)
            if future is None or future.done():
                continue
            if message.get("ok"):
                future.set_result(message.get("value"))
            else:
                future.set_exception(RuntimeError(message.get("error") or "operator failed"))

    async def call(op, kwargs):
        cid = next(ids)
        future = loop.create_future()
        pending[cid] = future
        channel.send({"type": "call", "id": cid, "op": op, "kwargs": kwargs})
        return await future

    sys.modules["aflow_ops"] = build_operator_module(job["operators"], call)
    # A forked child reseeds `random` from the OS: seed it from the job instead, so that two runs of one
    # workflow on one problem differ only in what the executor answered (the environment's counterfactual)
    import random

    random.seed(job.get("seed", 0))
    load_module("prompt", job.get("prompt"))
    graph = load_module("graph", job["graph"])
    workflow_cls = getattr(graph, "Workflow", None)
    if workflow_cls is None:
        raise NameError("graph.py defines no class Workflow")
    inputs = dict(job["inputs"])
    problem = inputs.pop("problem")

    async def main():
        loop.add_reader(channel.fd_in, on_readable)
        if job.get("format") == "aflow":
            workflow = workflow_cls("workflow", None, job.get("dataset", ""))
        else:
            workflow = workflow_cls()
        if job.get("load_only"):  # `aflow evaluate`'s start-up check: it loads and constructs, nothing runs
            return None
        params = inspect.signature(workflow.__call__).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        extra = {k: v for k, v in inputs.items() if takes_any or k in params}
        result = await workflow(problem, **extra)
        if job.get("format") == "aflow" and isinstance(result, tuple):
            result = result[0]
        return result

    return loop.run_until_complete(main())


# ---- code checking: the code under test and its tests in two processes ------------------
#
# A code answer is checked by two sandbox processes that never meet: the *candidate*
# process loads the solution alone and answers calls; the *checker* process runs the
# benchmark's tests with the candidate's functions replaced by proxies. The parent relays
# each call. Values cross as tagged JSON of builtin types, so what the checker compares is
# plain data built by its own decoder: no object of the candidate's, no `__eq__` of its,
# no patched module, no trace hook exists in the checker. Only the checker's final message,
# carrying a secret the candidate never sees, can pass a problem.

_PLAIN_SCALARS = (type(None), bool, int, float, str)
MAX_VALUE_DEPTH = 200


class Remote:
    """A function or object of the candidate, seen from the checker: calling it asks the
    candidate process (through the parent). It compares equal to nothing but itself. Its
    truth value is the one the candidate claims (MBPP tests `assert f(x)` on a `re.Match`):
    a claim gives nothing that returning True or False would not."""

    __slots__ = ("_target", "_call", "_truth")

    def __init__(self, target, call, truth=None):
        self._target = target
        self._call = call
        self._truth = truth

    def __call__(self, *args, **kwargs):
        return self._call(self._target, args, kwargs)

    def __bool__(self):
        if self._truth is None:
            raise TypeError("a value of the code under test that is not plain data has no truth value")
        return self._truth

    def __repr__(self):
        return f"<candidate {self._target}>"


def encode_value(value, handles=None, depth=0):
    """Plain data as tagged JSON. On the candidate side, `handles` keeps what is not plain
    data (an instance of the solution's class, a generator, ...) and sends a reference; a
    subclass of a builtin is sent as its builtin value, so its own `__eq__` is never used."""
    if depth > MAX_VALUE_DEPTH:
        raise ValueError("value nested too deeply")
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        if kind is float and (value != value or value in (float("inf"), float("-inf"))):
            return {"f": repr(value)}  # JSON has no NaN or infinity
        return value
    if isinstance(value, Remote):
        return {"h": [value._target, None]}
    if isinstance(value, int):
        return int.__new__(int, value)
    if isinstance(value, float):
        return encode_value(float.__new__(float, value), handles, depth + 1)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, list):
        return [encode_value(item, handles, depth + 1) for item in list.__iter__(value)]
    if isinstance(value, tuple):
        return {"t": [encode_value(item, handles, depth + 1) for item in tuple.__iter__(value)]}
    if isinstance(value, dict):
        return {"d": [[encode_value(k, handles, depth + 1), encode_value(v, handles, depth + 1)]
                      for k, v in dict.items(value)]}
    if isinstance(value, frozenset):
        return {"fs": [encode_value(item, handles, depth + 1) for item in frozenset.__iter__(value)]}
    if isinstance(value, set):
        return {"s": [encode_value(item, handles, depth + 1) for item in set.__iter__(value)]}
    if isinstance(value, (bytes, bytearray)):
        return {"b": bytes(value).hex()}
    if isinstance(value, complex):
        return {"c": [encode_value(value.real, None, depth + 1), encode_value(value.imag, None, depth + 1)]}
    if handles is None:
        raise TypeError(f"cannot pass a {kind.__name__} to the code under test")
    handles.append(value)
    try:
        truth = bool(value)
    except Exception:
        truth = None
    return {"h": [len(handles) - 1, truth if type(truth) is bool else None]}


def decode_value(data, remote=None, handles=None, depth=0):
    """The inverse of encode_value, strict: only the shapes encode_value makes, only builtin
    types. The checker decodes with `remote` (references become `Remote`s); the candidate
    with `handles` (references become its own objects again)."""
    if depth > MAX_VALUE_DEPTH:
        raise ValueError("value nested too deeply")
    kind = type(data)
    if kind in _PLAIN_SCALARS:
        return data
    if kind is list:
        return [decode_value(item, remote, handles, depth + 1) for item in data]
    if kind is not dict or len(data) != 1:
        raise ValueError("malformed value from the code under test")
    (tag, body), = data.items()
    if tag == "h" and type(body) is list and len(body) == 2 and (body[1] is None or type(body[1]) is bool):
        if handles is not None and type(body[0]) is int:
            return handles[body[0]]
        if remote is not None and type(body[0]) is int:
            return remote(body[0], body[1])
    elif tag == "f" and body in ("nan", "inf", "-inf"):
        return float(body)
    elif tag == "b" and type(body) is str:
        return bytes.fromhex(body)
    elif type(body) is list:
        items = [decode_value(item, remote, handles, depth + 1) for item in body]
        if tag == "t":
            return tuple(items)
        if tag == "s":
            return set(items)
        if tag == "fs":
            return frozenset(items)
        if tag == "c" and len(items) == 2 and all(type(x) in (int, float) for x in items):
            return complex(items[0], items[1])
        if tag == "d" and all(type(pair) is list and len(pair) == 2 for pair in items):
            return {k: v for k, v in items}
    raise ValueError("malformed value from the code under test")


def _exec_source(source, filename, namespace):
    exec(compile(source or "", filename, "exec", dont_inherit=True), namespace)


def serve_candidate(job, channel):
    """Load the solution as a module of its own (the trusted preamble first: imports and the
    prompt's helpers), say `ready`, then answer `invoke` requests until the parent hangs up."""
    import builtins

    namespace = {"__name__": "solution", "__builtins__": builtins}
    _exec_source(job.get("preamble"), "<preamble>", namespace)
    _exec_source(job["solution"], "<solution>", namespace)
    channel.send({"type": "ready"})
    handles = []
    while True:
        try:
            request = channel.receive()
        except EOFError:
            return
        reply = {"type": "result", "id": request.get("id")}
        try:
            target = request["target"]
            if type(target) is int:
                fn = handles[target]
            elif target in namespace:
                fn = namespace[target]
            else:
                raise NameError(f"the solution defines no '{target}'")
            args = decode_value(request.get("args") or [], handles=handles)
            kwargs = decode_value(request.get("kwargs") or {"d": []}, handles=handles)
            reply.update(ok=True, value=encode_value(fn(*args, **kwargs), handles))
        except BaseException as exc:  # the solution's failure is an answer, not our crash
            reply.update(ok=False, error=_short_error(exc)[:500])
        channel.send(reply)


def run_check(job, channel):
    """Run a benchmark's tests against proxies of the candidate's functions.

    Every `assert` of the tests was numbered by the parent, which appended a call to
    `__aflow_ran__(n)`; the result is the set that ran and the run's secret. The parent
    passes the problem only if that set is complete and the secret matches."""
    import builtins
    import importlib
    import itertools

    ids = itertools.count(1)
    ran = set()

    def invoke(target, args, kwargs):
        call_id = next(ids)
        channel.send({"type": "call", "id": call_id, "op": "invoke",
                      "kwargs": {"target": target, "args": encode_value(list(args)),
                                 "kwargs": encode_value(dict(kwargs))}})
        while True:
            message = channel.receive()
            if message.get("type") == "reply" and message.get("id") == call_id:
                break
        if not message.get("ok"):
            raise RuntimeError(f"relay failed: {message.get('error')}")
        answer = message.get("value")
        if type(answer) is not dict or answer.get("ok") is not True:
            error = answer.get("error") if type(answer) is dict else None
            raise CandidateError(str(error or "the code under test failed")[:500])
        return decode_value(answer.get("value"), remote=lambda handle, truth: Remote(handle, invoke, truth))

    namespace = {"__name__": "tests", "__builtins__": builtins}
    for name in job.get("modules", []):
        namespace[name] = importlib.import_module(name)
    _exec_source(job.get("preamble"), "<test preamble>", namespace)
    for name in job.get("remote_names", []):
        namespace[name] = Remote(name, invoke)
    namespace["__aflow_ran__"] = ran.add
    _exec_source(job["test"], "<tests>", namespace)
    check = namespace["check"]
    if job.get("pass_candidate"):
        check(Remote(job["entry_point"], invoke))
    else:
        check()
    return {"secret": job["secret"], "ran": sorted(ran)}


class CandidateError(Exception):
    """The code under test raised, or sent something that is not a value."""


def confine(job, layers):
    """Apply every layer we can; namespaces first, then what needs to be inside them."""
    workdir = os.getcwd()
    limits = job["limits"]
    own_processes = sum(1 for p in os.listdir("/proc") if p.isdigit() and _owned(p))
    join_pids_cgroup(int(limits["max_processes"]), layers)
    in_pidns, pivoted = enter_namespaces(workdir, layers) if limits.get("namespaces", True) else (False, False)
    if in_pidns:
        pid = os.fork()
        if pid:
            # The intermediate process mirrors the fate of the namespace's init.
            os.close(0)
            _, status = os.waitpid(pid, 0)
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
        libc = _libc()
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) == 0:
            layers.append("private-proc")
    if pivoted:
        leave_host_root(workdir)
    drop_privileges(layers)
    set_rlimits(limits, own_processes, layers)
    if not pivoted:  # no private root: the host's files are in view, so confine without privileges
        confine_unprivileged(workdir, layers)
    # As a namespace's init this process ignores signals it has no handler for.
    signal.signal(signal.SIGXCPU, _cpu_exceeded)


def confine_unprivileged(workdir, layers):
    """Landlock (reads: the Python prefix without site-packages, the libraries; writes: workdir) and
    the seccomp filter (unprivileged.py). Both need no_new_privs, which drop_privileges sets."""
    _libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    tops, hidden = ROOT_PLAN if ROOT_PLAN else ([], [])
    readable = unprivileged.readable_paths(tops, hidden)
    unprivileged.restrict_files(readable, [workdir, *[d for d in DEVICES if os.path.exists(d)]], layers)
    unprivileged.deny_syscalls(layers)


def _cpu_exceeded(_signum, _frame):
    raise TimeoutError("CPU time limit exceeded")


def main():
    channel = Channel()
    job = channel.receive()
    layers = []
    if job.get("mode") == "workflow":
        for name in WORKFLOW_PRELOAD:
            __import__(name)
    try:
        confine(job, layers)
    except Exception as exc:  # a layer failed half-way: refuse to run rather than run loose
        channel.send({"type": "done", "ok": False, "error": f"sandbox set-up failed: {exc}", "isolation": layers})
        os._exit(0)
    redirect_output(os.getcwd())
    loop = None
    if job.get("mode") == "workflow":
        import asyncio

        loop = asyncio.new_event_loop()  # before the guard: the loop needs a socketpair
    install_guard(layers)
    try:
        if job["mode"] == "code":
            value = run_code(job)
        elif job["mode"] == "candidate":
            serve_candidate(job, channel)
            os._exit(0)
        elif job["mode"] == "check":
            value = run_check(job, channel)
        else:
            value = run_workflow(job, channel, loop)
        if value is not None and not isinstance(value, (str, int, float, bool, list, dict)):
            value = str(value)
        channel.send({"type": "done", "ok": True, "value": value, "isolation": layers})
    except BaseException as exc:  # the payload is untrusted: whatever it raises is its result
        channel.send({"type": "done", "ok": False, "error": _short_error(exc), "isolation": layers})
    os._exit(0)


def serve_zygote():
    """Fork server: fd 0 is a SEQPACKET socket of requests carrying three pipe fds each; every
    request forks a child that becomes an ordinary sandbox process on those pipes. Events
    (`started`, `exited`) go out on stdout as JSON lines. Ends when the parent hangs up."""
    import select
    import socket

    for name in WORKFLOW_PRELOAD + CODE_PRELOAD + ("subprocess", "socket", "_socket", "posix"):
        __import__(name)
    control = socket.socket(fileno=0)
    isolate_network()
    events = os.fdopen(os.dup(1), "w", buffering=1)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    events.write(json.dumps({"type": "started", "id": 0, "pid": 0}) + "\n")
    while True:
        readable, _, _ = select.select([control, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                events.write(json.dumps({"type": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)}) + "\n")
        if control not in readable:
            continue
        data, fds, _flags, _addr = socket.recv_fds(control, 1 << 16, 3)
        if not data:
            return
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            continue
        request = json.loads(data)
        pid = os.fork()
        if pid == 0:
            try:
                control.close()
                events.close()
                os.close(wake_r)
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                os.setsid()
                os.chdir(request["workdir"])
                os.environ.update(HOME=request["workdir"], TMPDIR=request["workdir"])
                main()
            finally:
                os._exit(1)
        for fd in fds:
            os.close(fd)
        events.write(json.dumps({"type": "started", "id": request["id"], "pid": pid}) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        serve_zygote()
    else:
        main()
