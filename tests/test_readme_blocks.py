"""Every ```python block of the README runs as written, offline.

Grouping rule: a block belongs to the nearest ``## `` or ``### `` heading above it (headings inside code fences
do not count). The blocks of one heading run top to bottom in one fresh namespace, as a reader pasting that
part of the README into a script would (the test saves them as one and runs it); no namespace is shared between
headings, so each part defines every name it uses.
A block whose first line is ``# needs: network`` is not run (the only exception, and it must say so in the
README). Every block runs in a scratch working directory (blocks write reports), on one thread, with the random
state and the adapter registry restored afterwards. After a block, the checks below assert what the block
claims (shapes, targets, files), so a block that runs but shows something else fails too.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread")

README_PATH = Path(__file__).resolve().parents[1] / "README.md"
README = README_PATH.read_text(encoding="utf-8")
NETWORK_MARKER = "# needs: network"
# the info strings a reader (and GitHub) would take for Python
PYTHON_FENCE = re.compile(r"^```\s*(python3?|py)\s*$", re.IGNORECASE)


@dataclass
class Block:
    line: int  # 1-based README line of the block's first code line
    code: str

    @property
    def needs_network(self) -> bool:
        return self.code.lstrip().startswith(NETWORK_MARKER)


@dataclass
class Group:
    heading: str
    blocks: list[Block] = field(default_factory=list)


def parse(text: str) -> list[Group]:
    """The README's Python blocks grouped by their heading, in order (see the module docstring)."""
    groups: dict[str, Group] = {}
    heading = "(top)"
    fence: str | None = None  # the opening fence line while inside a code block
    code: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is None:
            if line.startswith("```"):
                fence, code, start = line, [], number + 1
            elif line.startswith(("## ", "### ")):
                heading = line.lstrip("#").strip()
            continue
        if line.startswith("```"):
            if PYTHON_FENCE.match(fence):
                groups.setdefault(heading, Group(heading)).blocks.append(Block(start, "\n".join(code) + "\n"))
            fence = None
        else:
            code.append(line)
    assert fence is None, f"README.md: the code block opened at line {start - 1} is never closed"
    return list(groups.values())


GROUPS = parse(README)


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


# a group that loads real pretrained weights (SmolLM2, MiniLM) is `slow`, the rest (tiny models) is not
REAL_WEIGHTS = ("smollm2_checkpoint(", "load_smollm2(", "minilm_dir(")


#: optional extras a block may import, and the environment that leaves one out (make test-oldest: inseq)
EXTRAS = ("inseq",)


def _params(groups: list[Group]) -> list[Any]:
    params = []
    for group in groups:
        real = any(call in b.code for b in group.blocks if not b.needs_network for call in REAL_WEIGHTS)
        marks = [pytest.mark.slow] if real else []
        for extra in EXTRAS:
            imported = any(re.search(rf"^\s*(import|from) {extra}\b", b.code, re.M) for b in group.blocks)
            if imported and importlib.util.find_spec(extra) is None:
                marks.append(
                    pytest.mark.skip(reason=f"the {extra} extra is not installed in this environment")
                )
        params.append(pytest.param(group, id=_slug(group.heading), marks=marks))
    return params


# ---- what the blocks claim, checked after the block named by (heading, index among its Python blocks) ----


def _paris_id(tok) -> int:
    return tok.encode(" Paris", add_special_tokens=False)[0]


def _api(ns: dict[str, Any]) -> None:
    attr, tok = ns["attr"], ns["tok"]
    assert attr.relevance.shape == attr.token.shape == attr.position.shape == (1, 5)
    assert attr.position_by_layer.shape == (1, ns["model"].config.num_hidden_layers, 5)
    assert int(attr.target) == _paris_id(tok) and attr.labels[int(attr.target)] == " Paris"
    torch.testing.assert_close(attr.conservation_gap, attr.target_value - attr.relevance.sum(-1))
    assert attr.position.abs().sum() > 0  # rotary positions as leaves get relevance under AttnLRP


def _api_context(ns: dict[str, Any]) -> None:
    maps, attr = ns["maps"], ns["attr"]
    assert ns["layer3"].shape == (1, 5) and ns["layer3"].abs().sum() > 0
    # the arg-max is " Paris": the context's maps are the ones attribute() returned in the block above
    torch.testing.assert_close(maps["token"], attr.token, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps["position"], attr.position, rtol=1e-4, atol=1e-4)


def _masked_lm(ns: dict[str, Any]) -> None:
    attr, enc = ns["attr"], ns["enc"]
    assert attr.token.shape == attr.position.shape == attr.segment.shape == enc.input_ids.shape
    assert int(attr.target) == int(ns["mlm"](**enc).logits[0, int(ns["pos"][0])].argmax())


def _seq2seq(ns: dict[str, Any]) -> None:
    from hf_pelrp.result import Seq2SeqAttribution

    attr, rows = ns["attr"], ns["rows"]
    assert isinstance(attr, Seq2SeqAttribution) and isinstance(rows, Seq2SeqAttribution)
    assert attr.token.shape == (1, 7) and attr.target_token.shape == (1, 3)
    total = attr.relevance.sum(-1) + attr.target_relevance.sum(-1) + attr.conservation_gap
    torch.testing.assert_close(total, attr.target_value)
    assert rows.batch_size == 3 and rows.target.tolist() == [17, 42, 5]


def _add_architecture(ns: dict[str, Any]) -> None:
    report = ns["report"]
    assert report.passed and "[ok] MyLlamaForCausalLM: bias-free CP conservation" in str(report)


def _vision_language_api(ns: dict[str, Any]) -> None:
    attr, ids = ns["attr"], ns["ids"]
    assert attr.image.shape == (1, 16) and attr.image_grid.tolist() == [[4, 4]]
    assert float(attr.token[ids == 99].abs().max()) == 0.0
    assert float(attr.image.abs().sum()) > 0 and float(attr.image_position.abs().sum()) > 0
    total = attr.relevance.sum(-1) + attr.image_total + attr.conservation_gap
    torch.testing.assert_close(total, attr.target_value)


def _quick_start_text(ns: dict[str, Any]) -> None:
    import hf_pelrp

    attr = ns["attr"]
    assert attr.labels[int(attr.target)] == " Paris"
    page = Path("paris.html").read_text(encoding="utf-8")
    assert " capital" in page and "Paris" in page  # decoded tokens and the target as text
    loaded = hf_pelrp.Attribution.load("paris.safetensors")
    torch.testing.assert_close(loaded.relevance, attr.relevance)


def _quick_start_image(ns: dict[str, Any]) -> None:
    attr = ns["attr"]
    assert attr.patch_map.shape == (1, 4, 4) and attr.pixel_map.shape == (1, 32, 32)
    assert attr.labels[int(attr.target)] in ("cat", "dog")
    assert Path("cat.html").stat().st_size > 0 and Path("cat_explained.png").read_bytes()[:4] == b"\x89PNG"


def _pipeline_lm(ns: dict[str, Any]) -> None:
    out = ns["out"]
    assert out["target"]["label"] == " Paris" and out["relevance"].shape == (5,)
    assert out["tokens"] == ["The", " capital", " of", " France", " is"]


def _pipeline_heads(ns: dict[str, Any]) -> None:
    pair = ns["classify"]({"text": "A man sleeps.", "text_pair": "A person rests."})
    assert pair["segment_relevance"].shape == pair["relevance"].shape
    assert ns["classify"]("The movie was great", target="POSITIVE")["target"]["label"] == "POSITIVE"
    assert ns["fill"]("Paris is the [MASK] of France")["tokens"][4] == "[MASK]"
    assert ns["see"](ns["image"], target="tabby cat")["patch_map"].shape == (4, 4)
    rows = ns["translate"]("translate English to German: The house", continuation="Das Haus")
    # one row per continuation token, explained over the source
    assert [t["label"] for t in rows["target"]] == ns["tok"].tokenize("Das Haus")
    assert rows["token_relevance"].shape[0] == len(rows["target"])


def _loading(ns: dict[str, Any]) -> None:
    import hf_pelrp

    config = hf_pelrp.default_config(ns["model"])
    assert config.mode == "cp" and config.positional is True
    assert hf_pelrp.attribute(ns["model"], input_ids=ns["ids"]).mode == "cp"


def _continuations(ns: dict[str, Any]) -> None:
    gen, prompt = ns["gen"], ns["prompt_ids"]
    assert gen.relevance.shape == (8, prompt.shape[1] + 8)
    page = Path("story.html").read_text(encoding="utf-8")
    assert " capital" in page  # tokenizer= given: the matrix shows decoded tokens, not ids


def _vision_language(ns: dict[str, Any]) -> None:
    out, gen = ns["out"], ns["gen"]
    assert out["image_relevance"].shape == (16,) and out["image_grid"] == (4, 4)
    assert gen["image_relevance"].shape == (4, 16) and gen["relevance"].shape[0] == 4
    torch.testing.assert_close(ns["rows"].image, gen["attribution"].image)
    assert Path("vlm.html").read_text(encoding="utf-8").count('class="hfp-vlm-overlay') == 2 * 4


def _captum(ns: dict[str, Any]) -> None:
    attributions, delta, token, position = (ns[k] for k in ("attributions", "delta", "token", "position"))
    assert attributions.shape == token.shape == position.shape == ns["input_ids"].shape
    torch.testing.assert_close(token + position, attributions, rtol=1e-5, atol=1e-5)
    assert delta.shape == (1,) and len(ns["records"]) == 1


def _inseq(ns: dict[str, Any]) -> None:
    seq = ns["seq"]
    assert seq.target_attributions.shape[-1] == 2  # token and position relevance
    assert len(seq.step_scores["deltas"]) == 8


CHECKS: dict[tuple[str, int], Callable[[dict[str, Any]], None]] = {
    ("Python API", 0): _api,
    ("Python API", 1): _api_context,
    ("Supported architectures", 0): _masked_lm,
    ("Positions inside attention (ALiBi, relative position biases, encoder-decoder models)", 0): _seq2seq,
    ("Vision-language models: image patches, text and positions", 0): _vision_language_api,
    ("Adding an architecture", 0): _add_architecture,
    ("Quick start", 0): _quick_start_text,
    ("Quick start", 1): _quick_start_image,
    ('`pipeline("lrp-attribution")`', 0): _pipeline_lm,
    ('`pipeline("lrp-attribution")`', 1): _pipeline_heads,
    ("Loading with attribution enabled", 0): _loading,
    ("Continuations, contrastive targets, span sums", 0): _continuations,
    ("Vision-language models: an image with text", 0): _vision_language,
    ("Captum: `hf_pelrp.captum.PELRP`", 0): _captum,
    ('Inseq: the `"pelrp"` method', 0): _inseq,
}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A scratch working directory; the random state and the adapter registry as they were before."""
    from hf_pelrp.adapters.base import _REGISTRY

    monkeypatch.chdir(tmp_path)
    saved = dict(_REGISTRY)
    with torch.random.fork_rng():
        yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def _runnable(group: Group) -> list[tuple[int, Block]]:
    """The blocks the test runs, with their index among the group's Python blocks (the key of CHECKS)."""
    return [(i, b) for i, b in enumerate(group.blocks) if not b.needs_network]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("group", _params(GROUPS))
def test_readme_section_runs_as_written(group, sandbox, tmp_path, monkeypatch):
    # The reader's script: the group's blocks saved in one file, each at its README line numbers (so a
    # traceback's line number is the README's), run as a module with that file as its source. Classes a block
    # defines then live in a module with readable source, as in a script or a package: transformers reads that
    # source to decide whether a model dispatches attention through its AttentionInterface.
    runnable = _runnable(group)
    lines = [""] * len(README.splitlines())
    for _, block in runnable:
        code = block.code.splitlines()
        lines[block.line - 1 : block.line - 1 + len(code)] = code
    name = "readme_" + _slug(group.heading).replace("-", "_")
    script = tmp_path / f"{name}.py"
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")
    module = types.ModuleType(name)
    module.__file__ = str(script)
    monkeypatch.setitem(sys.modules, name, module)
    for index, block in runnable:
        exec(compile("\n" * (block.line - 1) + block.code, str(script), "exec"), module.__dict__)
        check = CHECKS.get((group.heading, index))
        if check is not None:
            check(module.__dict__)


def test_every_python_block_is_run():
    """No block escapes: the parser finds every Python fence, and only marked blocks are skipped."""
    # counted on the raw text, independently of the parser: Python fences, and markers right after one
    lines = README.splitlines()
    fences = [n for n, line in enumerate(lines) if PYTHON_FENCE.match(line)]
    marked = [n + 2 for n in fences if n + 1 < len(lines) and lines[n + 1].strip() == NETWORK_MARKER]
    executed = [b for g in GROUPS for _, b in _runnable(g)]
    assert len(fences) > 0
    assert len(executed) == len(fences) - len(marked)
    network = [b.line for g in GROUPS for b in g.blocks if b.needs_network]
    assert network == marked
    # the network is the rare exception, and the blocks the checks name still exist (a renamed heading or a
    # removed block would otherwise switch its checks off silently)
    assert len(network) <= 1, f"README blocks needing the network (lines {network}): make them run offline"
    names = {(g.heading, i) for g in GROUPS for i in range(len(g.blocks))}
    assert set(CHECKS) <= names, sorted(set(CHECKS) - names)


def test_the_parser_groups_by_heading_and_ignores_fenced_headings():
    text = (
        "## A\n```python\na = 1\n```\n```bash\n## not a heading\n```\n```python\nb = a\n```\n"
        "### B\n```py\n# needs: network\nimport x\n```\n"
    )
    groups = parse(text)
    assert [g.heading for g in groups] == ["A", "B"]
    assert [b.code for b in groups[0].blocks] == ["a = 1\n", "b = a\n"]
    assert [b.line for b in groups[0].blocks] == [3, 9]
    assert groups[1].blocks[0].needs_network and not groups[0].blocks[0].needs_network
