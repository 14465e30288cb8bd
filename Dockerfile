# One image with every service binary. Base images are build arguments so the image can be
# built from local bases where no registry is reachable (issue 6 builds them with debootstrap).
ARG BUILDER_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/ws-gateway target/release/ws-api target/release/scheduler target/release/agent /out/

FROM ${RUNTIME_IMAGE}
RUN useradd --system --uid 10001 --no-create-home rt
COPY --from=build /out/ /usr/local/bin/
USER rt
# Each service answers /healthz; compose picks the command and the port.
