# Two commands a new user needs:
#   make app    set up .venv, build the default cache, start the dashboard
#   make test   set up .venv (with test tools and Chromium), run the test suite
# Each step is skipped when its inputs have not changed.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= localhost
PORT ?= 8501

.PHONY: app test build lint setup setup-dev browser

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

setup: $(VENV)/.runtime

setup-dev: $(VENV)/.dev

browser:
	@command -v chromium >/dev/null || { apt-get update -q && \
	  apt-get install -y -q --no-install-recommends chromium; }

build: setup
	$(BIN)/python -m backend build

app: build
	$(BIN)/streamlit run streamlit_app.py --server.address $(HOST) \
	  --server.port $(PORT) --server.headless true \
	  --browser.gatherUsageStats false

test: setup-dev browser
	$(BIN)/python -m pytest

lint: setup-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
