# Callisto — the two commands a newcomer needs are `make run` and `make test`.
CARGO ?= cargo
LISTEN ?= 127.0.0.1:8080
DATA_DIR ?= ./data

.PHONY: run test lint audit-deps fmt bench clean-data up down test-integration

## Run Callisto on this machine with embedded stand-ins (no servers needed).
run:
	$(CARGO) run --release --locked -p callisto -- dev --listen $(LISTEN) --data-dir $(DATA_DIR)

## Run every test (unit, contract, HTTP, process crash tests, schema evolution check).
test:
	$(CARGO) test --workspace --locked

## Formatting, lints and the dependency policy (deny.toml: bans, licenses, sources; no network
## needed beyond the crates registry). Needs cargo-deny: `cargo install cargo-deny --locked`.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) deny --locked check bans licenses sources

## Security advisories from the RustSec database (needs network access; not part of CI).
audit-deps:
	$(CARGO) deny check advisories

fmt:
	$(CARGO) fmt --all

## Benchmarks: the criterion suite, a short HTTP load profile and a rebuild, then one table of
## figure, value, baseline and ratio. BENCH_NOTES sizes the search index, BENCH_EVENTS the rebuild.
BENCH_NOTES ?= 1000000
BENCH_EVENTS ?= 1000000
BENCH_SECONDS ?= 3
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
bench:
	$(CARGO) build --release --locked -p callisto -p callisto-benches --bins
	rm -rf $(TARGET_DIR)/criterion
	CALLISTO_BENCH_OUT=$(abspath $(TARGET_DIR)) CALLISTO_BENCH_NOTES=$(BENCH_NOTES) $(CARGO) bench --locked -p callisto-benches --bench write_path --bench read_path --bench edge -- --warm-up-time 1 --measurement-time 3
	$(TARGET_DIR)/release/loadgen http --callisto $(TARGET_DIR)/release/callisto --seconds $(BENCH_SECONDS) --json $(TARGET_DIR)/bench-http.json
	$(TARGET_DIR)/release/loadgen rebuild --events $(BENCH_EVENTS) --json $(TARGET_DIR)/bench-rebuild.json
	$(TARGET_DIR)/release/bench_report $(TARGET_DIR)/criterion $(TARGET_DIR)/bench-search-p99.json $(TARGET_DIR)/bench-http.json $(TARGET_DIR)/bench-rebuild.json

## The full stack with Docker: Kafka, Schema Registry, MongoDB, Elasticsearch and Callisto's
## writer, projector and query API (see docker-compose.yml).
up:
	docker compose up -d --build --wait

down:
	docker compose down -v

## The contract suites and the end-to-end test against `make up`'s stack.
test-integration:
	MONGODB_URI='mongodb://localhost:27017/?directConnection=true' \
	ELASTICSEARCH_URL=http://localhost:9200 ELASTICSEARCH_USERNAME=elastic ELASTICSEARCH_PASSWORD=callisto-dev \
	CALLISTO_STACK_WRITER_URL=http://localhost:8080 CALLISTO_STACK_QUERY_URL=http://localhost:8082 \
	CALLISTO_STACK_API_KEY="$$(docker compose run --rm --no-deps --entrypoint cat keys /keys/stack-api-key)" \
	$(CARGO) test --locked -p callisto-core -p callisto \
		--test read_store_contract --test search_index_contract --test stack

clean-data:
	rm -rf $(DATA_DIR)
