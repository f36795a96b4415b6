# The callisto binary in a small runtime image. librdkafka is built from source by rdkafka's
# default features; TLS is rustls, so the runtime needs no OpenSSL.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p callisto && cp target/release/callisto /callisto

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home /var/lib/callisto callisto && mkdir -p /var/lib/callisto && chown callisto /var/lib/callisto
COPY --from=build /callisto /usr/local/bin/callisto
USER callisto
ENV CALLISTO__STORAGE__DATA_DIR=/var/lib/callisto
ENTRYPOINT ["callisto"]
