# The README's two commands are "make demo" and "make test"; both set the host up first.
SHELL := /bin/bash
KVMC  := .venv/bin/kvmc
PYTEST_WORKERS ?= 2

.PHONY: setup guest demo demo-cattle test unit bench bench-boot bench-volumes bench-network bench-host clean

setup:                       ## install packages, start libvirtd, build guest + default image
	ci/setup-host.sh

guest:                       ## (re)build the guest kernel, initramfs and agent only
	images/build.sh $${KVMC_DATA_DIR:-/var/lib/kvmc}/guest --kernel debian
	images/build.sh $${KVMC_DATA_DIR:-/var/lib/kvmc}/guest-kvmc --kernel kvmc
	images/build.sh $${KVMC_DATA_DIR:-/var/lib/kvmc}/guest-kvmc-host --kernel kvmc-host

demo: setup                  ## boot the default image in a microVM and run a command in it
	$(KVMC) run --rm kvmc/busybox -- sh -c 'echo "hello from $$(hostname), a microVM running $$(uname -sr)"; cat /proc/cpuinfo | grep -m1 "model name"'

demo-cattle: setup           ## kvmc host: build in a disposable Docker host, reuse its cache from a second one
	ci/demo-cattle.sh

test: setup                  ## the whole suite: unit tests and end-to-end tests that boot VMs
	.venv/bin/python -m pytest -n $(PYTEST_WORKERS) -ra -m "not serial" tests
	.venv/bin/python -m pytest -ra -m serial tests

unit:                        ## fast tests only (no VM boots)
	.venv/bin/python -m pytest -q tests/unit

bench: bench-boot bench-volumes bench-network  ## all benchmarks (bench/)
	.venv/bin/python bench/startup.py

bench-volumes: setup         ## read throughput: named volume and virtiofs vs the host (bench/volumes.py)
	.venv/bin/python bench/volumes.py

bench-network: setup       ## TCP latency/throughput: container<->container on a network vs slirp (bench/network.py)
	.venv/bin/python bench/network.py

bench-host: setup            ## kvmc host: engine ready cold/pooled/with cache, 1st vs 2nd docker build (bench/host.py)
	.venv/bin/python bench/host.py

bench-boot: setup            ## guest boot: Debian's kernel vs kvmc's own (bench/boot.py)
	.venv/bin/python bench/boot.py
