"""A network that predicts classes: encoder, the first projection-head layers, a linear layer.

This is what fine-tuning trains (``finetune.py``), what distillation teaches and learns
(``distill.py``), and what the reference calls the supervised head: its ``head_supervised``
is one linear layer reading ``hiddens_list[ft_proj_selector]``, the encoder's h
(``proj_selector=0``, SimCLRv1) or the output of projection-head layer ``proj_selector``
(SimCLRv2 fine-tunes from layer 1 of a 3-layer head).

Stored with the network it sits on (``checkpoint.py``, ``export.py``): ``classifier``
holds ``weight`` (K, D) and ``bias`` (K,), ``classifier_input`` the selector; the head's
first ``proj_selector`` layers are those of the stored ``head`` (the rest of the head is
kept as it was, so the file is still a whole SimCLR model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

MAX_CLASSES = 1_000_000  # far above ImageNet-21k's 21,843; a file claiming more is forged


class Classifier(nn.Module):
    """Images -> class logits through ``encoder``, ``head_layers`` in order, then a linear layer.

    Attributes:
        encoder: a module with ``forward_features(x) -> h`` and ``feature_dim``.
        head_layers: the projection head's first ``proj_selector`` layers.
        classifier: ``nn.Linear(D, num_classes)``, D the size of its input.
    """

    def __init__(self, encoder: nn.Module, head_layers: Sequence[nn.Module], num_classes: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head_layers = nn.ModuleList(head_layers)
        self.classifier = nn.Linear(input_dim(encoder.feature_dim, self.head_layers), num_classes)
        # The reference's linear_layer: N(0, 0.01^2) weights, zero bias.
        nn.init.normal_(self.classifier.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.classifier.bias)

    @property
    def proj_selector(self) -> int:
        return len(self.head_layers)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> class logits (B, num_classes)."""
        hidden = self.encoder.forward_features(x)
        for layer in self.head_layers:
            hidden = layer(hidden)
        return self.classifier(hidden)

    def state_parts(self, head: nn.Module | None) -> dict[str, Any]:
        """What a checkpoint stores of this network: ``encoder``, ``head`` (``head``'s state,
        a copy, with its first ``proj_selector`` layers replaced by this network's),
        ``classifier`` and ``classifier_input``."""
        head_state = None
        if head is not None:
            head_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            for index, layer in enumerate(self.head_layers):
                head_state.update({f"layers.{index}.{k}": v.detach().clone()
                                   for k, v in layer.state_dict().items()})  # fmt: skip
        return {
            "encoder": {k: v.detach().clone() for k, v in self.encoder.state_dict().items()},
            "head": head_state,
            "classifier": {k: v.detach().clone() for k, v in self.classifier.state_dict().items()},
            "classifier_input": self.proj_selector,
        }


def input_dim(feature_dim: int, head_layers: Sequence[nn.Module]) -> int:
    """The size D of the classifier's input: h's, or the last given head layer's output."""
    for layer in head_layers:
        feature_dim = [m for m in layer.modules() if isinstance(m, nn.Linear)][-1].out_features
    return feature_dim


def from_model(model: nn.Module, proj_selector: int, state: dict[str, torch.Tensor] | None,
               num_classes: int | None = None) -> Classifier:
    """The classifier over a built SimCLR ``model`` (its modules, not copies).

    Args:
        model: a :class:`~simclrkit.models.SimCLR` with its weights loaded.
        proj_selector: how many head layers sit under the linear layer.
        state: the stored ``classifier`` (``weight`` (K, D), ``bias`` (K,)), or None for a
            new one of ``num_classes`` outputs.
        num_classes: K when ``state`` is None.
    """
    layers = list(model.head.layers[:proj_selector]) if proj_selector else []
    classes = int(state["weight"].shape[0]) if state is not None else num_classes
    network = Classifier(model.encoder, layers, classes)
    if state is not None:
        network.classifier.load_state_dict(state)
    return network
