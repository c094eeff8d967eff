"""The host table: which library a model comes from, and that library's ``Host`` (see ``hosts.base``).

One row per host library: the package its model classes live in, and the module of its host. A host module is
imported the first time a model of its library is seen, so transformers and open_clip are needed only by those
who use them.

Adding a host: a module ``pm_kernels/hosts/<library>.py`` defining ``HOST`` (a ``Host`` subclass instance), and
a row here. A library whose models need two hosts (timm's and transformers' SAM encoders next to their ViTs)
lists them all in the module's ``HOSTS``; a model goes to the first that supports it.
"""
import importlib
from typing import Dict, List, Tuple

from torch import nn

from .base import Host, resolve_task

__all__ = ["HOSTS", "Host", "host_of", "layer_body", "patch", "resolve"]

# library package → host module (imported on first use)
HOSTS: Dict[str, str] = {
    "timm": "pm_kernels.hosts.timm",
    "transformers": "pm_kernels.hosts.transformers",
    "open_clip": "pm_kernels.hosts.open_clip",
}
_LOADED: Dict[str, Tuple[Host, ...]] = {}


def _hosts(package: str) -> Tuple[Host, ...]:
    """The hosts of a library: its module's ``HOSTS``, or its one ``HOST`` (the library's main host first)."""
    if package not in _LOADED:
        module = importlib.import_module(HOSTS[package])
        _LOADED[package] = tuple(getattr(module, "HOSTS", (module.HOST,)))
    return _LOADED[package]


def _libraries(model: nn.Module) -> List[str]:
    """The host libraries ``model``'s class (or a base class of it) comes from, nearest first."""
    found = []
    for cls in type(model).__mro__:  # a PM class derives from its host's class: the host is found through it
        package = (cls.__module__ or "").split(".")[0]
        if package in HOSTS and package not in found:
            found.append(package)
    return found


def host_of(model) -> Host:
    """The host of ``model`` (a model of a supported library, patched or not); TypeError naming the class and
    why when there is none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a timm, transformers or open_clip ViT), "
                        f"got {type(model).__name__}")
    libraries = _libraries(model)
    for package in libraries:
        for host in _hosts(package):
            if host.supports(model):
                return host
    if libraries:
        raise TypeError(f"model: {_hosts(libraries[0])[0].explain_unsupported(model)}")
    raise TypeError(f"model: {type(model).__name__} is not a model of a library pm_kernels supports "
                    f"({', '.join(HOSTS)}): expected a ViT from one of them")


def resolve(model) -> Tuple[Host, nn.Module]:
    """(host, backbone): the host of ``model``, or of the backbone a task model names (``pm_backbone``)."""
    backbone, _ = resolve_task(model)
    return host_of(backbone), backbone


def patch(model):
    """Make ``model`` (a supported timm, transformers or open_clip ViT, or a task model such as a
    ``pm_kernels.Segmenter``) a Prune-and-Merge model in place, with the identity structure (the dense model:
    outputs equal the model's), and return it. A model already patched keeps its structure."""
    host, backbone = resolve(model)
    if not host.is_patched(backbone):
        host.patch(backbone)
    return model


def layer_body(layer: nn.Module):
    """z → the pre-norm body of a supported host's plain (unpatched) layer, e.g. a timm ``Block``."""
    for package in _libraries(layer):
        for host in _hosts(package):
            body = host.layer_body(layer)
            if body is not None:
                return body
    raise TypeError(f"block: expected a PM layer or a supported host's pre-norm layer (e.g. a timm Block), "
                    f"got {type(layer).__name__}")
