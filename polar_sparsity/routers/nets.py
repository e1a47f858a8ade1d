"""Router networks: plain ``nn.Module``s that map a layer's router input (..., d) to logits (..., units).

No Hydra or Lightning here: the bundle loader rebuilds these from a class path and JSON kwargs.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

_ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class HeadRouter(nn.Module):
    """Linear d -> units (heads, or KV groups for GQA) with bias: the paper's attention router."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MlpRouter(nn.Module):
    """Low-rank d -> hidden -> neurons without biases: the paper's (Deja Vu style) MLP router."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 1024,
        activation: str = "none",
        norm: bool = False,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(_ACTIVATIONS)}")
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.act = _ACTIVATIONS[activation]()
        self.norm = nn.LayerNorm(hidden) if norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


# The classes a router bundle may name: the loader builds nothing else, and checks this before it
# imports anything (a bundle's metadata must not make it import arbitrary installed modules).
ROUTER_CLASSES = {
    f"{__name__}.HeadRouter": HeadRouter,
    f"{__name__}.MlpRouter": MlpRouter,
}


def router_class(path: str) -> type[nn.Module]:
    """One of the project's router classes by its dotted path; anything else is refused unimported."""
    if path not in ROUTER_CLASSES:
        raise ValueError(
            f"router net class {path!r} is not one of the project's routers {sorted(ROUTER_CLASSES)}"
        )
    return ROUTER_CLASSES[path]


def import_class(path: str) -> type[nn.Module]:
    """The nn.Module class named by a dotted path, with an error that names the path."""
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"router net class {path!r} cannot be imported: {error}") from error
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise ValueError(f"router net class {path!r} is not a torch.nn.Module subclass")
    return cls


def build_net(class_path: str, kwargs: dict[str, Any], allowed_only: bool = False) -> nn.Module:
    """Instantiate a router net; unknown or missing arguments fail with the class's signature.

    ``allowed_only``: only the project's router classes (``ROUTER_CLASSES``), as the bundle loader does.
    """
    cls = router_class(class_path) if allowed_only else import_class(class_path)
    try:
        return cls(**kwargs)
    except TypeError as error:
        signature = inspect.signature(cls.__init__)
        raise ValueError(f"cannot build {class_path}{signature} with {kwargs}: {error}") from error
