"""The attack corpus: no file a run directory, the evaluator cache or the command line hands to gan-ddp can run
code, on either stack (docs/faults.md, "Threat model").

Each payload, if unpickled, creates a marker file. It is placed in every file of a checkpoint (with a manifest
that matches, as a writer of the run directory would leave it), in the evaluator cache, the run's config, a
samples file. Each case must end with exactly one `error:` line (exit code 2) that names the file and says what
was really checked, and the marker must never appear. Checkpoints of the current format hold no pickles, so
reading them must not call an unpickler at all; those of earlier versions are read by torch's restricted
unpickler only where it is safe (torch >= 2.6), and refused unread elsewhere (the K80 stack's torch 2.0.1).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _runs import newest_checkpoint, train_cmd, train_inproc
from test_faults import cli_inproc, one_error_line

from gan_ddp.runtime import checkpoint as ckpt
from gan_ddp.runtime import checkpoint_legacy as format_1
from gan_ddp.runtime import compat


# ---------------------------------------------------------------------------------------------- payloads
def _command(marker: Path) -> str:
    return f"touch {marker}"


class _Reduce:
    """Unpickled, calls os.system (posix.system): the classic pickle payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (_command(self.marker),))


def _unicode(text: str) -> bytes:  # SHORT_BINUNICODE
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def _tail(marker: Path) -> bytes:
    """The call of a global already on the stack: its argument tuple, REDUCE, STOP."""
    cmd = _command(marker).encode()
    return b"X" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R."  # BINUNICODE, TUPLE1, REDUCE, STOP


def memo_names(marker: Path) -> bytes:
    """STACK_GLOBAL whose module and name come from the memo (BINGET), not from the two opcodes before it."""
    names = _unicode("os") + b"\x94" + _unicode("system") + b"\x94" + b"00"  # MEMOIZE twice, POP twice
    return b"\x80\x04" + names + b"h\x00h\x01\x93" + _tail(marker)  # BINGET 0, BINGET 1, STACK_GLOBAL


def bytes_names(marker: Path) -> bytes:
    """Module and name pushed as byte strings (SHORT_BINSTRING), which the unpickler decodes to str."""
    return b"\x80\x02U\x02osU\x06system\x93" + _tail(marker)


def torch_zip(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state": {0: _Reduce(marker)}, "param_groups": []}, buffer)
    return buffer.getvalue()


def torch_legacy(marker: Path) -> bytes:
    """The old (non-zip) torch.save format: several pickles in a row (magic, protocol, sys info, object)."""
    buffer = io.BytesIO()
    torch.save({"state": _Reduce(marker)}, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def storage_record(marker: Path) -> bytes:
    """A zip torch.save of a tensor whose storage record (the persistent id of its data) holds the payload."""
    buffer = io.BytesIO()
    torch.save(torch.zeros(2), buffer)

    class Storage:
        pass

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", _Reduce(marker), "0", "cpu", 2) if isinstance(obj, Storage) else None

    crafted = io.BytesIO()
    Pickler(crafted, protocol=2).dump([Storage()])
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, crafted.getvalue() if name.endswith("data.pkl") else src.read(name))
    return out.getvalue()


PAYLOADS = {
    **{f"protocol-{p}": (lambda marker, p=p: pickle.dumps(_Reduce(marker), protocol=p)) for p in (0, 2, 4, 5)},
    "memo-names": memo_names,
    "bytes-names": bytes_names,
    "torch-zip": torch_zip,
    "torch-legacy": torch_legacy,
    "storage-record": storage_record,
}


def test_the_payloads_are_live(tmp_path):
    """The corpus proves something only if each payload really runs under a plain unpickler."""
    for name, make in PAYLOADS.items():
        marker = tmp_path / name
        data = make(marker)
        if name.startswith("torch"):
            torch.load(io.BytesIO(data), weights_only=False)
        elif name == "storage-record":
            with contextlib.suppress(Exception):  # the call runs as torch resolves the record, then torch trips
                torch.load(io.BytesIO(data), weights_only=False)
        else:
            pickle.loads(data)
        assert marker.exists(), f"payload {name} did not run under a plain unpickler"


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A real checkpoint (format 2), with a scaler file as fp16 runs write, to copy and poison."""
    run = tmp_path_factory.mktemp("pristine") / "run"
    assert train_inproc(run, "train.steps=10") == 0
    checkpoint = newest_checkpoint(run)
    (checkpoint / ckpt.SCALER).write_text(json.dumps({"scale": 65536.0, "_growth_tracker": 0}))
    ckpt.write_manifest(checkpoint)
    return checkpoint


def _files(checkpoint: Path) -> list[str]:
    return sorted(p.name for p in checkpoint.iterdir() if p.is_file())


def _poison(checkpoint: Path, target: str, data: bytes, manifest: bool = True) -> None:
    (checkpoint / target).write_bytes(data)
    if manifest and target != ckpt.MANIFEST:  # a writer of the run directory rewrites the manifest too
        ckpt.write_manifest(checkpoint)


def _no_unpickler(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("an unpickler was called on a current-format checkpoint")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


def _read_as_a_resume_does(checkpoint: Path) -> None:
    ckpt.verify(checkpoint)
    state = ckpt.read_state(checkpoint)
    ckpt.load_training_state(
        checkpoint, rank=0, saved_world=state["world_size"], extras=("ema",), format_1=format_1.load_format_1
    )
    ckpt.load_ema(checkpoint)  # what `sample` and `eval --run` read


CHECKPOINT_FILES = [
    "ema.safetensors",
    "manifest.json",
    "model.safetensors",
    "model_1.safetensors",
    "optimizer.json",
    "optimizer.safetensors",
    "optimizer_1.json",
    "optimizer_1.safetensors",
    "rng_0.json",
    "scaler.json",
    "trainer_state.json",
]


def test_the_corpus_covers_every_file_a_checkpoint_holds(pristine):
    assert _files(pristine) == CHECKPOINT_FILES


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("target", CHECKPOINT_FILES)
def test_no_checkpoint_file_runs_code(pristine, tmp_path, monkeypatch, target, payload):
    checkpoint = tmp_path / pristine.name
    shutil.copytree(pristine, checkpoint)
    marker = tmp_path / "code-ran"
    _poison(checkpoint, target, PAYLOADS[payload](marker))
    _no_unpickler(monkeypatch)
    with pytest.raises(ckpt.CheckpointError) as excinfo:
        _read_as_a_resume_does(checkpoint)
    message = str(excinfo.value)
    assert "\n" not in message and str(checkpoint / target) in message
    if target != ckpt.MANIFEST:
        assert "read as data only" in message and "no pickle" in message  # what was really checked
    assert not marker.exists()


@pytest.mark.parametrize(
    ("target", "content"),
    [
        ("trainer_state.json", "{}"),
        ("trainer_state.json", '{"step": "7"}'),
        ("trainer_state.json", "[]"),
        ("optimizer.json", '{"state": 5, "param_groups": []}'),
        ("optimizer_1.json", '{"state": {}, "param_groups": [{"params": ["os.system"]}]}'),
        ("rng_0.json", '{"python": [3, [1, 2], null], "numpy": [], "torch": []}'),
        ("rng_0.json", '{"python": "x"}'),
        ("scaler.json", "[1, 2]"),
    ],
)
def test_well_formed_json_of_the_wrong_shape_is_one_line(pristine, tmp_path, target, content):
    """Valid JSON that is not what the file must hold: refused by the checks, not by a crash further on."""
    checkpoint = tmp_path / pristine.name
    shutil.copytree(pristine, checkpoint)
    _poison(checkpoint, target, content.encode())
    with pytest.raises(ckpt.CheckpointError) as excinfo:
        _read_as_a_resume_does(checkpoint)
    assert "\n" not in str(excinfo.value) and str(checkpoint / target) in str(excinfo.value)


def test_optimizer_state_of_the_wrong_shape_is_one_line(pristine, tmp_path, capsys):
    """Well-formed tensors of other shapes: refused at resume, not a crash at the first optimizer step."""
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / pristine.name
    shutil.copytree(pristine, checkpoint)
    tensors = ckpt.read_tensors(checkpoint / "optimizer.safetensors")
    ckpt._save_tensors({k: v.flatten() if v.dim() > 1 else v for k, v in tensors.items()}, checkpoint / "o.st")
    (checkpoint / "o.st").replace(checkpoint / "optimizer.safetensors")
    ckpt.write_manifest(checkpoint)
    code, _, err = cli_inproc(train_cmd(run, "train.steps=20"), capsys)
    assert code == 2
    assert "optimizer.safetensors: state." in one_error_line(err) and "does not fit" in err


@pytest.mark.parametrize("target", CHECKPOINT_FILES)
def test_resume_from_a_poisoned_checkpoint_is_one_line(pristine, tmp_path, capsys, target):
    """End to end through `gan-ddp train`: one `error:` line naming the file, exit 2, no code run."""
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / pristine.name
    shutil.copytree(pristine, checkpoint)
    marker = tmp_path / "code-ran"
    forms = sorted(PAYLOADS)
    _poison(checkpoint, target, PAYLOADS[forms[CHECKPOINT_FILES.index(target) % len(forms)]](marker))
    code, _, err = cli_inproc(train_cmd(run, f"train.resume={checkpoint}", "train.steps=20"), capsys)
    assert code == 2
    assert str(checkpoint / target) in one_error_line(err)
    assert not marker.exists()


@pytest.mark.parametrize("target", ["optimizer.safetensors", "optimizer.bin"])
def test_a_poisoned_checkpoint_under_auto_resume_is_one_line_in_a_fresh_process(pristine, tmp_path, target):
    """As a user runs it: a subprocess, so that any warning torch or numpy printed would show before our line.
    optimizer.bin: a checkpoint of an earlier version, read by torch's restricted unpickler or refused unread."""
    from _runs import single

    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / pristine.name
    shutil.copytree(pristine, checkpoint)
    if target == "optimizer.bin":
        _as_format_1(checkpoint)
    marker = tmp_path / "code-ran"
    _poison(checkpoint, target, torch_legacy(marker))
    proc = single(train_cmd(run, "train.steps=20"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    if target == "optimizer.bin" and not compat.weights_only_is_safe():
        assert str(checkpoint) in line and "nothing in it was read" in line
    elif target == "optimizer.bin":
        assert str(checkpoint / target) in line and "restricted unpickler" in line
    else:
        assert str(checkpoint / target) in line and "no pickle" in line
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- format 1
def _as_format_1(checkpoint: Path) -> None:
    """Rewrite a checkpoint as gan-ddp wrote them before format 2 (Accelerate's save_state: pickles)."""
    for name, legacy in zip(ckpt.OPTIMIZERS, format_1.LEGACY_OPTIMIZERS, strict=True):
        tensors = ckpt.read_tensors(checkpoint / f"{name}.safetensors")
        state = ckpt.join_optimizer_state(tensors, json.loads((checkpoint / f"{name}.json").read_text()))
        torch.save(state, checkpoint / legacy)
        (checkpoint / f"{name}.safetensors").unlink()
        (checkpoint / f"{name}.json").unlink()
    rng = ckpt._rng_from_json(json.loads((checkpoint / "rng_0.json").read_text()))
    accelerate_rng = {
        "step": 0,
        "random_state": rng["python"],
        "numpy_random_seed": rng["numpy"],
        "torch_manual_seed": rng["torch"],
    }
    torch.save(accelerate_rng, checkpoint / "random_states_0.pkl")
    (checkpoint / "rng_0.json").unlink()
    (checkpoint / ckpt.SCALER).unlink(missing_ok=True)
    state = json.loads((checkpoint / ckpt.STATE).read_text())
    del state["format"]
    (checkpoint / ckpt.STATE).write_text(json.dumps(state))
    ckpt.write_manifest(checkpoint)


def test_format_1_checkpoints_resume_only_where_the_restricted_unpickler_is_safe(tmp_path, capsys):
    """Where torch.load(weights_only=True) is safe (torch >= 2.6) an earlier version's checkpoint resumes
    exactly; on older torch it is refused unread, with one line saying how to continue."""
    from _runs import assert_same_tensors, checkpoint_tensors

    overrides = ("train.batch_size=2000", "train.epochs=100", "log.every=3", "checkpoint.every=100")
    straight, old = tmp_path / "straight", tmp_path / "old"
    assert train_inproc(old, *overrides, "train.steps=7") == 0
    _as_format_1(newest_checkpoint(old))
    if not compat.weights_only_is_safe():
        code, _, err = cli_inproc(train_cmd(old, *overrides, "train.steps=14"), capsys)
        assert code == 2
        line = one_error_line(err)
        assert str(newest_checkpoint(old)) in line and "nothing in it was read" in line and "default stack" in line
        return
    assert train_inproc(old, *overrides, "train.steps=14") == 0
    assert train_inproc(straight, *overrides, "train.steps=14") == 0
    assert_same_tensors(checkpoint_tensors(newest_checkpoint(straight)), checkpoint_tensors(newest_checkpoint(old)))


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("target", [*format_1.LEGACY_OPTIMIZERS, format_1.LEGACY_SCALER, "random_states_0.pkl"])
def test_no_format_1_file_runs_code(pristine, tmp_path, target, payload):
    checkpoint = tmp_path / pristine.name
    shutil.copytree(pristine, checkpoint)
    _as_format_1(checkpoint)
    marker = tmp_path / "code-ran"
    _poison(checkpoint, target, PAYLOADS[payload](marker))
    with pytest.raises(ckpt.CheckpointError) as excinfo:
        _read_as_a_resume_does(checkpoint)
    message = str(excinfo.value)
    assert "\n" not in message
    if compat.weights_only_is_safe():
        assert str(checkpoint / target) in message and "restricted unpickler (torch.load weights_only=True)" in message
    else:
        assert str(checkpoint) in message and "nothing in it was read" in message
    assert not marker.exists()


def test_no_unpickler_in_the_package_but_the_restricted_one():
    """Where the package could unpickle (calls, read from the syntax tree): only compat.restricted_torch_load,
    with weights_only=True."""
    import ast

    package = Path(ckpt.__file__).parent
    found = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            unpickles = name in ("torch.load", "pickle.load", "pickle.loads", "pickle.Unpickler", "Unpickler")
            if unpickles or (name.endswith("load") and keywords.get("allow_pickle") == "True"):
                found.append((path.name, name, keywords.get("weights_only")))
    assert found == [("compat.py", "torch.load", "True")]


# ---------------------------------------------------------------------------------------------- other files
@pytest.mark.parametrize("target", ["weights", "card"])
def test_evaluator_cache_runs_no_code(tmp_path, monkeypatch, target):
    from gan_ddp.components.data import DataError
    from gan_ddp.evaluation.evaluator import EvaluatorInfo, MnistEvaluator, load_evaluator, save_evaluator

    path = tmp_path / "evaluator-mnist-0123456789ab.safetensors"
    info = EvaluatorInfo("mnist", "test", "0" * 64, 10, 10, "test[:10]", 0.5, 0, 1, 1.0, torch.__version__)
    save_evaluator(MnistEvaluator("cnn"), info, path)
    marker = tmp_path / "code-ran"
    (path if target == "weights" else path.with_suffix(".json")).write_bytes(torch_zip(marker))
    _no_unpickler(monkeypatch)
    with pytest.raises(DataError) as excinfo:
        load_evaluator(path)
    assert "\n" not in str(excinfo.value)
    assert str(path if target == "weights" else path.with_suffix(".json")) in str(excinfo.value)
    assert not marker.exists()


def test_real_statistics_cache_runs_no_code(tmp_path, monkeypatch):
    """A poisoned statistics file is not trusted: it is recomputed (safetensors only, never unpickled)."""
    from gan_ddp.evaluation.eval_metrics import load_or_compute_real_stats, real_stats_path
    from gan_ddp.evaluation.evaluator import MnistEvaluator, RealData

    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    real = RealData("mnist", "x", "test", images, torch.arange(40) % 10, "f" * 64)
    evaluator = MnistEvaluator("cnn").eval()
    marker = tmp_path / "code-ran"
    path = real_stats_path(tmp_path, "mnist", real.sha256, "cnn")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(storage_record(marker))
    _no_unpickler(monkeypatch)
    stats = load_or_compute_real_stats(evaluator, real, tmp_path)
    assert stats.n == 40 and not marker.exists()


@pytest.mark.parametrize("form", ["raw pickle", "object array", "yaml tag"])
def test_samples_file_and_run_config_run_no_code(tmp_path, capsys, form):
    """`eval --samples FILE.npz` (numpy, allow_pickle=False) and a run's config.yaml (a safe YAML loader)."""
    marker = tmp_path / "code-ran"
    if form == "yaml tag":  # `sample --run` reads the run's config.yaml first
        run = tmp_path / "run"
        run.mkdir()
        (run / "config.yaml").write_text(f'!!python/object/apply:os.system ["{_command(marker)}"]\n')
        code, _, err = cli_inproc(["sample", "--run", str(run), "--out", str(tmp_path / "x.png")], capsys)
        culprit = run / "config.yaml"
    else:
        culprit = tmp_path / "samples.npz"
        if form == "raw pickle":
            culprit.write_bytes(pickle.dumps(_Reduce(marker), protocol=2))
        else:
            np.savez(culprit, np.array([_Reduce(marker)], dtype=object))
        code, _, err = cli_inproc(["eval", "--samples", str(culprit)], capsys)
    assert code == 2
    assert str(culprit) in one_error_line(err)
    assert "allow_pickle" not in err  # numpy's advice to load it unsafely is not repeated
    assert not marker.exists()
