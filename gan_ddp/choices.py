"""The values of every config key that chooses an implementation, and the facts about each that a config is
checked against, declared without torch so that a config is read and checked in a fraction of a second.

    key               values                   facts the config checks
    data.dataset      mnist, fashion_mnist     DatasetSpec (all of it: a dataset is data, not code)
    model.arch        mlp, dcgan               ArchSpec.options: the `model.*` keys that shape its parameters
    loss.kind         bce, hinge, wgan-gp      LossSpec.per_sample_penalty: D must not mix samples
    eval.evaluator    cnn, mlp                 -
    augment.policy    translation, cutout      -
    log.trackers      wandb, tensorboard,      - (a list: any of them)
                      mlflow

The first value of a key is its default. The code behind each value registers under the same name beside it,
in a `registry.Registry` of the key (`components.losses.LOSSES`, `components.models.ARCHS`,
`components.augment.AUGMENT_OPS`, `evaluation.evaluator.EVALUATORS`, `runtime.tracking.TRACKERS`); a name not
declared here is refused there, and a fact declared here that the implementation also carries must agree with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gan_ddp.registry import Choices


@dataclass(frozen=True)
class DatasetSpec:
    """One `data.dataset`: an MNIST-format dataset (IDX files, 28x28 grey images, labels 0..9)."""

    site: str  # where users get the files, for error messages
    folders: tuple[str, ...]  # under data.root, in search order; the torchvision class's <name>/raw among them
    torchvision: str  # the torchvision.datasets class that downloads it
    install_hint: str = ""  # another way to get the files, for error messages
    bundled: bool = False  # the package carries its test split (data.root=bundled, data.fallback=bundled)


@dataclass(frozen=True)
class ArchSpec:
    """One `model.arch`, as the config sees it."""

    options: tuple[str, ...]  # the shape-setting `model.*` keys this arch reads, beyond z_dim


@dataclass(frozen=True)
class LossSpec:
    """One `loss.kind`, as the config sees it."""

    # D's loss also takes a gradient penalty computed per sample: D must not mix samples (no BatchNorm).
    per_sample_penalty: bool = False


DATASETS: Choices[DatasetSpec] = Choices(
    "data.dataset",
    {
        "mnist": DatasetSpec(site="MNIST", folders=("", "MNIST/raw", "mnist"), torchvision="MNIST", bundled=True),
        "fashion_mnist": DatasetSpec(
            site="Fashion-MNIST",
            folders=("", "FashionMNIST/raw", "fashion-mnist", "fashion_mnist"),
            torchvision="FashionMNIST",
            install_hint=(
                "on Debian: apt-get install dataset-fashion-mnist, then data.root=/usr/share/datasets/fashion-mnist"
            ),
        ),
    },
)
ARCHS: Choices[ArchSpec] = Choices(
    "model.arch",
    {"mlp": ArchSpec(options=("g_hidden", "d_hidden")), "dcgan": ArchSpec(("g_channels", "d_channels", "d_batchnorm"))},
)
LOSSES: Choices[LossSpec] = Choices(
    "loss.kind",
    {"bce": LossSpec(), "hinge": LossSpec(), "wgan-gp": LossSpec(per_sample_penalty=True)},
)
EVALUATORS: Choices[None] = Choices("eval.evaluator", dict.fromkeys(("cnn", "mlp")))
AUGMENT_OPS: Choices[None] = Choices("augment.policy", dict.fromkeys(("translation", "cutout")))
TRACKERS: Choices[None] = Choices("log.trackers", dict.fromkeys(("wandb", "tensorboard", "mlflow")))
