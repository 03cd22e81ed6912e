"""A real browser for tests: Debian's chromium, installed with apt-get when missing and we are root (as in CI),
driven by Playwright's Python API (`executable_path`: Playwright downloads no browser of its own).
`BrowserUnavailable` says why a browser could not start."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
PACKAGES = ("chromium", "chromium-driver")
APT_LOCK_WAIT_S = 600  # another apt-get (another test run, an engineer) may hold the lock meanwhile


class BrowserUnavailable(RuntimeError):
    """No browser can start on this machine; the message says why."""


def _apt(*args: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "-o", f"DPkg::Lock::Timeout={APT_LOCK_WAIT_S}", *args]
    deadline = time.monotonic() + APT_LOCK_WAIT_S
    while True:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=APT_LOCK_WAIT_S + 900)
        if done.returncode == 0:
            return
        locked = "lock" in (done.stderr or "").lower()  # `apt-get update`'s list lock has no timeout option
        if not locked or time.monotonic() > deadline:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise BrowserUnavailable(f"{' '.join(cmd)} failed ({done.returncode}): {' / '.join(tail)}")
        time.sleep(10)


def ensure_chromium() -> Path:
    """/usr/bin/chromium, installed first if missing (root only, quiet, non-interactive)."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BrowserUnavailable(f"{CHROMIUM} missing and cannot apt-get install {' '.join(PACKAGES)} (not root)")
    _apt("update", "-qq")
    _apt("install", "-y", "-qq", "--no-install-recommends", *PACKAGES)
    if not CHROMIUM.exists():
        raise BrowserUnavailable(f"apt-get installed {' '.join(PACKAGES)} but {CHROMIUM} is still missing")
    return CHROMIUM


def launch(playwright):
    """A headless chromium Browser (Playwright's sync API); BrowserUnavailable if it cannot start."""
    executable = ensure_chromium()
    try:
        # No sandbox: CI runs as root, where chromium refuses its sandbox.
        return playwright.chromium.launch(executable_path=str(executable), headless=True, args=["--no-sandbox"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BrowserUnavailable(f"{executable} did not start under Playwright: {first}") from None
