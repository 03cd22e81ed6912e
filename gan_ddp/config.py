"""Typed experiment configuration: dataclasses, YAML files in `configs/`, dotted `key=value` overrides.

OmegaConf parses YAML and dotted overrides and type-checks them against the dataclasses; this module turns
its multi-line exceptions into one line that names the key, and checks ranges and choices in
`__post_init__` (run when OmegaConf builds the final dataclass objects).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from gan_ddp import choices
from gan_ddp.errors import ConfigError, one_line
from gan_ddp.registry import check_choice as _choice


def _positive(key: str, value: float | None, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below
        raise ConfigError(f"{key}: {value!r} is not allowed; must be a finite number")
    if value is None or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: {value!r} is not allowed; must be {bound}{' or null' if allow_none else ''}")


SPLITS = ("train", "test", "all")  # "all" is train then test
# Precision and recall (gan_ddp.evaluation.fidelity) give each sample a radius from its k = 3 nearest neighbours,
# so fewer than 4 samples have none. Declared here, below the evaluation layer; tests check fidelity agrees.
MIN_EVAL_SAMPLES = 4
# `gan-ddp train-evaluator`'s epochs: the recipe of the cached evaluators (gan_ddp.evaluation.evaluator).
EVALUATOR_EPOCHS = 8
# auto: WANDB_MODE if set, else online with credentials and offline without (gan_ddp.runtime.tracking).
WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class DataConfig:
    dataset: str = "mnist"  # choices.DATASETS: mnist | fashion_mnist
    # Folder with the IDX files (flat or torchvision's <root>/MNIST/raw), or the download target;
    # "bundled" names the MNIST test split shipped inside the package (10,000 images, no network needed).
    root: str = "data"
    split: str = "train"  # train | test | all
    download: bool = True  # fetch with torchvision when the files are missing (main process first)
    # When the MNIST download fails (no network): "bundled" trains on the bundled test split and says so;
    # "none" stops with an error. data.download=false never downloads, so never falls back either.
    fallback: str = "bundled"
    num_workers: int = 0  # batches are single index ops on a resident tensor: workers rarely pay off

    def __post_init__(self) -> None:
        spec = choices.DATASETS[self.dataset]
        _choice("data.split", self.split, SPLITS)
        _choice("data.fallback", self.fallback, ("bundled", "none"))
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        if self.root == "bundled" and not (spec.bundled and self.split == "test"):  # choices.DATASETS says which
            raise ConfigError(
                f"data.root: 'bundled' holds only the MNIST test split; with it use data.dataset=mnist "
                f"data.split=test (got {self.dataset} {self.split})"
            )


@dataclass
class ModelConfig:
    arch: str = "mlp"  # choices.ARCHS: mlp | dcgan
    z_dim: int = 100
    g_hidden: list[int] = field(default_factory=lambda: [256, 512, 1024])  # MLP generator widths
    d_hidden: list[int] = field(default_factory=lambda: [1024, 512, 256])  # MLP discriminator widths
    leaky_slope: float = 0.2
    dropout: float = 0.3  # discriminator dropout (MLP); 0 disables
    g_channels: int = 128  # DCGAN generator base width
    d_channels: int = 64  # DCGAN discriminator base width
    d_batchnorm: bool = True  # DCGAN discriminator BatchNorm (must be off for wgan-gp)
    # Class-conditional G(z, y) and D(x, y): labels come from the dataset; G gets the label as a one-hot
    # input (MLP) or through class-conditional BatchNorm (DCGAN), D is a projection discriminator. Why these:
    # gan_ddp/components/models.py and docs/conditional.md.
    conditional: bool = False
    # Self-conditioned (no labels used): k > 0 trains the conditional networks on k pseudo-classes, the k-means
    # clusters of D's features of real images (selfcond.*; gan_ddp/components/selfcond.py). G stays G(z).
    clusters: int = 0

    def __post_init__(self) -> None:
        choices.ARCHS.check(self.arch)
        if self.clusters == 1 or self.clusters < 0:
            raise ConfigError(f"model.clusters: {self.clusters} is not allowed; must be 0 (off) or >= 2")
        if self.clusters and self.conditional:
            raise ConfigError(
                "model.clusters: needs model.conditional=false (classes come from clustering, not from labels)"
            )
        for key in ("z_dim", "g_channels", "d_channels"):
            _positive(f"model.{key}", getattr(self, key))
        for key in ("g_hidden", "d_hidden"):
            widths = getattr(self, key)
            if not widths or any(w <= 0 for w in widths):
                raise ConfigError(f"model.{key}: {list(widths)} is not allowed; need a non-empty list of widths > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: {self.dropout} is not allowed; must be in [0, 1)")
        _positive("model.leaky_slope", self.leaky_slope, allow_zero=True)


@dataclass
class LossConfig:
    kind: str = "bce"  # choices.LOSSES: bce (non-saturating) | hinge | wgan-gp
    real_label: float = 1.0  # one-sided label smoothing for bce, e.g. 0.9
    gp_weight: float = 10.0  # wgan-gp gradient penalty weight
    # R1 on real images (any loss): gamma / 2 * mean ||grad_x D(x)||^2, applied lazily every r1_every D steps
    # and scaled by r1_every (StyleGAN2's lazy regularisation: the same average penalty, 1/r1_every the cost).
    r1_gamma: float = 0.0  # 0: off
    r1_every: int = 16
    # Mode-seeking term in G's loss (Mao et al. 2019; losses.mode_seeking), weight; 0: off. G's samples come in
    # pairs that share their class (self-conditioned: z[:, 0]; conditional: the label) and differ in noise.
    mode_seeking: float = 0.0

    def __post_init__(self) -> None:
        choices.LOSSES.check(self.kind)
        if not 0.5 < self.real_label <= 1.0:
            raise ConfigError(f"loss.real_label: {self.real_label} is not allowed; must be in (0.5, 1]")
        _positive("loss.gp_weight", self.gp_weight, allow_zero=True)
        _positive("loss.r1_gamma", self.r1_gamma, allow_zero=True)
        _positive("loss.r1_every", self.r1_every)
        _positive("loss.mode_seeking", self.mode_seeking, allow_zero=True)


@dataclass
class OptimConfig:
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    d_steps: int = 1  # the G is updated every d_steps iterations (wgan-gp's n_critic, e.g. 5)

    def __post_init__(self) -> None:
        _positive("optim.lr_g", self.lr_g)
        _positive("optim.lr_d", self.lr_d)
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"optim.{key}: {getattr(self, key)} is not allowed; must be in [0, 1)")
        _positive("optim.d_steps", self.d_steps)


COMPILE_MODES = ("default", "reduce-overhead")


@dataclass
class TrainConfig:
    batch_size: int = 100  # global: summed over all processes
    epochs: int = 200
    steps: int | None = None  # optional cap on iterations (one batch: a D update, plus a G update every d_steps)
    max_seconds: float | None = None  # wall-clock budget: stop cleanly, checkpoint, exit 0
    precision: str = "auto"  # auto | no | fp16 | bf16
    resume: str = "auto"  # auto | never | path to a checkpoint directory
    reuse_fake: bool = True  # G step reuses the D step's G forward (as PyTorch's DCGAN example) instead of a new one
    compile: bool = False  # torch.compile G and D
    # default | reduce-overhead: the latter also captures the compiled G and D in CUDA graphs, removing
    # kernel-launch overhead (the MLP GAN at batch 100 is launch-bound on GPUs); CUDA only; docs/gpus.md
    compile_mode: str = "default"
    threads: int | None = None  # torch intra-op threads per process; null: cores / local processes
    check_consistency: bool = False  # also verify identical weights on all ranks at every log step
    # Seconds a process waits in a collective for the others before it fails with one line (a stalled
    # rank: stopped, swapping, stuck on I/O). Covers set-up waits too (download, evaluator training).
    collective_timeout_s: float = 600.0
    # Non-finite losses or weights (docs/faults.md): `stop` (exit 3, the newest checkpoint is the resume
    # point) or `rollback`: reload the newest checkpoint, multiply both learning rates by
    # rollback_lr_factor and go on, at most max_rollbacks times in the run, then stop.
    on_nonfinite: str = "stop"
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3

    def __post_init__(self) -> None:
        if self.precision == "False":  # YAML 1.1 reads a bare `no` as false; the field's type makes it "False"
            self.precision = "no"
        _positive("train.batch_size", self.batch_size)
        _positive("train.epochs", self.epochs)
        _positive("train.steps", self.steps, allow_none=True)
        _positive("train.max_seconds", self.max_seconds, allow_none=True)
        _positive("train.threads", self.threads, allow_none=True)
        _positive("train.collective_timeout_s", self.collective_timeout_s)
        _choice("train.on_nonfinite", self.on_nonfinite, ("stop", "rollback"))
        if not 0.0 < self.rollback_lr_factor < 1.0:
            raise ConfigError(f"train.rollback_lr_factor: {self.rollback_lr_factor} is not allowed; must be in (0, 1)")
        _positive("train.max_rollbacks", self.max_rollbacks, allow_zero=True)
        _choice("train.precision", self.precision, ("auto", "no", "fp16", "bf16"))
        _choice("train.compile_mode", self.compile_mode, COMPILE_MODES)
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"train.compile_mode: {self.compile_mode} needs train.compile=true")
        if not self.resume:
            raise ConfigError("train.resume: empty is not allowed; use auto, never or a checkpoint path")


@dataclass
class CheckpointConfig:
    every: int = 2000  # steps between checkpoints (one is also written at the end)
    keep: int = 3  # complete checkpoints kept, newest first

    def __post_init__(self) -> None:
        _positive("checkpoint.every", self.every)
        _positive("checkpoint.keep", self.keep)


@dataclass
class LogConfig:
    every: int = 50  # steps between metrics lines
    sample_every: int = 500  # steps between fixed-noise grids
    n_samples: int = 64  # images in each grid
    # Where metrics, grids and plots go besides metrics.jsonl: tracking.TRACKERS (wandb, tensorboard, mlflow).
    trackers: list[str] = field(default_factory=lambda: ["wandb"])
    wandb: str = "auto"  # auto | online | offline | disabled (with "wandb" in log.trackers)
    project: str = "gan-ddp"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    # At the end of a run: plots/*.png and samples/progress.gif (to the trackers too). false skips them (~0.7 CPU-s,
    # as much for a 10-step run as for a long one: many short runs); `gan-ddp plot` and `animate` write them later.
    plots: bool = True

    def __post_init__(self) -> None:
        _positive("log.every", self.every)
        _positive("log.sample_every", self.sample_every)
        _positive("log.n_samples", self.n_samples)
        _choice("log.wandb", self.wandb, WANDB_MODES)
        known = choices.TRACKERS
        for name in self.trackers:
            known.check(name)
        if len(set(self.trackers)) != len(self.trackers):
            raise ConfigError(f"log.trackers: {list(self.trackers)} names a tracker twice")


@dataclass
class EMAConfig:
    enabled: bool = True  # keep an EMA of G; grids, `sample` and evaluation use it unless told otherwise
    decay: float = 0.999
    rampup: bool = True  # beta_t = min(decay, (1 + t) / (10 + t)): forget the random init quickly

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"ema.decay: {self.decay} is not allowed; must be in (0, 1)")


@dataclass
class EvalConfig:
    every: int | None = None  # steps between FID/coverage evaluations during training; null: never
    n: int = 10000  # generated samples per evaluation
    seed: int = 0  # noise seed: every evaluation scores the same latent vectors
    batch: int = 500  # samples per generator forward
    cache_dir: str | None = None  # evaluator cache; null: $GAN_DDP_CACHE or ~/.cache/gan-ddp
    evaluator: str = "cnn"  # feature network: cnn, or mlp (a second, independent classifier)

    def __post_init__(self) -> None:
        _positive("eval.every", self.every, allow_none=True)
        if self.n < MIN_EVAL_SAMPLES:  # also rejects 0 and negatives
            raise ConfigError(f"eval.n: {self.n} is not allowed; must be >= {MIN_EVAL_SAMPLES} (precision and recall)")
        _positive("eval.batch", self.batch)
        choices.EVALUATORS.check(self.evaluator)


@dataclass
class SelfCondConfig:
    """When a self-conditioned model (model.clusters > 0) re-clusters D's features of real images."""

    start: int = 1000  # the first clustering, at this step (until then: one class, an unconditional GAN)
    every: int = 2000  # then every this many steps
    images: int = 10000  # training images clustered (a fixed random subset)
    iters: int = 20  # k-means iterations per clustering

    def __post_init__(self) -> None:
        for key in ("start", "every", "images", "iters"):
            _positive(f"selfcond.{key}", getattr(self, key))

    def due(self, step: int) -> bool:
        return step == self.start or (step > self.start and (step - self.start) % self.every == 0)


@dataclass
class AugmentConfig:
    # Differentiable augmentation of everything D sees (DiffAugment, Zhao et al. 2020), real and fake alike,
    # in the D and the G step: a comma-separated list of ops from choices.AUGMENT_OPS, "" (off) by default.
    #   translation: shift by up to 1/8 of the image (4 px at 28) each way, background filled in;
    #   cutout: blank a random square of half the image side (14 px).
    policy: str = ""
    p: float = 1.0  # probability that each op is applied to each image (DiffAugment itself: always)

    def __post_init__(self) -> None:
        known = choices.AUGMENT_OPS
        unknown = [op for op in self.ops() if op not in known]
        if unknown:
            raise ConfigError(
                f"augment.policy: {unknown[0]!r} is not allowed; use a comma-separated list of "
                f"{', '.join(known.names())}, or an empty string for none"
            )
        if not 0.0 < self.p <= 1.0:
            raise ConfigError(f"augment.p: {self.p} is not allowed; must be in (0, 1]")

    def ops(self) -> list[str]:
        return [op.strip() for op in self.policy.split(",") if op.strip()]


@dataclass
class RunConfig:
    dir: str = "runs/default"


@dataclass
class Config:
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    selfcond: SelfCondConfig = field(default_factory=SelfCondConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:  # what NumPy's seeding takes; torch's would wrap a negative one silently
            raise ConfigError(f"seed: {self.seed} is not allowed; must be an integer in [0, 2**32)")
        loss = choices.LOSSES[self.loss.kind]
        arch = choices.ARCHS[self.model.arch]
        if loss.per_sample_penalty and "d_batchnorm" in arch.options and self.model.d_batchnorm:
            raise ConfigError(
                f"model.d_batchnorm: must be false with loss.kind={self.loss.kind} (the penalty is per sample)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _section_keys(path: str) -> list[str]:
    """All dotted keys of the config tree under `path` ('' for the root), for 'did you mean' hints."""
    node: Any = Config
    for part in filter(None, path.split(".")):
        node = {f.name: f for f in fields(node)}[part].default_factory  # type: ignore[misc]
    return [f.name for f in fields(node)]


def _all_keys(cls: Any = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += _all_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _translate(exc: OmegaConfBaseException, source: str, key_hint: str = "?") -> ConfigError:
    """One line from OmegaConf's multi-line errors: the key, what was wrong, what is allowed."""
    key = getattr(exc, "full_key", None) or key_hint
    if isinstance(exc, ConfigKeyError):
        candidates = _all_keys() + [f.name for f in fields(Config)]
        close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
        section = key.rpartition(".")[0]
        try:
            nearby = _section_keys(section)
            nearby_text = f"; keys in {section or 'the top level'}: {', '.join(nearby)}"
        except (KeyError, TypeError):
            nearby_text = ""
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        return ConfigError(f"{source}: unknown key '{key}'{hint}{nearby_text}")
    if isinstance(exc, ValidationError):
        first = one_line(exc, first_line=True)
        match = re.search(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", first)
        if match:
            return ConfigError(f"{source}: {key}={match.group(1)!r} is not a valid {match.group(3).lower()}")
        return ConfigError(f"{source}: {key}: {first}")
    if key in [f.name for f in fields(Config)] and key != "seed":
        return ConfigError(f"{source}: {key} is a section; set its keys, e.g. {key}.{_section_keys(key)[0]}=...")
    return ConfigError(f"{source}: {key}: {one_line(exc, first_line=True)}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides; validated; returns the dataclass tree."""
    schema = OmegaConf.structured(Config)
    merged = schema
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # yaml.YAMLError and friends
            raise ConfigError(f"{path}: not valid YAML: {one_line(exc, first_line=True)}") from None
        top = yaml.safe_load(path.read_text())
        if top is None:  # an empty file (or only comments): surely not the config that was meant
            raise ConfigError(f"{path}: the file is empty; a config sets at least one section (see configs/)")
        if (top is not None and not isinstance(top, dict)) or any(v is None for v in (top or {}).values()):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (seed, run, data, train, ...)")
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as exc:
            raise _translate(exc, str(path)) from None
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.batch_size=128")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _translate(exc, f"override {item!r}", key_hint=item.split("=", 1)[0]) from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _translate(exc, "config") from None
    assert isinstance(cfg, Config)
    return cfg


def save_config(cfg: Config, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config (plus run facts such as the chosen precision) as YAML."""
    data = cfg.to_dict()
    if extra:
        data["resolved"] = extra
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.create(data)))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from a saved `config.yaml` (ignoring the `resolved` facts)."""
    data = {k: v for k, v in data.items() if k != "resolved"}
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _translate(exc, "saved config") from None
