"""ALBERT (``albert``): factorised embeddings and cross-layer parameter sharing.

Layout: ``e = word + token_type + position`` in ``embedding_size`` dimensions, a LayerNorm, then the linear
``embedding_hidden_mapping_in`` into ``hidden_size``; then ``num_hidden_layers`` applications of the layer
groups (``num_hidden_groups`` groups of ``inner_group_num`` layers each; released checkpoints share ONE layer
across all applications).

Rules: those of the BERT family (epsilon on every linear map, identity on every LayerNorm and activation, the
pooler's ``tanh`` included, the ``"lrp"`` attention); leaves ``"token"``, ``"segment"``, ``"position"`` at the
embedding sum. Shared layers need nothing special: every rule is a hook on a module (or the attention rule the
``"lrp"`` attention looks up on each call), so it acts on each application of the shared layer with that
application's own input; the attention of a shared layer runs ``num_hidden_layers / num_hidden_groups`` times
per forward pass. The positions are additive (at the input), so there is no per-layer position map, and the
blocks this declaration lists are the distinct layers (:class:`GroupedLayers`), not the applications.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..inputs import TextInputs
from ..modules import find_module
from ..positions import Additive
from .base import Adapter, register_adapter
from .bert import TINY_ENCODER
from .norms import layer_norm


@dataclass(frozen=True)
class GroupedLayers(Adapter):
    """A declaration whose ``layers`` path names a list of layer *groups*, each holding its blocks at
    ``group_blocks`` (ALBERT: ``encoder.albert_layer_groups[g].albert_layers``). :meth:`blocks` lists every
    distinct block once, group after group; a block applied several times in one forward pass (shared
    parameters) is still one block with one attention module."""

    group_blocks: str = ""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        groups = find_module(self.base(model), self.layers)
        return [block for group in groups for block in find_module(group, self.group_blocks)]


ALBERT = register_adapter(
    GroupedLayers(
        model_types=("albert",),
        name="albert",
        layers="encoder.albert_layer_groups",
        group_blocks="albert_layers",
        attention="attention",
        embeddings={
            "embeddings.word_embeddings": ("token",),
            "embeddings.token_type_embeddings": ("segment",),
        },
        positions=Additive({"embeddings.position_embeddings": "position"}),
        norms={"LayerNorm": layer_norm},
        modules=(
            "AlbertForSequenceClassification",
            "AlbertForMaskedLM",
            "AlbertModel",
            "AlbertEmbeddings",
            "AlbertTransformer",
            "AlbertLayerGroup",
            "AlbertLayer",
            "AlbertAttention",
            "AlbertMLMHead",
        ),
        inputs=TextInputs(
            position_ids="count",
            max_positions=lambda c: c.max_position_embeddings,
            token_types="type_vocab_size",
            padding="right",
        ),
        heads=("sequence_classification", "masked_lm"),
        tiny={**TINY_ENCODER, "embedding_size": 16, "num_hidden_layers": 3},
    )
)
