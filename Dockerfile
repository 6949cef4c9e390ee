# scand container image: build in the Rust image, run on slim Debian as a non-root user.
# It listens beyond loopback, so it serves only callers with a token: mount the secrets as files
# (each a token with the scopes its tokens entry gives; see docs/OPERATIONS.md).
#   docker build -t scand .
#   docker run -p 50051:50051 -p 9464:9464 -v scand-data:/var/lib/scand \
#     -v "$PWD/tokens:/run/secrets/scand:ro" scand
# Trying it out on a trusted machine: -e SCAND_GRPC__ALLOW_ANONYMOUS=true instead of tokens.
FROM rust:1-bookworm AS build
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends libclang-dev cmake libssl-dev zlib1g-dev \
      libcurl4-openssl-dev pkg-config g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin scand \
 && install -D target/release/scand /out/scand

FROM debian:bookworm-slim
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends ca-certificates libssl3 libcurl4 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/scand --create-home scand
COPY --from=build /out/scand /usr/local/bin/scand
COPY config/scand.toml /etc/scand/scand.toml
COPY deploy/docker/tokens.toml /etc/scand/tokens.toml
ENV SCAND_STORE__PATH=/var/lib/scand \
    SCAND_GRPC__LISTEN=0.0.0.0:50051 \
    SCAND_ADMIN__LISTEN=0.0.0.0:9464 \
    SCAND_LOG__FORMAT=json
USER scand
VOLUME ["/var/lib/scand"]
EXPOSE 50051 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/scand"]
CMD ["run", "--config", "/etc/scand/tokens.toml"]
