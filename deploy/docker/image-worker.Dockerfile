# syntax=docker/dockerfile:1.7
# image-worker: build in the Rust image, run on Debian bookworm slim with libheif (HEIC and AVIF
# sources; it pulls in libde265, which the binary also links, and dav1d/libaom).
# Build from the repository root:
#   docker build -f deploy/docker/image-worker.Dockerfile -t mediafarm/image-worker .

FROM rust:1.95-bookworm AS builder
# nasm assembles libjpeg-turbo's x86 SIMD code when mozjpeg-sys builds it (libjpeg-turbo and
# libwebp are compiled from their crates and linked statically: the runtime needs neither);
# libheif-dev and libde265-dev for linking libheif and libde265 (HEIC decoded directly).
# Debian's packages float with bookworm's updates on purpose; pinning breaks at the next point
# release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nasm libheif-dev libde265-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The registry and target caches survive between builds; the binary is copied out of the cache
# mount in the same step because the mount is gone afterwards.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p image-worker --bin image-worker \
 && install -D -m 0755 target/release/image-worker /out/image-worker

FROM debian:bookworm-slim
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Runtime libraries only (no -dev packages, no heif-enc); CA certificates for S3 over TLS. The
# user keeps distroless nonroot's uid, which the manifests run as. Same reason as above for
# floating versions.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libheif1 libde265-0 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin mediafarm
COPY --from=builder /out/image-worker /usr/local/bin/image-worker
# Fail the image build, not the first pod, if the binary needs a library this stage lacks.
RUN if ldd /usr/local/bin/image-worker | grep 'not found'; then exit 1; fi
# /metrics, /healthz and /readyz on metrics_addr, which comes from the settings file only
# (deploy/mediafarm.container.toml, the k8s ConfigMap: 0.0.0.0:9808): an ENV here would override
# the file silently, so moving the port in the settings would move beat's (whose image sets
# none) but not the workers', and the probes, which follow the settings, would miss them.
# Without a settings file a container serves on 127.0.0.1:9808 only (the safe default).
EXPOSE 9808
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/image-worker"]
CMD ["--config", "/etc/mediafarm/mediafarm.toml", "--queues", "image"]
