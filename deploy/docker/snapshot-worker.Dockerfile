# syntax=docker/dockerfile:1.7
# snapshot-worker: the only image with FFmpeg. It links libavcodec, libavformat, libavutil and
# libswscale, so the runtime is Debian bookworm slim with exactly those shared libraries (the
# versions the builder linked against: both stages are bookworm). Build from the repository root:
#   docker build -f deploy/docker/snapshot-worker.Dockerfile -t mediafarm/snapshot-worker .

FROM rust:1.95-bookworm AS builder
# FFmpeg headers for the bindings (the set scripts/setup.d/snapshot.sh installs; the binary
# links only avcodec, avformat, avutil and swscale); clang for bindgen; nasm for libjpeg-turbo's
# SIMD code (the JPEG encoder, linked statically as in the image worker). Versions float with
# bookworm's security updates on purpose: pinning them breaks the build at the next point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      clang libclang-dev pkg-config nasm \
      libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libavfilter-dev libavdevice-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p snapshot-worker --bin snapshot-worker --bin snapshot-hooks \
 && install -D -m 0755 target/release/snapshot-worker /out/snapshot-worker \
 && install -D -m 0755 target/release/snapshot-hooks /out/snapshot-hooks

FROM debian:bookworm-slim
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Runtime libraries only (no ffmpeg CLI, no -dev packages); CA certificates for TLS streams,
# S3 and webhooks. Same reason as above for floating versions.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates libavcodec59 libavformat59 libavutil57 libswscale6 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin mediafarm
# snapshot-hooks (the media server's publish hooks, README) ships in the same image: run it
# with --entrypoint /usr/local/bin/snapshot-hooks.
COPY --from=builder /out/snapshot-worker /out/snapshot-hooks /usr/local/bin/
# Fail the image build, not the first pod, if a binary needs a library this stage lacks.
RUN for b in snapshot-worker snapshot-hooks; do \
      if ldd "/usr/local/bin/$b" | grep 'not found'; then exit 1; fi; \
    done
# /metrics, /healthz and /readyz on metrics_addr, which comes from the settings file only
# (deploy/mediafarm.container.toml, the k8s ConfigMap: 0.0.0.0:9808): an ENV here would override
# the file silently, so moving the port in the settings would move beat's (whose image sets
# none) but not the workers', and the probes, which follow the settings, would miss them.
# Without a settings file a container serves on 127.0.0.1:9808 only (the safe default).
EXPOSE 9808
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/snapshot-worker"]
CMD ["--config", "/etc/mediafarm/mediafarm.toml", "--queues", "snapshot"]
