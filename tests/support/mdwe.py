"""`python -m tests.support.mdwe CMD ...`: exec CMD with memory-deny-write-execute enforced by the kernel.

systemd's MemoryDenyWriteExecute=yes refuses writable+executable mappings (a seccomp filter on
mmap/mprotect); Linux >= 6.3 offers the same rule as prctl(PR_SET_MDWE), inherited across fork and
execve. This lets the tests run the real service with that restriction without systemd as PID 1.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_MDWE = 65
PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN = 1


def mdwe_flags() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_GET_MDWE, 0, 0, 0, 0))


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(f"prctl(PR_SET_MDWE) failed: {os.strerror(ctypes.get_errno())} (needs Linux >= 6.3)")
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
