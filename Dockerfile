# delta-bridge container image: `delta-bridge` (ENTRYPOINT) and `delta-load` (the load harness) in one image.
#
#   docker build -t delta-bridge:dev .
#   docker run --rm delta-bridge:dev --version
#   docker run --rm -v "$PWD/bridge.toml:/etc/delta-bridge/config.toml:ro" \
#       -e DELTA_BRIDGE_CONFIG=/etc/delta-bridge/config.toml delta-bridge:dev check-config
#
# Runtime needs only glibc and CA certificates: TLS is rustls (ring), no OpenSSL is linked
# (`cargo tree -e normal | grep -i openssl` shows only openssl-probe, a pure-Rust path finder).
#
# The runtime stage is built and run by scripts/check-container (part of scripts/test) with binaries built on
# the host (BINARIES=prebuilt, below); the builder stage needs the rust image from a registry and is not run
# by that check. Needs BuildKit (the default builder since Docker 23), which skips the stages a target does
# not use.

ARG RUST_VERSION=1.85
# Where the runtime stage takes its two binaries from: `builder` (default: compiled from source above) or
# `prebuilt` (a build context holding nothing but `delta-bridge` and `delta-load`, already compiled for
# glibc 2.36 or older, e.g. on a Debian bookworm host):
#   docker build --build-arg BINARIES=prebuilt -f Dockerfile -t delta-bridge:dev DIR-WITH-THE-TWO-BINARIES
ARG BINARIES=builder

# ---- builder ------------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src

# Dependency layer: build the whole dependency graph against stub sources, so that a change to the project's
# own code does not rebuild the ~300 crates (a clean release build takes ~2.5 min on 2 cores).
COPY Cargo.toml Cargo.lock ./
COPY load/Cargo.toml load/Cargo.toml
COPY harness/Cargo.toml harness/Cargo.toml
RUN mkdir -p src load/src harness/src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs harness/src/lib.rs \
 && echo 'fn main() {}' > load/src/main.rs \
 && echo 'fn main() {}' > benches/throughput.rs \
 && echo 'fn main() {}' > benches/capture_cost.rs \
 && cargo build --release --locked --workspace --bins \
 && rm -rf src load/src harness/src benches

# The real sources. `touch` makes sure cargo sees them as newer than the stub build above (COPY keeps the
# build context's timestamps, which may be older).
COPY . .
# The service binary is built without the default `demo` feature: it carries no code that starts servers or
# generates load (delta-harness). delta-load, which is that harness, is built on its own before it.
RUN touch src/main.rs src/lib.rs load/src/main.rs harness/src/lib.rs \
 && cargo build --release --locked -p delta-load --bins \
 && cargo build --release --locked -p delta-bridge --no-default-features --bins \
 && install -D -m 0755 target/release/delta-bridge /out/delta-bridge \
 && install -D -m 0755 target/release/delta-load /out/delta-load

# ---- prebuilt (only with --build-arg BINARIES=prebuilt) -----------------------------------------------------
FROM scratch AS prebuilt
# The whole context, not two named files: Docker's legacy builder (no BuildKit) builds every stage, and a
# default build's context holds no binaries, so naming them would fail it.
COPY . /out/

# The stage named by BINARIES; FROM is the one place a build argument can pick a stage.
FROM ${BINARIES} AS binaries

# ---- keygen (docker-compose only) ---------------------------------------------------------------------------
# A throwaway openssl image used by docker-compose.yml to create a local device-signing key at first start.
# Never part of the runtime image; `docker build .` does not build it (BuildKit skips unused stages).
FROM debian:bookworm-slim AS keygen
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssl \
 && rm -rf /var/lib/apt/lists/*

# ---- runtime (default target) -------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 delta \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin delta

COPY --from=binaries /out/delta-bridge /out/delta-load /usr/local/bin/

# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080
# SIGTERM (Docker's and Kubernetes' default stop signal) -> graceful shutdown, exit 0 within ~10-15 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/delta-bridge"]
CMD ["run"]
# No HEALTHCHECK here: Kubernetes ignores it and uses the Deployment's probes; docker-compose.yml declares its
# own (bash /dev/tcp, since the image carries no curl).
