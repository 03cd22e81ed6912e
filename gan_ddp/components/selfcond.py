"""Self-conditioned GAN (Liu et al., "Diverse Image Generation via Self-Conditioned GANs", CVPR 2020).

No labels: the classes of a class-conditional GAN are k-means clusters of the discriminator's own features of
real images, re-clustered as D learns. The conditional machinery (`model.conditional`: conditional BatchNorm
in G, a projection D) then gets the head start labels give it, with classes the model found itself.

`model.clusters: k` builds conditional networks over k classes (gan_ddp.components.models.build_models):
- `SelfConditionedDiscriminator` (around a projection D) holds the k centroids (a buffer, so checkpoints,
  resumes and rollbacks carry them). A real image, passed with label -1 (or no label), is scored as the cluster
  nearest to its features (cosine); a fake one as the class its generator was asked for.
- The generator is unconditional from outside: `G(z)` picks the class from z itself, by the quantile of
  z[:, 0] under the clusters' frequencies (`quantile_labels`; G's buffer `prior`). Every sampler, evaluator, grid
  and export that draws from an unconditional G therefore draws clusters in proportion to the data, and the
  trainer can tell D which class a fake was asked for (`labels(z)`) without another random stream.
  Before the first clustering every image is cluster 0: the model trains as an unconditional GAN.
- `Clusterer` re-clusters every `selfcond.every` steps (trainer's call): D's features of a fixed subset of
  the training images, spherical k-means warm-started from the current centroids, so cluster i stays
  cluster i from one clustering to the next (the paper matches clusters across re-clusterings instead).

k-means is written here (about 30 lines of torch) because the well-kept implementations (scikit-learn,
faiss) would be a new, large dependency for one call on a (10,000 x 3,136) matrix, and would move the
features off the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from gan_ddp.components.data import normalize

UNASSIGNED = -1  # the label of a real image: D assigns its cluster


def quantile_labels(z: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """(B,) classes for noise z (B, z_dim): the quantile of z[:, 0] ~ N(0, 1) under the CDF of `prior` (k,),
    so class c comes with probability prior[c], and never one of probability 0."""
    u = torch.special.ndtr(z[:, 0].float()).contiguous()
    cdf = torch.cumsum(prior.float(), 0)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=prior.numel() - 1)


class SelfConditionedDiscriminator(nn.Module):
    """A projection discriminator with k classes whose real images' classes are the nearest centroid."""

    def __init__(self, inner: nn.Module, clusters: int) -> None:
        super().__init__()
        self.inner = inner
        self.clusters = clusters
        self.register_buffer("centroids", torch.zeros(clusters, inner.embed.embedding_dim))  # unit rows once set

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.features(x)

    def assign(self, phi: torch.Tensor) -> torch.Tensor:
        """(B,) nearest centroid (cosine) of features phi (B, width); all 0 before the first clustering."""
        return (F.normalize(phi.detach().float(), dim=1) @ self.centroids.t()).argmax(1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        phi = self.inner.features(x)
        y = self.assign(phi) if y is None else torch.where(y < 0, self.assign(phi), y)
        return self.inner.head(phi, y)


@torch.no_grad()
def spherical_kmeans(
    x: torch.Tensor, k: int, iters: int, generator: torch.Generator, init: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on unit rows x (n, d) with cosine similarity: (centroids (k, d) unit rows, labels (n,)).
    `init`: starting centroids (the previous clustering); None: k-means++ seeding from `generator`."""
    n = x.size(0)
    if init is None:
        centroids = x[torch.randint(n, (1,), generator=generator, device=generator.device).to(x.device)]
        far = (2 - 2 * x @ centroids.t()).clamp_(min=0).squeeze(1)  # squared distance to the nearest centroid
        for _ in range(1, k):
            pick = torch.multinomial(far.add(1e-12).to(generator.device), 1, generator=generator).to(x.device)
            centroids = torch.cat([centroids, x[pick]])
            far = torch.minimum(far, (2 - 2 * x @ x[pick].t()).clamp_(min=0).squeeze(1))
    else:
        centroids = init.to(x)
    for _ in range(iters):
        sim = x @ centroids.t()
        best, labels = sim.max(1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):  # an empty cluster takes the points worst served by theirs
            sums[empty] = x[best.argsort()[: len(empty)]]
        centroids = F.normalize(sums, dim=1)
    return centroids, (x @ centroids.t()).argmax(1)


@dataclass
class Clustering:
    """One re-clustering's outcome, for the log line."""

    step: int
    sizes: list[int]  # images per cluster, of the clustered subset
    moved: float | None  # share of the subset whose cluster changed since the last clustering (None: first)

    def line(self) -> str:
        p = torch.tensor(self.sizes, dtype=torch.float64) / max(1, sum(self.sizes))
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
        moved = "" if self.moved is None else f", {self.moved:.1%} moved"
        return (
            f"clusters at step {self.step}: sizes {min(self.sizes)}-{max(self.sizes)}, entropy {entropy:.2f} nats"
            f" (uniform {torch.tensor(float(len(self.sizes))).log():.2f}){moved}"
        )


class Clusterer:
    """Re-clusters D's features of a fixed subset of the training images into G's and D's buffers."""

    def __init__(self, images: torch.Tensor, clusters: int, count: int, iters: int, seed: int) -> None:
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[: min(count, len(images))]
        self.images = images[pick.to(images.device)]  # uint8 (m, 1, 28, 28) of images (N, 1, 28, 28), on their device
        self.clusters, self.iters, self.seed = clusters, iters, seed
        self.labels: torch.Tensor | None = None  # of the last clustering in this process (for `moved`)

    @torch.no_grad()
    def recluster(self, G: nn.Module, D: SelfConditionedDiscriminator, step: int, batch: int = 1000) -> Clustering:
        """Cluster D's features of the subset (D in eval mode: BatchNorm's running statistics, no update)."""
        training = D.training
        D.eval()
        try:
            device = D.centroids.device
            phi = [
                D.features(normalize(self.images[i : i + batch].to(device))).float()
                for i in range(0, len(self.images), batch)
            ]
        finally:
            D.train(training)
        x = F.normalize(torch.cat(phi), dim=1)
        generator = torch.Generator(device=x.device).manual_seed(self.seed * 1_000_003 + step)
        clustered = bool(D.centroids.abs().sum() > 0)  # on resume too: the checkpoint holds the centroids
        centroids, labels = spherical_kmeans(
            x, self.clusters, self.iters, generator, init=D.centroids if clustered else None
        )
        sizes = torch.bincount(labels, minlength=self.clusters)
        D.centroids.copy_(centroids)
        G.prior.copy_(sizes.to(G.prior) / sizes.sum())
        moved = None if self.labels is None else float((labels != self.labels).float().mean())
        self.labels = labels
        return Clustering(step, sizes.tolist(), moved)
