# syntax=docker/dockerfile:1.7
# notify-worker: build in the Rust image, run on distroless cc (glibc + libgcc + CA certificates,
# no shell, no package manager). Build from the repository root:
#   docker build -f deploy/docker/notify-worker.Dockerfile -t mediafarm/notify-worker .

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# The registry and target caches survive between builds; the binary is copied out of the cache
# mount in the same step because the mount is gone afterwards.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p notify-worker --bin notify-worker \
 && install -D -m 0755 target/release/notify-worker /out/notify-worker

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/notify-worker /usr/local/bin/notify-worker
# Containers serve /metrics, /healthz and /readyz on every interface.
ENV MEDIAFARM_METRICS_ADDR=0.0.0.0:9808
EXPOSE 9808
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/notify-worker"]
CMD ["--config", "/etc/mediafarm/mediafarm.toml", "--queues", "notify"]
