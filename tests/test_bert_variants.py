"""What check_adapter does not show for ``adapters/bert_variants.py``: ERNIE's optional task-type table is
refused by name rather than losing its relevance."""

from __future__ import annotations

import pytest
import torch

import hf_pelrp
from hf_pelrp import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("single_thread")


def test_ernie_task_type_embeddings_are_refused_by_name():
    from transformers import ErnieConfig, ErnieForSequenceClassification

    config = ErnieConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=97,
        max_position_embeddings=64,
        pad_token_id=0,
        use_task_id=True,
        task_type_vocab_size=3,
    )
    model = ErnieForSequenceClassification(config).eval()
    with pytest.raises(UnsupportedModelError, match=r"task_type_embeddings.*not declare as a leaf"):
        hf_pelrp.attribute(model, torch.tensor([[5, 6, 7]]))
    config.use_task_id = False
    attr = hf_pelrp.attribute(ErnieForSequenceClassification(config).eval(), torch.tensor([[5, 6, 7]]))
    assert attr.segment is not None and float(attr.position.abs().sum()) > 0
