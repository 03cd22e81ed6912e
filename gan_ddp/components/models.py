"""Generator / discriminator architectures for 28x28 MNIST.

Both discriminators return raw LOGITS of shape (B,): the sigmoid lives inside the loss
(``BCEWithLogits``), which is numerically stable under AMP, and hinge / WGAN losses need
unbounded scores anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from gan_ddp.components.selfcond import SelfConditionedDiscriminator, quantile_labels
from gan_ddp.registry import Registry

if TYPE_CHECKING:
    from gan_ddp.config import ModelConfig

IMG_SHAPE = (1, 28, 28)
IMG_NUMEL = 28 * 28
N_CLASSES = 10  # MNIST and Fashion-MNIST both have ten

# Class-conditional models (``model.conditional: true``) take labels as a second input, ``y``: either class
# indices (B,) int64, or class weights (B, N_CLASSES) float, a soft label that mixes the classes' embeddings
# (`interpolate --classes A B` walks from one class to another this way).
#   G, MLP: the one-hot (or soft) label is concatenated to z, as in the original cGAN (Mirza & Osindero 2014):
#     the first layer then adds a learned per-class vector, the most an MLP without normalisation can take.
#   G, DCGAN: conditional BatchNorm (de Vries et al. 2017; Miyato & Koyama 2018; BigGAN): every BatchNorm
#     normalises without its own affine and applies a per-class gain and bias. The class acts at every
#     resolution instead of only at the input, which is what projection-discriminator GANs pair with.
#   D, both: a projection discriminator (Miyato & Koyama 2018): logit = psi(phi(x)) + <embed(y), phi(x)>,
#     with phi(x) the features the unconditional D already computes before its last linear layer. It scores
#     "is this a real image of class y" as one inner product, needs no change to the loss, and beat
#     concatenating the label to D's input (or to a hidden layer) and the auxiliary-classifier (AC-GAN) D,
#     which pushes G towards easily classified, less diverse samples, in that paper's comparisons.


def _class_weights(y: torch.Tensor, dtype: torch.dtype, classes: int = N_CLASSES) -> torch.Tensor:
    """(B, classes) weights from class indices (B,) or soft labels (B, classes)."""
    if y.dim() == 1:
        return nn.functional.one_hot(y.long(), classes).to(dtype)
    if y.dim() == 2 and y.size(1) == classes:
        return y.to(dtype)
    raise ValueError(f"labels must be (B,) class indices or (B, {classes}) class weights, got {tuple(y.shape)}")


def _embed(table: nn.Embedding, y: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` for class indices, or their weighted mix for soft labels: (B, dim)."""
    if y.dim() == 1:
        return table(y.long())
    return _class_weights(y, table.weight.dtype, table.num_embeddings) @ table.weight


def _require_labels(y: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
    if y is None:
        raise ValueError("this model is class-conditional (model.conditional: true): pass labels y")
    if y.size(0) != z.size(0):
        raise ValueError(f"{y.size(0)} labels for a batch of {z.size(0)}")
    return y


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine, followed by a gain and bias looked up per class (initialised to the
    identity, gain 1 and bias 0). Works on (B, C) and (B, C, H, W)."""

    def __init__(self, features: int, two_d: bool, classes: int = N_CLASSES) -> None:
        super().__init__()
        self.bn = (nn.BatchNorm2d if two_d else nn.BatchNorm1d)(features, affine=False)
        self.gain = nn.Embedding(classes, features)
        self.bias = nn.Embedding(classes, features)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.bn(x)
        shape = (x.size(0), -1) + (1,) * (x.dim() - 2)
        return h * _embed(self.gain, y).view(shape) + _embed(self.bias, y).view(shape)


# ------------------------------------------------------------------- Hub format
class HubGenerator(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="gan-ddp",
    license="mit",
    pipeline_tag="unconditional-image-generation",
    tags=["gan", "mnist", "gan-ddp"],
):
    """A generator in the Hugging Face Hub format (huggingface_hub's `PyTorchModelHubMixin`): `save_pretrained(DIR)`
    writes `model.safetensors` and `config.json` (the `__init__` arguments, recorded by the mixin whenever the
    class is built), `from_pretrained(DIR or "user/repo")` builds the class from that config and loads the weights
    in eval mode, `push_to_hub` uploads. `gan-ddp export` adds `arch` and the run's facts to `config.json`.

    Unlike the mixin's default, loading is strict: a missing or unexpected tensor is an error, never a silently
    random layer; and a folder holding another architecture's generator is refused by name."""

    arch: str = ""  # the `model.arch` this class implements; config.json's "arch"

    @classmethod
    def _from_pretrained(cls, *, config: dict | None = None, strict: bool = True, **kwargs: Any):  # type: ignore[override]
        arch = (config or {}).get("arch")
        if arch not in (None, cls.arch):
            raise ValueError(
                f"{kwargs.get('model_id')}: config.json says arch {arch!r}; load it with "
                f"{ARCHS[arch].generator.__name__ if arch in ARCHS else 'the class for that arch'}.from_pretrained"
            )
        return super()._from_pretrained(strict=strict, **kwargs)

    # Self-conditioned (`model.clusters` k > 0, gan_ddp/components/selfcond.py): a conditional network over k
    # pseudo-classes that is unconditional from outside: G(z) picks its class from z (`labels`), in proportion
    # to the clusters' sizes (the buffer `prior`), so every sampler, evaluator and export draws it as G(z).
    clusters: int = 0

    def _init_clusters(self, clusters: int) -> int:
        """Set up the pseudo-classes; returns the number of classes the conditional layers need (0: none)."""
        self.clusters = clusters
        if clusters:
            prior = torch.zeros(clusters)
            prior[0] = 1.0  # until the first clustering: one class, an unconditional GAN
            self.register_buffer("prior", prior)
        return clusters or (N_CLASSES if self.conditional else 0)

    def labels(self, z: torch.Tensor) -> torch.Tensor:
        """Self-conditioned G: the class (B,) it draws for noise z (B, z_dim)."""
        return quantile_labels(z, self.prior)

    def _labels_for(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return _require_labels(self.labels(z) if self.clusters and y is None else y, z)


# --------------------------------------------------------------------------- MLP
class MLPGenerator(HubGenerator):
    """The classic tutorial MLP generator: z -> hidden (LeakyReLU) -> 784 -> Tanh."""

    arch = "mlp"

    def __init__(
        self, z_dim: int, hidden: list[int], leaky_slope: float = 0.2, conditional: bool = False, clusters: int = 0
    ) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.conditional = conditional
        self.classes = self._init_clusters(clusters)
        layers: list[nn.Module] = []
        width = z_dim + self.classes  # conditional: [z, one-hot label]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(leaky_slope)]
            width = h
        layers += [nn.Linear(width, IMG_NUMEL), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.classes:
            z = torch.cat([z, _class_weights(self._labels_for(z, y), z.dtype, self.classes)], dim=1)  # (B, z_dim + k)
        return self.net(z).view(z.size(0), *IMG_SHAPE)  # (B, 1, 28, 28) in [-1, 1]


class MaskDropout(nn.Dropout):
    """``nn.Dropout`` with the mask drawn by ``rand >= p`` on CPU tensors: the same distribution (keep with
    probability 1 - p, scale kept units by 1 / (1 - p)), but torch's CPU ``bernoulli_`` costs ~2.5x a
    ``rand`` of the same size, which made dropout about 15% of the whole MLP GAN step on CPU. On other
    devices, or with p = 0 or in eval mode, it is plain ``nn.Dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p > 0 and x.device.type == "cpu"):
            return super().forward(x)
        keep = torch.rand(x.shape, device=x.device).ge_(self.p)  # float32 0/1: U[0,1) >= p w.p. 1 - p
        return x * keep.mul_(1.0 / (1.0 - self.p)).to(x.dtype)


class MLPDiscriminator(nn.Module):
    """The classic tutorial MLP discriminator, minus the final Sigmoid (returns logits)."""

    def __init__(
        self,
        hidden: list[int],
        leaky_slope: float = 0.2,
        dropout: float = 0.3,
        conditional: bool = False,
        classes: int = N_CLASSES,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = IMG_NUMEL
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(leaky_slope)]
            if dropout > 0:  # 0 disables: no no-op Dropout modules cluttering the repr
                layers.append(MaskDropout(dropout))
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.embed = _projection_embedding(width, classes) if conditional else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x): (B, width), the features before the last linear layer."""
        return self.net[:-1](x.flatten(1))

    def head(self, phi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Conditional D only: the logits (B,) of features ``phi`` as class ``y``."""
        return project_features(self.net[-1], self.embed, phi, y)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return _project(self.net, self.embed, x.flatten(1), y)  # (B, 784) -> (B,) logits


# ------------------------------------------------------------------------- DCGAN
class DCGANGenerator(HubGenerator):
    """Project-and-reshape to 7x7, then two stride-2 transposed convs: 7 -> 14 -> 28."""

    arch = "dcgan"

    def __init__(self, z_dim: int, channels: int = 128, conditional: bool = False, clusters: int = 0) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.conditional = conditional
        self.classes = classes = self._init_clusters(clusters)
        g = channels
        self._base = (2 * g, 7, 7)
        # Biases are dropped wherever BatchNorm follows: BN's shift makes them redundant.
        self.project = nn.Sequential(
            nn.Linear(z_dim, 2 * g * 7 * 7, bias=False),
            nn.BatchNorm1d(2 * g * 7 * 7),
            nn.ReLU(inplace=True),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(2 * g, g, kernel_size=4, stride=2, padding=1, bias=False),  # (B, g, 14, 14)
            nn.BatchNorm2d(g),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(g, 1, kernel_size=4, stride=2, padding=1),  # (B, 1, 28, 28)
            nn.Tanh(),
        )
        if classes:  # the same layers, with each BatchNorm made class-conditional (same parameter names)
            self.project[1] = ConditionalBatchNorm(2 * g * 7 * 7, two_d=False, classes=classes)
            self.deconv[1] = ConditionalBatchNorm(g, two_d=True, classes=classes)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if not self.classes:
            h = self.project(z).view(z.size(0), *self._base)  # (B, 2g, 7, 7)
            return self.deconv(h)  # (B, 1, 28, 28) in [-1, 1]
        y = self._labels_for(z, y)
        h = self.project[2](self.project[1](self.project[0](z), y)).view(z.size(0), *self._base)
        h = self.deconv[2](self.deconv[1](self.deconv[0](h), y))  # (B, g, 14, 14)
        return self.deconv[4](self.deconv[3](h))  # (B, 1, 28, 28) in [-1, 1]


class DCGANDiscriminator(nn.Module):
    """Two stride-2 convs (28 -> 14 -> 7) and a linear head producing logits.

    ``batchnorm=False`` swaps the BN for Identity (and restores the conv bias): WGAN-GP's
    per-sample gradient penalty is invalid when BN couples samples within a batch.
    """

    def __init__(
        self,
        channels: int = 64,
        leaky_slope: float = 0.2,
        batchnorm: bool = True,
        conditional: bool = False,
        classes: int = N_CLASSES,
    ) -> None:
        super().__init__()
        d = channels
        # Not in-place: the WGAN-GP double backward must see the untouched activations.
        self.net = nn.Sequential(
            # No BN on the first layer, as in the DCGAN paper.
            nn.Conv2d(1, d, kernel_size=4, stride=2, padding=1),  # (B, d, 14, 14)
            nn.LeakyReLU(leaky_slope),
            nn.Conv2d(d, 2 * d, kernel_size=4, stride=2, padding=1, bias=not batchnorm),  # (B, 2d, 7, 7)
            nn.BatchNorm2d(2 * d) if batchnorm else nn.Identity(),
            nn.LeakyReLU(leaky_slope),
            nn.Flatten(),  # (B, 2d*7*7)
            nn.Linear(2 * d * 7 * 7, 1),
        )
        self.embed = _projection_embedding(2 * d * 7 * 7, classes) if conditional else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x): (B, 2d*7*7), the features before the last linear layer."""
        return self.net[:-1](x)

    def head(self, phi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Conditional D only: the logits (B,) of features ``phi`` as class ``y``."""
        return project_features(self.net[-1], self.embed, phi, y)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return _project(self.net, self.embed, x, y)  # (B,) logits


def _projection_embedding(width: int, classes: int = N_CLASSES) -> nn.Embedding:
    """The class embedding of a projection discriminator (Xavier-uniform, as in Miyato & Koyama's code)."""
    embed = nn.Embedding(classes, width)
    nn.init.xavier_uniform_(embed.weight)
    return embed


def _project(net: nn.Sequential, embed: nn.Embedding | None, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Logits (B,) of a D whose last layer is ``net[-1]`` (psi); with ``embed``, plus <embed(y), phi(x)>."""
    if embed is None:
        return net(x).squeeze(1)
    y = _require_labels(y, x)
    return project_features(net[-1], embed, net[:-1](x), y)  # net[:-1](x): phi, the features before psi


def project_features(psi: nn.Module, embed: nn.Embedding, phi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A projection discriminator's logits (B,) from its features phi (B, width): psi(phi) + <embed(y), phi>."""
    return psi(phi).squeeze(1) + (_embed(embed, y).to(phi.dtype) * phi).sum(1)


@torch.no_grad()
def generate(
    G: nn.Module, n: int, z_dim: int, seed: int, batch: int = 500, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """(n, 1, 28, 28) outputs of G for noise drawn on the CPU from ``seed``, ``batch`` at a time: the same
    ``seed`` gives the same latent vectors whatever ``batch`` is. ``labels`` (n,) for a conditional G.
    G's train/eval mode is the caller's."""
    gen = torch.Generator().manual_seed(seed)
    device = next(G.parameters()).device
    chunks = []
    for i in range(0, n, batch):
        z = torch.randn(min(batch, n - i), z_dim, generator=gen).to(device)
        y = None if labels is None else labels[i : i + z.size(0)].to(device)
        chunks.append(G(z) if y is None else G(z, y))
    return torch.cat(chunks)


def is_conditional(G: nn.Module) -> bool:
    """True for a class-conditional generator (possibly wrapped by DDP or torch.compile)."""
    module = getattr(G, "module", G)
    module = getattr(module, "_orig_mod", module)
    return bool(getattr(module, "conditional", False))


def balanced_labels(n: int) -> torch.Tensor:
    """Class labels 0, 1, ..., 9, 0, 1, ... for n samples: every class within one of n / 10."""
    return torch.arange(n) % N_CLASSES


def class_grid_inputs(columns: int, z_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, y) for a grid with one row per class and one noise vector per column, shared by all rows:
    z (10 * columns, z_dim), y (10 * columns,), row-major (class c, column j at c * columns + j)."""
    z = torch.randn(columns, z_dim, generator=torch.Generator().manual_seed(seed))
    return z.repeat(N_CLASSES, 1), torch.arange(N_CLASSES).repeat_interleave(columns)


def couples_batch(module: nn.Module) -> bool:
    """True if the module has a layer whose output for one sample depends on the others (BatchNorm)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def dcgan_init_(module: nn.Module) -> None:
    """DCGAN paper init: conv/linear weights ~ N(0, 0.02), BN gamma ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, ConditionalBatchNorm):  # the same, for every class's gain and bias
            nn.init.normal_(m.gain.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias.weight)


# ------------------------------------------------------------------------ architectures
@dataclass(frozen=True)
class Arch:
    """One `model.arch`: how to build (G, D), and which `model.*` keys set its parameter shapes."""

    build: Callable[[ModelConfig, bool], tuple[nn.Module, nn.Module]]  # (config, conditional) -> (G, D)
    options: tuple[str, ...]  # the shape-setting keys this arch reads, beyond z_dim
    generator: type[HubGenerator]  # its G class: `from_pretrained` loads an exported folder of this arch


ARCHS: Registry[Arch] = Registry("model.arch")


def _clusters(cfg: ModelConfig) -> int:
    return int(getattr(cfg, "clusters", 0) or 0)


def _self_conditioned(cfg: ModelConfig) -> tuple[dict[str, int], dict[str, Any]]:
    """Keywords for a self-conditioned G and D (k pseudo-classes); none otherwise, so a labelled or
    unconditional model's exported config.json is what it always was."""
    k = _clusters(cfg)
    return ({"clusters": k}, {"conditional": True, "classes": k}) if k else ({}, {})


def _build_mlp(cfg: ModelConfig, conditional: bool) -> tuple[nn.Module, nn.Module]:
    # PyTorch default init, as in the tutorials this reproduces.
    g_kw, d_kw = _self_conditioned(cfg)
    gen = MLPGenerator(cfg.z_dim, list(cfg.g_hidden), cfg.leaky_slope, conditional, **g_kw)
    disc = MLPDiscriminator(list(cfg.d_hidden), cfg.leaky_slope, cfg.dropout, **({"conditional": conditional} | d_kw))
    return gen, disc


def _build_dcgan(cfg: ModelConfig, conditional: bool) -> tuple[nn.Module, nn.Module]:
    g_kw, d_kw = _self_conditioned(cfg)
    gen = DCGANGenerator(cfg.z_dim, cfg.g_channels, conditional, **g_kw)
    disc = DCGANDiscriminator(cfg.d_channels, cfg.leaky_slope, cfg.d_batchnorm, **({"conditional": conditional} | d_kw))
    dcgan_init_(gen)
    dcgan_init_(disc)
    return gen, disc


ARCHS.add("mlp", Arch(build=_build_mlp, options=("g_hidden", "d_hidden"), generator=MLPGenerator))
ARCHS.add(
    "dcgan", Arch(build=_build_dcgan, options=("g_channels", "d_channels", "d_batchnorm"), generator=DCGANGenerator)
)


# ------------------------------------------------------------------------ public
def build_models(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """Return ``(generator, discriminator)`` for ``cfg.arch``; with ``model.clusters`` k > 0, the self-conditioned
    pair: G over k pseudo-classes, unconditional from outside; D a `selfcond.SelfConditionedDiscriminator`."""
    G, D = ARCHS[cfg.arch].build(cfg, bool(getattr(cfg, "conditional", False)))
    return (G, SelfConditionedDiscriminator(D, _clusters(cfg))) if _clusters(cfg) else (G, D)


def count_parameters(module: nn.Module) -> int:
    """Total number of parameter elements (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def model_signature(cfg: ModelConfig) -> dict[str, Any]:
    """Fields that determine parameter shapes; a checkpoint is only resumable if these match.

    Only the fields the chosen arch actually uses are included, so e.g. editing
    ``g_channels`` does not block resuming an MLP run. Dropout / leaky slope change no
    shapes and are deliberately left out. ``conditional`` appears only when true, so checkpoints written
    before it existed still match unconditional configs.
    """
    sig: dict[str, Any] = {"arch": cfg.arch, "z_dim": int(cfg.z_dim)}
    if getattr(cfg, "conditional", False):
        sig["conditional"] = True
    if getattr(cfg, "clusters", 0):  # like conditional: absent when off, so older checkpoints still match
        sig["clusters"] = int(cfg.clusters)
    for key in ARCHS[cfg.arch].options:
        value = getattr(cfg, key)  # a list of widths (OmegaConf may hand a ListConfig), a width, or a switch
        sig[key] = [int(v) for v in value] if not isinstance(value, (int, bool)) else value
    return sig
