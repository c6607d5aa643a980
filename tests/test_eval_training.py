"""The evaluation's training helpers: determinism given the seed, fractional epochs, accuracy, batching, the
shared script options and metrics record."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from conftest import tiny_word_tokenizer
from hf_pelrp.evaluation import training


@pytest.fixture
def restore_torch_state():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _data(n: int = 48, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    sentences, labels = [], []
    for _ in range(n):
        words = [
            f"w{int(i)}"
            for i in torch.randint(10, 60, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen)
        ]
        label = int(torch.rand(1, generator=gen) < 0.5)
        if label:
            words.insert(int(torch.randint(0, len(words), (1,), generator=gen)), "w3")
        sentences.append(SimpleNamespace(text=" ".join(words), label=label))
        labels.append(label)
    return sentences, torch.tensor(labels)


def _train(seed: int, epochs: float = 1.5):
    gen = training.set_determinism(seed, threads=1)
    tokenizer = tiny_word_tokenizer()
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=101, n_positions=16, num_labels=2)
    config.pad_token_id = tokenizer.pad_token_id
    model = GPT2ForSequenceClassification(config)
    sentences, labels = _data()
    batches = training.text_batches(tokenizer, sentences, max_length=16)
    losses = training.train_classifier(model, batches, labels, epochs, 8, 3e-3, gen, desc="test")
    return model, losses, batches, labels


@pytest.mark.usefixtures("restore_torch_state")
def test_training_is_deterministic_given_the_seed():
    model_a, losses_a, batches, labels = _train(seed=0)
    model_b, losses_b, _, _ = _train(seed=0)
    _, losses_c, _, _ = _train(seed=1)
    assert losses_a == losses_b
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert losses_a != losses_c
    # 48 samples in batches of 8: 6 steps an epoch, 1.5 epochs -> 9 steps; the model leaves in eval mode
    assert len(losses_a) == 9 and not model_a.training
    acc = training.accuracy(model_a, batches, labels, batch_size=16)
    with torch.no_grad():
        pred = torch.cat(
            [model_a(**batches(list(range(i, min(i + 16, 48))))).logits.argmax(-1) for i in (0, 16, 32)]
        )
    assert acc == pytest.approx(float((pred == labels).float().mean()))


def test_text_batches_pad_and_truncate():
    tokenizer = tiny_word_tokenizer()
    sentences = [SimpleNamespace(text="w1 w2 w3 w4 w5 w6"), SimpleNamespace(text="w7")]
    batch = training.text_batches(tokenizer, sentences, max_length=4)([1, 0])
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"].tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]


def test_script_options_and_metrics_record(tmp_path):
    parser = training.training_parser("Train it.\nMore.", tmp_path / "m", epochs=2.0, batch_size=4, lr=1e-3)
    args = parser.parse_args(["--seed", "3"])
    assert (args.out, args.epochs, args.batch_size, args.lr, args.seed, args.threads) == (
        tmp_path / "m",
        2.0,
        4,
        1e-3,
        3,
        1,
    )
    assert parser.description == "Train it."
    record = training.run_metrics("tiny", 0.75, 20, 80, args, [1.0] * 10 + [0.5] * 50, 12.345)
    assert record == {
        "model": "tiny",
        "test_accuracy": 0.75,
        "test_size": 20,
        "train_size": 80,
        "epochs": 2.0,
        "final_loss": 0.5,
        "seed": 3,
        "train_seconds": 12.3,
    }
    training.save_metrics(tmp_path / "m", record)
    assert Path(tmp_path / "m" / "metrics.json").exists()
