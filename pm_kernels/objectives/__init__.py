"""Calibration objectives: the loss L whose gradient ∂L/∂A the SPEC §3 score reads, with labels or without.

The score Σ_{b,h,q} A ⊙ ∂L/∂A needs a loss. With labels it is the cross-entropy (per pixel for a ``Segmenter``).
Without labels (a CLIP / DINOv2 tower, a timm model with ``num_classes=0``, a Segmenter's backbone before its
decoder exists) the loss is built from the dense model itself. A distillation loss to the dense model (KL, or
MSE to its own features) does not work: at the identity structure the student is the teacher, and its gradient
is zero. Every objective here has a target that differs from the scored output.

    name               needs           target (from the dense model, no grad)        loss
    labels             a head          the batch's labels                            CE (Segmenter: per pixel)
    pseudo_labels      a head          argmax of the dense logits                    CE(logits, argmax)
    kmeans             -               nearest of k centroids of dense features      CE(cos(f, centroids) / τ, target)
    self_distillation  -               dense features of the clean image             1 − cos(f(perturbed), target)
    feature_norm       -               none                                          ½ · mean ‖f‖²
    ImageText(...)     a text encoder  text features of captions / prompts (dense)   CLIP or SigLIP image–text loss

``f`` is the model's pooled embedding (``level="pooled"``: the pre-logits vector, CLS or average pool as the
model pools) or its final patch tokens (``level="tokens"``). ``kmeans`` fits its centroids (spherical k-means)
on the first ``fit_images`` images of the calibration stream; those images are scored as well.
Image-only batches with no objective chosen (``DEFAULT_UNLABELLED``): ``pseudo_labels`` where the model has a
head (a classifier, a Segmenter's decoder), else ``kmeans`` on the pooled embedding: on the digits tasks the
closest to labelled calibration with a head, and the best without one (bench/results/calibration_objectives/).

Interface (what ``calibrate`` calls)
    objective, scoring = resolve_objective(model, batches, objective=None, loss_fn=None)
    for inputs, targets in scoring:             # the dense model's targets (no grad), or the batch's labels
        loss = objective.loss(objective.forward(model, inputs), targets)     # the scored forward, then backward

``batches`` yields image tensors (B, C, H, W), 1-tuples ``(images,)`` or pairs ``(images, targets)``.
``objective``: None (labels when the first batch carries targets, else ``default_objective``), a name above,
or an ``Objective``; ``loss_fn(outputs, targets)`` overrides it (``model(images)`` is scored, targets may be None).
``resolve_objective`` peeks at the first batch, fits what the objective needs on the dense model (eval mode, no
grad) and returns a lazy iterator: each later batch costs one extra no-grad forward for its targets, and a
one-pass loader is read once. ``inputs`` may differ from the images (``self_distillation`` perturbs them).

``pm_kernels.calibrate(model, batches, objective=...)`` runs exactly this loop, with the score hooks in place.

Every read of a timm / Segmenter attribute is in ``model_view`` (the host layer can route it).
"""
from .base import CustomLoss, Labels, ModelView, Objective, PseudoLabels, model_view
from .features import FeatureNorm, KMeansTargets, SelfDistillation, spherical_kmeans
from .image_text import ImageText
from .resolve import DEFAULT_UNLABELLED, OBJECTIVES, default_objective, resolve_objective

__all__ = ["Objective", "Labels", "CustomLoss", "PseudoLabels", "KMeansTargets", "SelfDistillation", "FeatureNorm",
           "ImageText", "ModelView", "model_view", "resolve_objective", "default_objective", "OBJECTIVES",
           "DEFAULT_UNLABELLED", "spherical_kmeans"]
