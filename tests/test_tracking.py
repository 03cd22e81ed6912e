"""gan_ddp.runtime.wandb_tracker: real offline W&B runs (files read back), mode resolution, failure isolation."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from gan_ddp.runtime.wandb_tracker import RUN_ID_FILE, Tracker, resolve_mode

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"train": {"lr": 2e-4, "batch_size": 64}, "model": {"arch": "mlp"}, "seed": 0}


def _tracker(run_dir: Path, warnings: list[str], mode: str = "offline", enabled: bool = True, **kw):
    args = {"project": "p", "entity": None, "name": None, "group": None, "tags": [], "config": {}, **kw}
    return Tracker(mode=mode, run_dir=run_dir, enabled=enabled, warn=warnings.append, **args)


def _wandb_env(mp: pytest.MonkeyPatch, home: Path) -> None:
    """No credentials, no user files touched, no console chatter."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        mp.delenv(var, raising=False)
    mp.setenv("HOME", str(home))
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_DISABLE_GIT", "true")
    mp.setenv("WANDB_DISABLE_CODE", "true")
    mp.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    mp.setenv("WANDB_CACHE_DIR", str(home / ".cache" / "wandb"))
    mp.setenv("WANDB_DATA_DIR", str(home / ".local" / "share" / "wandb"))


@pytest.fixture(scope="module")
def accel_state():
    """accelerate's WandBTracker logs through accelerate.logging, which needs the Accelerate state."""
    from accelerate.state import AcceleratorState, PartialState

    fresh = not PartialState._shared_state
    PartialState(cpu=True)
    yield
    if fresh:  # do not leak a CPU state into later tests that build their own Accelerator
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def wandb_env(monkeypatch, tmp_path, accel_state):
    _wandb_env(monkeypatch, tmp_path / "home")
    return tmp_path / "home"


def _records(path: Path):
    """Records of a `.wandb` file: ':W&B' + magic + version, then LevelDB-log framed protobuf Records."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            payload = chunk
        elif kind == 2:  # FIRST
            buf = chunk
            continue
        elif kind == 3:  # MIDDLE
            buf += chunk
            continue
        else:  # LAST
            payload, buf = buf + chunk, b""
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def _closed_records(run_path: Path, timeout: float = 30.0) -> list:
    """The records of a finished run. `run.finish()` returns before wandb-core has flushed the `.wandb`
    file (offline, 0.31: the file can still be just its 7-byte header), so wait for the exit record."""
    (log,) = run_path.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(_records(log))
        except Exception:  # a record being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def _history(run_path: Path) -> list[dict]:
    rows = []
    for rec in _closed_records(run_path):
        if rec.WhichOneof("record_type") == "history":
            items = rec.history.item
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items})
    return rows


def _run_record(run_path: Path):
    return next(r.run for r in _closed_records(run_path) if r.WhichOneof("record_type") == "run")


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, accel_state):
    """One real offline run shared by several tests: metrics, an image, a GIF, a step going back."""
    base = tmp_path_factory.mktemp("offline")
    run_dir = base / "run"
    with pytest.MonkeyPatch.context() as mp:
        _wandb_env(mp, base / "home")
        png, gif = base / "grid.png", base / "evolution.gif"
        Image.new("RGB", (28, 28), (200, 30, 30)).save(png)
        frames = [Image.new("L", (28, 28), v) for v in (0, 128, 255)]
        frames[0].save(gif, save_all=True, append_images=frames[1:], duration=200, loop=0)

        warnings: list[str] = []
        tr = _tracker(
            run_dir,
            warnings,
            project="gan-ddp-test",
            name="unit",
            group="grp",
            tags=["a", "b"],
            config=CONFIG,
        )
        assert tr.active and tr.mode == "offline"
        for step in (1, 2, 3):
            tr.log({"loss/d": 0.5 + step, "loss/g": 1.0 / step, "perf/img_per_s": 100 * step}, step=step)
        tr.log_image("samples/grid", png, step=3, caption="step 3")
        tr.log_video("samples/evolution", gif, step=3)
        tr.log({"loss/d": 9.0}, step=1)  # a step below the last one: W&B drops it, must not raise
        tr.finish()
        tr.finish()  # idempotent
        runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    return {"tracker": tr, "run_dir": run_dir, "runs": runs, "warnings": warnings}


def test_import_and_inactive_trackers_do_not_import_wandb(tmp_path):
    code = (
        "import sys; from pathlib import Path\n"
        "from gan_ddp.runtime.wandb_tracker import Tracker\n"
        "assert 'wandb' not in sys.modules\n"
        f"d = Path({str(tmp_path)!r})\n"
        "for mode, enabled in (('offline', False), ('auto', False), ('disabled', True)):\n"
        "    t = Tracker(mode, 'p', None, None, None, [], d / mode, {}, enabled, warn=sys.exit)\n"
        "    t.log({'loss/d': 1.0}, step=1); t.log_image('x', d / 'x.png', step=1); t.finish(); t.finish()\n"
        "    assert t.run_id is None and not t.active\n"
        "assert 'wandb' not in sys.modules, 'wandb imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_offline_run_writes_one_run_with_media_and_metrics(offline_run):
    tr, run_dir, runs = offline_run["tracker"], offline_run["run_dir"], offline_run["runs"]
    assert offline_run["warnings"] == []
    assert not tr.active
    assert len(runs) == 1
    run = runs[0]
    assert tr.run_id and run.name.endswith(f"-{tr.run_id}")
    assert (run_dir / RUN_ID_FILE).read_text().strip() == tr.run_id
    assert len(list((run / "files" / "media" / "images").rglob("*.png"))) == 1
    assert len(list((run / "files" / "media" / "videos").rglob("*.gif"))) == 1

    rows = _history(run)
    assert [r["_step"] for r in rows] == [1, 2, 3]  # the late step-1 write was dropped, not raised
    assert [r["loss/d"] for r in rows] == [1.5, 2.5, 3.5]
    assert rows[2]["perf/img_per_s"] == 300
    assert rows[2]["samples/grid/_type"] == "image-file"
    assert rows[2]["samples/grid/caption"] == "step 3"
    assert rows[2]["samples/evolution/_type"] == "video-file"

    rec = _run_record(run)
    assert rec.run_id == tr.run_id and rec.project == "gan-ddp-test"
    assert rec.display_name == "unit" and rec.run_group == "grp" and list(rec.tags) == ["a", "b"]
    config = {i.key: json.loads(i.value_json) for i in rec.config.update}
    assert {k: config[k] for k in CONFIG} == CONFIG


def test_resume_reuses_run_id(offline_run, wandb_env):
    run_dir, first_id = offline_run["run_dir"], offline_run["tracker"].run_id
    warnings: list[str] = []
    tr = _tracker(run_dir, warnings, project="gan-ddp-test", name="unit", config={**CONFIG, "seed": 1})
    assert tr.active and tr.run_id == first_id
    tr.log({"loss/d": 4.5}, step=4)
    tr.finish()
    assert warnings == []
    # Offline, every resume is one more directory for the same id (`wandb sync` appends them to one run):
    # offline-run-<time>-<id>, or offline-run-<time>-<id>-1 when started within the same second.
    new = set((run_dir / "wandb").glob("offline-run-*")) - set(offline_run["runs"])
    assert len(new) == 1
    (resumed,) = new
    assert f"-{first_id}" in resumed.name
    assert _run_record(resumed).run_id == first_id
    assert [r["_step"] for r in _history(resumed)] == [4]


def test_a_sweep_agents_run_id_names_a_new_run(tmp_path, wandb_env, monkeypatch):
    """`wandb agent` starts each trial with WANDB_RUN_ID set: the trial's training must log to that run."""
    monkeypatch.setenv("WANDB_RUN_ID", "sweeptrial1")
    warnings: list[str] = []
    tr = _tracker(tmp_path / "run", warnings)
    assert tr.active and tr.run_id == "sweeptrial1"
    tr.finish()
    assert (tmp_path / "run" / RUN_ID_FILE).read_text().strip() == "sweeptrial1" and warnings == []


def test_disabled_mode_creates_nothing(tmp_path, wandb_env):
    warnings: list[str] = []
    tr = _tracker(tmp_path / "run", warnings, mode="disabled")
    tr.log({"loss/d": 1.0}, step=1)
    tr.finish()
    assert tr.run_id is None and not tr.active and warnings == []
    assert not (tmp_path / "run").exists()


def test_enabled_false_creates_nothing(tmp_path, wandb_env):
    warnings: list[str] = []
    tr = _tracker(tmp_path / "run", warnings, enabled=False)
    tr.log_image("x", tmp_path / "missing.png", step=1)
    tr.finish(1)
    assert tr.run_id is None and not tr.active and warnings == []
    assert not (tmp_path / "run").exists()


def test_auto_without_credentials_goes_offline_and_warns_once(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    warnings: list[str] = []
    tr = _tracker(run_dir, warnings, mode="auto", config={"a": 1})
    try:
        assert tr.active and tr.mode == "offline"
        tr.log({"loss/d": 1.0}, step=1)
        tr.log({"loss/d": 2.0}, step=2)
    finally:
        tr.finish()
    assert len(warnings) == 1
    assert warnings[0].startswith("W&B: no credentials found, logging offline to ")
    assert f"wandb sync {run_dir}/wandb/offline-run-*" in warnings[0] and "\n" not in warnings[0]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


def test_resolve_mode(tmp_path):
    home = tmp_path
    assert resolve_mode("auto", {}, home) == ("offline", resolve_mode("auto", {}, home)[1])
    mode, warning = resolve_mode("auto", {}, home, run_dir="/r")
    assert mode == "offline" and warning is not None and "/r/wandb/offline-run-*" in warning
    assert resolve_mode("auto", {"WANDB_API_KEY": "x" * 40}, home) == ("online", None)
    assert resolve_mode("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}, home) == ("disabled", None)
    assert resolve_mode("auto", {"WANDB_MODE": "offline", "WANDB_API_KEY": "k"}, home) == ("offline", None)
    assert resolve_mode("auto", {"WANDB_MODE": "dryrun"}, home) == ("offline", None)
    assert resolve_mode("auto", {"WANDB_MODE": "online", "WANDB_API_KEY": "k"}, home) == ("online", None)
    # Explicit modes are kept; online without any credential would prompt, so it goes offline instead.
    assert resolve_mode("offline", {"WANDB_API_KEY": "k"}, home) == ("offline", None)
    assert resolve_mode("disabled", {"WANDB_API_KEY": "k"}, home) == ("disabled", None)
    assert resolve_mode("online", {"WANDB_API_KEY": "k"}, home) == ("online", None)
    assert resolve_mode("online", {}, home)[0] == "offline"
    # Credentials from netrc: only for the W&B host in use.
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert resolve_mode("auto", {}, home) == ("online", None)
    assert resolve_mode("auto", {"WANDB_BASE_URL": "https://wandb.example.com"}, home)[0] == "offline"
    other = tmp_path / "other_netrc"
    other.write_text("machine wandb.example.com login user password secret\n")
    env = {"WANDB_BASE_URL": "https://wandb.example.com", "NETRC": str(other)}
    assert resolve_mode("auto", env, home) == ("online", None)
    (home / ".netrc").write_text("this is not a netrc file machine")
    assert resolve_mode("auto", {}, home)[0] == "offline"
    with pytest.raises(ValueError):
        resolve_mode("sometimes", {}, home)
    with pytest.raises(ValueError):
        resolve_mode("auto", {"WANDB_MODE": "bogus"}, home)


def test_init_failure_warns_once_and_goes_inert(tmp_path, wandb_env, monkeypatch):
    def boom(*args, **kwargs):
        raise ConnectionError("network unreachable\nlong traceback text")

    monkeypatch.setattr(wandb, "init", boom)
    run_dir = tmp_path / "run"
    png = tmp_path / "x.png"
    Image.new("L", (4, 4)).save(png)
    warnings: list[str] = []
    tr = _tracker(run_dir, warnings)
    assert warnings == ["W&B disabled: ConnectionError: network unreachable; training continues"]
    assert not tr.active and tr.run_id is None
    assert (run_dir / RUN_ID_FILE).read_text().strip()  # the id survives a failed init, for the resume
    for step in range(3):
        tr.log({"loss/d": 1.0}, step=step)
        tr.log_image("samples", png, step=step)
        tr.log_video("evo", png, step=step)
    tr.finish()
    tr.finish(1)
    assert len(warnings) == 1


def test_log_failure_warns_once_and_stops_logging(tmp_path, wandb_env):
    warnings: list[str] = []
    tr = _tracker(tmp_path / "run", warnings)
    assert tr.active
    calls = []

    def broken_log(*args, **kwargs):
        calls.append(1)
        raise OSError("disk full")

    tr._tracker.run.log = broken_log
    for step in range(5):
        tr.log({"loss/d": 1.0}, step=step)
    tr.log_image("x", tmp_path / "x.png", step=9)
    tr.finish()  # still closes the run files, silently
    tr.finish()
    assert len(calls) == 1
    assert warnings == ["W&B disabled: OSError: disk full; training continues"]


def test_tracker_before_accelerator_is_a_warning_not_a_crash(tmp_path, monkeypatch):
    from accelerate.state import PartialState

    _wandb_env(monkeypatch, tmp_path / "home")
    monkeypatch.setattr(PartialState, "_shared_state", {})
    warnings: list[str] = []
    tr = _tracker(tmp_path / "run", warnings)
    tr.log({"loss/d": 1.0}, step=1)
    tr.finish()
    assert not tr.active and len(warnings) == 1 and "create the Accelerator" in warnings[0]
    assert not (tmp_path / "run").exists()
