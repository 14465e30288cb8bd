# One image with every service binary (ws-gateway, ws-api, scheduler, schedctl, agent,
# loadtest). Base images are build arguments so the image can be built from local bases
# where no registry is reachable: scripts/docker-images builds rt-base/debian:bookworm with
# debootstrap and rt-base/rust-deps:<hash of Cargo.lock> (Rust 1.95 plus every crate of
# Cargo.lock vendored, cargo set offline: containers cannot reach crates.io here) and
# passes them here; use that script rather than calling docker build yourself:
#
#   docker build --build-arg BUILDER_IMAGE=rt-base/rust-deps:<hash> \
#                --build-arg RUNTIME_IMAGE=rt-base/debian:bookworm -t rt-services:dev .
#
# The runtime image runs as the unprivileged user `rt` (uid 10001, home and working
# directory /var/lib/rt, data volume mount point /var/lib/rt/data) and checks its health
# with rt-healthcheck (deploy/healthcheck: bash's /dev/tcp, no curl in the image).
ARG BUILDER_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
# 1. Dependencies only, from the manifests and stub sources, so this (slow) layer is
#    reused while Cargo.lock and the manifests are unchanged. A new workspace member needs
#    its manifest listed here.
COPY Cargo.toml Cargo.lock ./
COPY libs/messages/Cargo.toml libs/messages/
COPY libs/testkit/Cargo.toml libs/testkit/
COPY libs/servicekit/Cargo.toml libs/servicekit/
COPY services/ws-gateway/Cargo.toml services/ws-gateway/
COPY services/ws-api/Cargo.toml services/ws-api/
COPY services/scheduler/Cargo.toml services/scheduler/
COPY services/agent/Cargo.toml services/agent/
COPY loadtest/Cargo.toml loadtest/
RUN set -e; \
    for d in libs/messages libs/testkit libs/servicekit services/ws-gateway services/ws-api \
             services/scheduler services/agent loadtest; do \
      mkdir -p $d/src $d/benches $d/src/bin; echo '' > $d/src/lib.rs; echo 'fn main() {}' > $d/src/main.rs; \
    done; \
    echo 'fn main() {}' > libs/messages/benches/codec.rs; \
    echo 'fn main() {}' > services/scheduler/src/bin/schedctl.rs; \
    cargo build --release --locked --workspace --bins; \
    rm -rf libs services loadtest target/release/.fingerprint/messages-* \
      target/release/.fingerprint/testkit-* target/release/.fingerprint/servicekit-* \
      target/release/.fingerprint/ws-gateway-* target/release/.fingerprint/ws-api-* \
      target/release/.fingerprint/scheduler-* target/release/.fingerprint/agent-* \
      target/release/.fingerprint/loadtest-*
# 2. The real sources. The binaries keep their line tables (useful backtraces), compressed.
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && cd target/release \
 && cp ws-gateway ws-api scheduler schedctl agent loadtest /out/ \
 && for b in /out/*; do objcopy --compress-debug-sections=zlib "$b"; done

FROM ${RUNTIME_IMAGE}
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/rt rt \
 && mkdir -p /var/lib/rt/data && chown rt:rt /var/lib/rt/data
COPY --from=build /out/ /usr/local/bin/
COPY deploy/healthcheck /usr/local/bin/rt-healthcheck
USER rt
WORKDIR /var/lib/rt
# Every HTTP service answers GET /healthz; HEALTH_PORT says on which port (compose sets
# it per service; the agent, which has no HTTP port, turns the check off).
ENV HEALTH_PORT=8080
HEALTHCHECK --interval=3s --timeout=3s --start-period=10s --retries=20 CMD ["rt-healthcheck"]
