# Sluice — the two commands the README promises, and their parts.
#   make run    build everything and serve manifests/ (embedded nats-server if none runs)
#   make test   the whole test suite
.PHONY: run test tools plugins build lint fmt ci bench bench-stores chaos clean

CARGO ?= cargo

run: tools plugins
	$(CARGO) run --release -p sluice -- run manifests/

test: tools plugins
	$(CARGO) test --workspace

tools:
	@scripts/install-tools.sh

plugins: tools
	@scripts/build-plugins.sh

build: tools plugins
	$(CARGO) build --release -p sluice

# Native NATS baselines and the Extism peer against Sluice, in one run of a few minutes
# (bench/README.md). Writes BENCHMARKS.md and bench/results.json. The peer (its own crate, with
# its own wasmtime: many minutes of compile the first time) is built here only; if it cannot
# be built, its row is reported as skipped.
bench: tools plugins
	$(CARGO) build --release -p sluice
	bench/peer-extism/build.sh || echo "warning: the Extism peer did not build; its row will be skipped" >&2
	$(CARGO) run --release -p sluice-bench

# Candidate embedded stores for the outbox commit, side by side (issue 17; bench/stores/).
# Its own workspace and target dir; about 4 minutes. Writes bench/STORES.md.
bench-stores:
	$(CARGO) run --release --manifest-path bench/stores/Cargo.toml -- --out bench/STORES.md

# A 3-node NATS cluster on loopback, 1, 2 and 3 Sluice processes, faults (kill -9 of a Sluice
# process and of a NATS node, a frozen Sluice process, a rolling restart), every output counted
# (chaos/README.md). Writes CHAOS.md; exit code 1 if anything was lost, duplicated or
# dead-lettered. CHAOS_ARGS passes options (--messages 20000, --processes 2, --stores redb, ...).
chaos: tools plugins
	$(CARGO) build --release -p sluice -p sluice-chaos
	target/release/sluice-chaos $(CHAOS_ARGS)

lint: tools
	scripts/check-module-cycles.py
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	# The library alone (no admin listener, no command line) still builds without warnings.
	$(CARGO) clippy -p sluice --lib --no-default-features -- -D warnings
	# The library's documentation: no broken or private links.
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc -p sluice --no-deps

# What CI runs: formatting and lints, then the README's test command.
ci: lint test

clean:
	$(CARGO) clean
	rm -rf plugins/dist
