"""The untrusted side of the sandbox: a stdlib-only script run as its own process.

It is started by `aflow.sandbox.Sandbox` as ``python -I child.py`` with a scrubbed
environment, reads one JSON job from stdin, confines itself, runs the job and reports
one JSON ``done`` message. It imports nothing from the project, so the code it runs
never shares an interpreter with the trusted parent (keys, sockets, caches).

Confinement, strongest available first (each layer is recorded in the report):
  * namespaces: network (no interfaces but a downed loopback), PID (a fresh /proc,
    and every descendant dies with the sandbox's init), mount (every mount read-only
    except the job's working directory), and a user namespace when not root;
  * capabilities dropped and no_new_privs set, so the job cannot undo the mounts;
  * a pids cgroup (root) or RLIMIT_NPROC (non-root) against fork bombs;
  * rlimits on CPU time, address space, file size and open files;
  * an in-process guard: no fork/exec/kill/socket through the os and socket modules.
Without namespaces (some containers) the guard and rlimits are what is left, and the
parent still enforces a wall-clock timeout by killing the process group.

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

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
PIDS_CGROUP_ROOT = "/sys/fs/cgroup/pids"
# Who we are on the host, read before any user namespace can make us look like root.
HOST_UID, HOST_GID = os.geteuid(), os.getegid()
# Layers a zygote set up once for every child it forks (its network namespace).
INHERITED_LAYERS = []

# A workflow job runs on asyncio; importing it before confinement keeps its set-up
# (a socketpair for the event loop) out of reach of the guard. Code jobs import nothing.
WORKFLOW_PRELOAD = ("asyncio", "inspect", "types")


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    return libc


def _mounts():
    """Mount points and their flags that a read-only remount must keep."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            opts = fields[5].split(",")
            flags = 0
            flags |= MS_NOSUID if "nosuid" in opts else 0
            flags |= MS_NODEV if "nodev" in opts else 0
            flags |= MS_NOEXEC if "noexec" in opts else 0
            points.append((fields[4].replace("\\040", " "), flags))
    return points


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
    """Unshare user/mount/net/pid namespaces and make everything but workdir read-only.

    Returns True when a PID namespace was created: the caller must then fork, and the
    child becomes the namespace's init."""
    libc = _libc()
    if "netns" in INHERITED_LAYERS:
        if libc.unshare(CLONE_NEWNS | CLONE_NEWPID) != 0:
            return False
        layers.extend(INHERITED_LAYERS)
    else:
        if not _unshare_user(libc, CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID):
            return False
        layers.extend((["userns"] if HOST_UID != 0 else []) + ["netns"])
    layers.append("pidns")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return True
    wd = workdir.encode()
    if libc.mount(wd, wd, None, MS_BIND, None) != 0:
        return True
    os.chdir(workdir)  # the old cwd still points into the mount about to become read-only
    failed = 0
    for point, keep in _mounts():
        if point == workdir:
            continue
        if libc.mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None) != 0:
            failed += 1
    layers.append("readonly-fs" if failed == 0 else f"readonly-fs(partial:{failed})")
    return True


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
        params = inspect.signature(workflow.__call__).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        extra = {k: v for k, v in inputs.items() if takes_any or k in params}
        result = await workflow(problem, **extra)
        if job.get("format") == "aflow" and isinstance(result, tuple):
            result = result[0]
        return result

    return loop.run_until_complete(main())


def confine(job, layers):
    """Apply every layer we can; namespaces first, then what needs to be inside them."""
    workdir = os.getcwd()
    limits = job["limits"]
    own_processes = sum(1 for p in os.listdir("/proc") if p.isdigit() and _owned(p))
    join_pids_cgroup(int(limits["max_processes"]), layers)
    in_pidns = enter_namespaces(workdir, layers) if limits.get("namespaces", True) else False
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
    drop_privileges(layers)
    set_rlimits(limits, own_processes, layers)
    # As a namespace's init this process ignores signals it has no handler for.
    signal.signal(signal.SIGXCPU, _cpu_exceeded)


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

    for name in WORKFLOW_PRELOAD + ("subprocess", "socket", "_socket", "posix"):
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
