"""Runtime: processes and devices, torch-version shims, checkpoint I/O, locks, barriers, atomic writes, failures
and the numerical guard, experiment tracking, the console, and `doctor` (what this machine can do)."""
