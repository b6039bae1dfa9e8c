# Two commands for a fresh Linux machine:
#   make run    set up a virtualenv and start the server (mock engines unless a model/key is configured)
#   make test   install what the tests need (Debian + PyPI), then lint, type-check and run the whole suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# espeak-ng/sox: speech fixtures; shellcheck, systemd (systemd-analyze), nginx, openssl: checks of install.sh and
# service/; prometheus: promtool, which checks the /metrics exposition and the alert rules; curl: install.sh's
# downloads; acl (setfacl), util-linux (setpriv), passwd (useradd): the unit's start as its own user
# (tests/test_systemd_start.py); redis-server: the Redis session store tests; chromium: the browser the console test
# drives (Playwright uses it, no browser download); fonts-noto-cjk: Chinese text in its screenshot.
SYSTEM_PACKAGES := espeak-ng sox shellcheck systemd nginx-light openssl prometheus curl acl util-linux passwd redis-server \
	chromium fonts-noto-cjk

.PHONY: run test venv venv-dev system-deps lint typecheck pytest bench soak docs screenshot clean

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt $(VENV)/.runtime
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.runtime
venv-dev: $(VENV)/.dev

run: venv
	$(PY) -m server

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

lint: venv-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv-dev
	$(VENV)/bin/mypy config server stt_pool llm harness bench

pytest: venv-dev
	$(PY) -m pytest

test: system-deps venv-dev lint typecheck pytest

bench: venv-dev
	$(PY) -m bench

# The chaos test for ten minutes (bench/soak.py); SOAK_ARGS="--seconds 60 --seed 1" to change it.
soak: venv-dev
	$(PY) -m bench.soak --seconds 600 $(SOAK_ARGS)

docs: venv-dev
	$(PY) -m server.protocol_doc > docs/PROTOCOL.md

# The console test, copying its screenshot to docs/images/console.png (shown in the README).
screenshot: system-deps venv-dev
	UPDATE_DOCS_SCREENSHOT=1 $(PY) -m pytest -q tests/test_console.py -k transcribes_suggests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
