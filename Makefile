# Callisto — the two commands a newcomer needs are `make run` and `make test`.
CARGO ?= cargo
LISTEN ?= 127.0.0.1:8080
DATA_DIR ?= ./data

.PHONY: run test lint fmt bench clean-data

## Run Callisto on this machine with embedded stand-ins (no servers needed).
run:
	$(CARGO) run --release --locked -p callisto -- dev --listen $(LISTEN) --data-dir $(DATA_DIR)

## Run every test (unit, contract, HTTP, process crash tests, schema evolution check).
test:
	$(CARGO) test --workspace --locked

## Formatting and lints.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## Criterion benchmarks; each group reports Callisto next to its same-run baseline.
bench:
	$(CARGO) bench --locked -p callisto-benches

clean-data:
	rm -rf $(DATA_DIR)
