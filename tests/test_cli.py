"""The ``hf-pelrp`` command line: end to end in a subprocess, the error paths and hooks in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hf_pelrp
from conftest import tiny_llama_family, tiny_word_tokenizer
from hf_pelrp import cli

pytestmark = pytest.mark.usefixtures("single_thread")


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "hf_pelrp.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_lm")
    tiny_llama_family().save_pretrained(path)
    tiny_word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("cli_vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=2,
        id2label={0: "shirt", 1: "shoe"},
        label2id={"shirt": 0, "shoe": 1},
    )
    ViTForImageClassification(config).eval().save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["explain", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--model",
        "--text",
        "--image",
        "--target",
        "--foil",
        "--mode",
        "--no-positional",
        "--position",
        "--continuation",
        "--generate",
        "--top-k",
        "--batch-size",
        "--device",
        "--out",
        "--json",
        "--quiet",
    ):
        assert option in text
    top = cli.build_parser().format_help()
    assert all(command in top for command in ("explain", "bench", "evaluate"))


def test_explain_text_end_to_end(lm_dir, tmp_path):
    report, data = tmp_path / "report.html", tmp_path / "out.json"
    done = _run(
        "explain",
        "--model",
        str(lm_dir),
        "--text",
        "w1 w2 w3 w4",
        "--text",
        "w5 <script>alert(1)</script>",
        "--target",
        "w7",
        "--out",
        str(report),
        "--json",
        str(data),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "100%" in done.stderr  # the progress bar
    assert "[0] target 'w7'" in done.stdout and "[1] target 'w7'" in done.stdout
    html = report.read_text(encoding="utf-8")
    assert "w4" in html and "<script>alert(1)</script>" not in html
    results = json.loads(data.read_text())
    assert [r["tokens"] for r in results] == [["w1", "w2", "w3", "w4"], ["w5", "[UNK]"]]
    tok = tiny_word_tokenizer()
    model = tiny_llama_family()
    ref = hf_pelrp.attribute(model, tok("w1 w2 w3 w4", return_tensors="pt")["input_ids"], target=12)
    np.testing.assert_allclose(results[0]["relevance"], ref.relevance[0].numpy(), atol=1e-5)
    assert results[0]["score"] == pytest.approx(ref.target_value.item(), abs=1e-5)


def test_bad_argument_exits_2_with_one_line(lm_dir):
    done = _run("explain", "--model", str(lm_dir), "--text", "w1", "--mode", "fastest")
    assert done.returncode == 2
    assert "invalid choice: 'fastest'" in _one_line_error(done.stderr)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["explain", "--model", "{missing}", "--text", "w1"], "not a folder with a config.json"),
        (["explain", "--model", "{lm}", "--text", "w1", "--target", "w1 w2"], "not a single token"),
        (
            ["explain", "--model", "{lm}", "--text", "w1", "--target", "NEGATIVE_LABEL"],
            "not in the vocabulary",
        ),
        (
            ["explain", "--model", "{lm}", "--text", "w1", "--out", "r.txt"],
            "must end in .html or .htm or .png",
        ),
        (["explain", "--model", "{lm}", "--text", "a", "--text", "b", "--generate", "2"], "one --text"),
        (["explain", "--model", "{lm}", "--image", "{missing}"], "no such file"),
        (["evaluate", "{missing}"], "no such file"),
        (["explain", "--model", "{lm}", "--text", "w1", "--bogus"], "unrecognized arguments"),
        (["explain", "--model", "{lm}", "--text", "w1", "--out", "{missing}/r.html"], "does not exist"),
        (["explain", "--model", "{lm}", "--text", "w1", "--json", "r.csv"], "must end in .json"),
        (["explain", "--model", "{lm}", "--text", "w1", "--device", "gpu7"], "not a torch device"),
        ([], "required"),
    ],
)
def test_errors_exit_2(argv, message, lm_dir, tmp_path, capsys):
    argv = [a.format(missing=tmp_path / "missing", lm=lm_dir) for a in argv]
    try:
        code = cli.main([*argv, "--quiet"] if argv and argv[0] == "explain" else argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert message in _one_line_error(capsys.readouterr().err)


def test_unsupported_model_exits_2(tmp_path, capsys):
    from transformers import FunnelConfig, FunnelForSequenceClassification

    config = FunnelConfig(vocab_size=101, d_model=16, n_head=2, d_head=8, d_inner=32, block_sizes=[1, 1])
    FunnelForSequenceClassification(config).save_pretrained(tmp_path)
    tiny_word_tokenizer().save_pretrained(tmp_path)
    code = cli.main(["explain", "--model", str(tmp_path), "--text", "w1 w2", "--quiet"])
    assert code == 2
    assert "'funnel'" in _one_line_error(capsys.readouterr().err)


def test_cuda_without_cuda_is_one_line(lm_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = cli.main(["explain", "--model", str(lm_dir), "--text", "w1", "--device", "cuda", "--quiet"])
    assert code == 2
    assert "CUDA is not available" in _one_line_error(capsys.readouterr().err)


def test_text_for_an_image_model_is_one_line_before_loading(vit_dir, capsys):
    code = cli.main(["explain", "--model", str(vit_dir), "--text", "a shoe", "--quiet"])
    assert code == 2
    assert "image classifier" in _one_line_error(capsys.readouterr().err)


def test_quiet_prints_nothing(lm_dir, tmp_path, capsys):
    code = cli.main(
        ["explain", "--model", str(lm_dir), "--text", "w1 w2", "--out", str(tmp_path / "r.html"), "--quiet"]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_explain_generation_report(lm_dir, tmp_path, capsys):
    report = tmp_path / "gen.html"
    code = cli.main(
        ["explain", "--model", str(lm_dir), "--text", "w1 w2 w3", "--generate", "2", "--out", str(report)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "2 tokens explained" in out
    html = report.read_text(encoding="utf-8")
    # the target x source matrix: one row label per generated token
    assert html.count('<tr><th class="hfp-rowlab">→') == 2 and 'data-kind="generation"' in html


def test_explain_image(vit_dir, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(image)
    png, data = tmp_path / "report.png", tmp_path / "out.json"
    code = cli.main(
        ["explain", "--model", str(vit_dir), "--image", str(image), "--target", "shoe", "--out", str(png)]
        + ["--json", str(data), "--quiet"]
    )
    assert code == 0, capsys.readouterr().err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(data.read_text())[0]
    assert result["target"] == {"id": 1, "label": "shoe"}
    assert np.asarray(result["patch_map"]).shape == (4, 4) and np.asarray(result["pixel_map"]).shape == (
        16,
        16,
    )
    html = tmp_path / "report.html"
    assert (
        cli.main(["explain", "--model", str(vit_dir), "--image", str(image), "--out", str(html), "--quiet"])
        == 0
    )
    assert "patch 15" in html.read_text(encoding="utf-8")


def test_evaluate_and_bench_hooks(tmp_path, monkeypatch, capsys):
    import hf_pelrp.evaluation

    config = tmp_path / "eval.yaml"
    config.write_text("tasks: []\n")
    calls = []
    monkeypatch.setattr(hf_pelrp.evaluation, "run", lambda path, **kw: calls.append((path, kw)) or {})
    assert cli.main(["evaluate", str(config), "--output-dir", str(tmp_path / "runs")]) == 0
    assert calls == [(str(config), {"output_dir": str(tmp_path / "runs")})]

    def broken(path, **kw):
        raise ValueError("tasks must name at least one task")

    monkeypatch.setattr(hf_pelrp.evaluation, "run", broken)
    assert cli.main(["evaluate", str(config)]) == 2
    assert "at least one task" in _one_line_error(capsys.readouterr().err)

    # the benchmark is a module of the package (hf_pelrp.bench), imported, not loaded from a file path
    import hf_pelrp.bench

    monkeypatch.setattr(hf_pelrp.bench, "main", lambda argv=None: print("bench got", argv) or 3)
    assert cli.main(["bench", "--lengths", "8", "16"]) == 3
    assert "bench got ['--lengths', '8', '16']" in capsys.readouterr().out
    assert "spec_from_file_location" not in Path(cli.__file__).read_text()
