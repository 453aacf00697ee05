"""Runs a command under the seccomp filters that the systemd unit's
``MemoryDenyWriteExecute=yes`` and ``SystemCallFilter=@system-service`` +
``SystemCallErrorNumber=EPERM`` install, for machines where systemd is not PID 1 (no
``systemd-run``)::

    python -m tests.support.sandbox [--mdwe] [--syscalls NAME,NAME,...] -- COMMAND...

- ``--mdwe`` is systemd's MemoryDenyWriteExecute= filter (``seccomp-util.c``): ``mmap``
  with both PROT_WRITE and PROT_EXEC, ``mprotect``/``pkey_mprotect`` with PROT_EXEC and
  ``shmat`` with SHM_EXEC fail with EPERM.
- ``--syscalls`` allows only these system calls (the expanded ``@system-service`` set as
  ``systemd-analyze syscall-filter`` prints it); every other one fails with EPERM.

Both are loaded with libseccomp (which systemd itself uses), inherited by every child
and kept across ``execve``. Then COMMAND is executed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
PR_SET_NO_NEW_PRIVS = 38
SHM_EXEC = 0o100000


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def _rule(lib: ctypes.CDLL, ctx: int, action: int, name: str, *cmps: ArgCmp) -> None:
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number < 0:  # not a call of this architecture
        return
    array = (ArgCmp * len(cmps))(*cmps) if cmps else None
    code = lib.seccomp_rule_add_array(ctx, action, number, len(cmps), array)
    if code < 0:
        raise OSError(-code, f"seccomp_rule_add {name}: {os.strerror(-code)}")


def _load(lib: ctypes.CDLL, ctx: int) -> None:
    code = lib.seccomp_load(ctx)
    lib.seccomp_release(ctx)
    if code < 0:
        raise OSError(-code, f"seccomp_load: {os.strerror(-code)}")


def deny_write_execute(lib: ctypes.CDLL) -> None:
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    eperm = scmp_act_errno(errno.EPERM)
    wx = mmap.PROT_WRITE | mmap.PROT_EXEC
    _rule(lib, ctx, eperm, "mmap", ArgCmp(2, SCMP_CMP_MASKED_EQ, wx, wx))
    _rule(lib, ctx, eperm, "mmap2", ArgCmp(2, SCMP_CMP_MASKED_EQ, wx, wx))
    for name in ("mprotect", "pkey_mprotect"):
        _rule(lib, ctx, eperm, name, ArgCmp(2, SCMP_CMP_MASKED_EQ, mmap.PROT_EXEC, mmap.PROT_EXEC))
    _rule(lib, ctx, eperm, "shmat", ArgCmp(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
    _load(lib, ctx)


def allow_only(lib: ctypes.CDLL, names: list[str]) -> None:
    ctx = lib.seccomp_init(scmp_act_errno(errno.EPERM))
    for name in names:
        _rule(lib, ctx, SCMP_ACT_ALLOW, name)
    _load(lib, ctx)


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    lib = _lib()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    # The allow list last: seccomp() itself is not in @system-service.
    if "--mdwe" in options:
        deny_write_execute(lib)
    if "--syscalls" in options:
        allow_only(lib, options[options.index("--syscalls") + 1].split(","))
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
