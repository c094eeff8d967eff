"""Label-free objectives built from the dense model's features: k-means classes, self-distillation under a
perturbation, the features' norm. See ``pm_kernels.objectives``."""
from typing import Optional

import torch
import torch.nn.functional as F

from .base import Objective, check_level, model_view, positive_float, positive_int

__all__ = ["spherical_kmeans", "KMeansTargets", "SelfDistillation", "FeatureNorm", "PERTURBATIONS"]


def _flat(features: torch.Tensor) -> torch.Tensor:
    return features.reshape(-1, features.shape[-1])


def spherical_kmeans(points: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """(k, C) unit centroids of the unit rows of ``points`` (cosine k-means, k-means++ seeding, fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(points.detach().double().cpu(), dim=1)
    centroids = [x[torch.randint(len(x), (1,), generator=gen)]]
    for _ in range(1, k):  # k-means++: next seed drawn with probability ∝ squared distance to the nearest seed
        dist = (2 - 2 * (x @ torch.cat(centroids).T).max(dim=1).values).clamp_min(0)
        pick = torch.multinomial(dist, 1, generator=gen) if dist.sum() > 0 else torch.randint(len(x), (1,),
                                                                                              generator=gen)
        centroids.append(x[pick])
    c = torch.cat(centroids)
    assign = None
    for _ in range(iters):
        new = (x @ c.T).argmax(dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = sums.norm(dim=1) == 0
        if empty.any():  # an empty cluster takes the points farthest from their centroid
            far = (x * c[assign]).sum(1).argsort()[:int(empty.sum())]
            sums[empty] = x[far]
        c = F.normalize(sums, dim=1)
    return c.float()


class KMeansTargets(Objective):
    """k clusters of the dense features as classes: CE(cos(f, centroids) / τ, the dense feature's cluster)."""

    name = "kmeans"

    def __init__(self, clusters: int = 16, level: str = "pooled", temperature: float = 0.1, fit_images: int = 256,
                 iters: int = 30, seed: int = 0):
        self.clusters = positive_int("clusters", clusters)
        self.level = check_level(level)
        self.temperature = positive_float("temperature", temperature)
        self.fit_images = positive_int("fit_images", fit_images)
        self.iters, self.seed = positive_int("iters", iters), seed
        self.centroids: Optional[torch.Tensor] = None

    def prepare(self, view, images):
        points = _flat(torch.cat([view.features(x, self.level) for x in images.split(64)]))
        if len(points) < self.clusters:
            raise ValueError(f"batches: k-means with clusters={self.clusters} needs at least {self.clusters} "
                             f"feature vectors; the {len(images)} images before scoring give {len(points)} "
                             f"(pass more images, fewer clusters or level='tokens')")
        self.centroids = spherical_kmeans(points, self.clusters, self.iters, self.seed).to(images.device)

    def _logits(self, features):
        return F.normalize(_flat(features).float(), dim=1) @ self.centroids.T / self.temperature

    def targets(self, view, images, given):
        return self._logits(view.features(images, self.level)).argmax(dim=1)

    def forward(self, model, inputs):
        return model_view(model).features(inputs, self.level)

    def loss(self, outputs, targets):
        if self.centroids is None:
            raise RuntimeError("kmeans: prepare() has not run (use resolve_objective)")
        return F.cross_entropy(self._logits(outputs), targets)

PERTURBATIONS = ("mask", "noise")


class SelfDistillation(Objective):
    """1 − cos(f(perturbed images), f_dense(images)), averaged: the features of a perturbed view pulled toward the
    dense features of the clean image (the perturbation makes the gradient non-zero at the identity).
    ``perturbation="mask"``: a random ``mask_ratio`` of the patches set to 0 (the normalised mean) in pixel
    space; ``"noise"``: Gaussian noise of ``noise_std`` × the batch's pixel std."""

    name = "self_distillation"

    def __init__(self, perturbation: str = "mask", mask_ratio: float = 0.5, noise_std: float = 0.5,
                 level: str = "pooled", seed: int = 0):
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation: expected one of {', '.join(map(repr, PERTURBATIONS))}, "
                             f"got {perturbation!r}")
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio: expected a number in (0, 1), got {mask_ratio!r}")
        self.perturbation, self.mask_ratio = perturbation, float(mask_ratio)
        self.noise_std = positive_float("noise_std", noise_std)
        self.level = check_level(level)
        self.generator = torch.Generator().manual_seed(seed)

    def targets(self, view, images, given):
        return view.features(images, self.level)

    def inputs(self, view, images):
        if self.perturbation == "noise":
            noise = torch.randn(images.shape, generator=self.generator).to(images)
            return images + self.noise_std * images.std() * noise
        (ph, pw), (H, W) = view.patch_size, images.shape[-2:]
        gh, gw = -(-H // ph), -(-W // pw)
        n_masked = max(1, round(self.mask_ratio * gh * gw))
        order = torch.rand(images.shape[0], gh * gw, generator=self.generator).argsort(dim=1)
        keep = torch.ones(images.shape[0], gh * gw).scatter_(1, order[:, :n_masked], 0.0)
        keep = keep.view(-1, 1, gh, gw).repeat_interleave(ph, 2).repeat_interleave(pw, 3)[..., :H, :W]
        return images * keep.to(images)

    def forward(self, model, inputs):
        return model_view(model).features(inputs, self.level)

    def loss(self, outputs, targets):
        return (1 - F.cosine_similarity(outputs.float(), targets.float(), dim=-1)).mean()


class FeatureNorm(Objective):
    """½ · mean ‖f‖²: no target at all (a baseline: which tokens the features' magnitude depends on)."""

    name = "feature_norm"

    def __init__(self, level: str = "pooled"):
        self.level = check_level(level)

    def forward(self, model, inputs):
        return model_view(model).features(inputs, self.level)

    def loss(self, outputs, targets):
        return 0.5 * outputs.float().pow(2).sum(-1).mean()
