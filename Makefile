# The two commands of the README: `make demo` (set up + run the demo) and `make test` (set up + run the tests).
# Both install exactly the versions of constraints/lock.txt (what the suite last passed with).
PY := .venv/bin/python
STAMP := .venv/.setup-stamp

.PHONY: setup demo test lint bench results positions ledger remedies offsets vision-rules vlm-faithfulness lock test-latest test-oldest

$(STAMP): pyproject.toml scripts/setup.sh constraints/lock.txt
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m hf_pelrp.demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	.venv/bin/ruff check src tests scripts
	.venv/bin/ruff format --check src tests scripts

# Drift: the paths users take (the demo, the README's blocks, from_pretrained / pipeline / CLI, check_adapter for
# every registered type), in an environment of the newest releases pyproject.toml's ranges allow and in one of
# their lower bounds. CI runs both after the locked suite.
UPSTREAM_TESTS := tests/test_readme.py tests/test_readme_blocks.py tests/test_hub_kernels.py tests/test_loading.py tests/test_pipeline.py \
	tests/test_cli.py tests/test_smollm2.py tests/test_adapters.py

test-latest:
	bash scripts/setup.sh --latest
	.venv-latest/bin/python -m hf_pelrp.demo
	.venv-latest/bin/python -m pytest -q $(UPSTREAM_TESTS)

test-oldest:
	bash scripts/setup.sh --oldest
	.venv-oldest/bin/python -m hf_pelrp.demo
	.venv-oldest/bin/python -m pytest -q $(UPSTREAM_TESTS)

# Refresh constraints/lock.txt: the newest releases the ranges allow, the whole suite on them, and only if it
# passes, their versions into the lock (then `make setup` re-installs .venv from it).
lock:
	bash scripts/setup.sh --latest
	.venv-latest/bin/python -m pytest -q
	.venv-latest/bin/python scripts/constraints.py lock --python .venv-latest/bin/python

bench: $(STAMP)
	$(PY) scripts/bench_attribution.py
	$(PY) scripts/bench_attribution.py --model llama-4x256 --lengths 128 512 2048 --clock cpu --threads 1

# The evaluation of issue 5 from scratch: data, the three trained models (skipped when their checkpoint
# exists), the four tasks (resumable: finished samples are not recomputed), then the tables into docs/ and
# the README. Hours on two CPU cores; see docs/results.md.
MODELS := .cache/models
EVAL_CONFIGS := smollm2_next_token minilm_sentiment gpt2_sentiment vit_fashion_mnist

results: $(STAMP)
	$(PY) scripts/prepare_data.py
	test -f $(MODELS)/minilm-sentiment/config.json || nice -n 15 $(PY) scripts/train_minilm.py
	test -f $(MODELS)/gpt2-sentiment/config.json || nice -n 15 $(PY) scripts/train_gpt2.py
	test -f $(MODELS)/vit-fashion-mnist/config.json || nice -n 15 $(PY) scripts/train_vit.py
	for c in $(EVAL_CONFIGS); do nice -n 15 .venv/bin/hf-pelrp evaluate configs/$$c.yaml || exit 1; done
	$(PY) scripts/collect_results.py

# The position-faithfulness evaluation of issue 14 (docs/results.md, "position faithfulness"): the nine
# ground-truth models, then position flipping, the ground-truth tasks and the paper's protocol; resumable.
POSITION_CONFIGS := positional_tasks gpt2_positions smollm2_positions smollm2_paper_protocol

positions: $(STAMP)
	$(PY) scripts/prepare_data.py
	test -f $(MODELS)/gpt2-sentiment/config.json || nice -n 15 $(PY) scripts/train_gpt2.py
	nice -n 15 $(PY) scripts/train_positional.py
	for c in $(POSITION_CONFIGS); do nice -n 15 .venv/bin/hf-pelrp evaluate configs/$$c.yaml || exit 1; done
	$(PY) scripts/collect_positions.py

# Issue 21, "where the unexplained logit goes" (docs/results.md): the conservation ledger of SmolLM2 and MiniLM
# (seconds), then the remedies (softmax rules, epsilon, ResLRP's residual rule) on 24 SmolLM2 review windows:
# unexplained share, rotary share, token- and position-flip faithfulness (about 45 minutes on 2 loaded cores).
ledger: $(STAMP)
	$(PY) scripts/ledger.py

remedies: $(STAMP)
	$(PY) scripts/prepare_data.py --skip-fashion-mnist
	nice -n 15 $(PY) scripts/remedies.py --n 24 --out runs/remedies.json

# Offset flipping (issue 21, docs/results.md "Relevance per offset"): PE-LRP's position_by_offset against IG over
# the offset gates, occlusion and random on SmolLM2, the ALiBi BLOOM and the rotary ground-truth models.
offsets: $(STAMP)
	$(PY) scripts/prepare_data.py --skip-fashion-mnist
	test -f $(MODELS)/bloom-alibi-lm/config.json || nice -n 15 $(PY) scripts/train_alibi.py --docs runs/alibi-recency
	for t in order_ab token_at_k; do test -f $(MODELS)/positional/llama-$$t/config.json || nice -n 15 $(PY) scripts/train_positional.py --kinds llama --tasks $$t || exit 1; done
	nice -n 15 $(PY) scripts/offset_flipping.py --models smollm2 --samples 32 --random-orders 1
	nice -n 15 $(PY) scripts/offset_flipping.py --models bloom-alibi gt-llama-order_ab gt-llama-token_at_k --samples 32

# The vision-rules evaluation of issue 20 (docs/results.md, "vision rules"): the two canvas models (skipped when
# their checkpoint exists), then every candidate rule set against rollout, IG, IxG and random (resumable).
vision-rules: $(STAMP)
	$(PY) scripts/prepare_data.py
	test -f $(MODELS)/vit-fashion-canvas/config.json || nice -n 15 $(PY) scripts/train_vision_canvas.py --arch vit
	test -f $(MODELS)/deit-fashion-noise/config.json || nice -n 15 $(PY) scripts/train_vision_canvas.py --arch deit
	nice -n 15 $(PY) scripts/eval_vision_rules.py
	nice -n 15 $(PY) scripts/eval_vision_rules.py --figure rollout ig attnlrp_pe vit_paper_pe vit_paper_attnlrp_clamp

# The VLM faithfulness check of issue 19 (docs/results.md, "Vision-language model"): the tiny LLaVA on quadrant
# canvases (skipped when its checkpoint exists; ~15 minutes on one thread), then its patch maps against IG,
# rollout and random (a few minutes).
vlm-faithfulness: $(STAMP)
	$(PY) scripts/prepare_data.py
	test -f $(MODELS)/llava-fashion-quadrants/config.json || nice -n 15 $(PY) scripts/train_vlm_canvas.py
	nice -n 15 $(PY) scripts/eval_vlm_faithfulness.py
