# syntax=docker/dockerfile:1.7
# image-worker: build in the Rust image, run on distroless cc (glibc + libgcc + CA certificates,
# no shell, no package manager). Build from the repository root:
#   docker build -f deploy/docker/image-worker.Dockerfile -t mediafarm/image-worker .

FROM rust:1.95-bookworm AS builder
# nasm assembles libjpeg-turbo's x86 SIMD code when mozjpeg-sys builds it (libjpeg-turbo and
# libwebp are compiled from their crates and linked statically: the runtime needs neither).
# Debian's nasm floats with bookworm's updates on purpose; pinning breaks at the next point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nasm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The registry and target caches survive between builds; the binary is copied out of the cache
# mount in the same step because the mount is gone afterwards.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p image-worker --bin image-worker \
 && install -D -m 0755 target/release/image-worker /out/image-worker

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/image-worker /usr/local/bin/image-worker
# /metrics, /healthz and /readyz on metrics_addr, which comes from the settings file only
# (deploy/mediafarm.container.toml, the k8s ConfigMap: 0.0.0.0:9808): an ENV here would override
# the file silently, so moving the port in the settings would move beat's (whose image sets
# none) but not the workers', and the probes, which follow the settings, would miss them.
# Without a settings file a container serves on 127.0.0.1:9808 only (the safe default).
EXPOSE 9808
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/image-worker"]
CMD ["--config", "/etc/mediafarm/mediafarm.toml", "--queues", "image"]
