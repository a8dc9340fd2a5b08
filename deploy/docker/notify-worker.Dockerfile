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
# /metrics, /healthz and /readyz on metrics_addr, which comes from the settings file only
# (deploy/mediafarm.container.toml, the k8s ConfigMap: 0.0.0.0:9808): an ENV here would override
# the file silently, so moving the port in the settings would move beat's (whose image sets
# none) but not the workers', and the probes, which follow the settings, would miss them.
# Without a settings file a container serves on 127.0.0.1:9808 only (the safe default).
EXPOSE 9808
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/notify-worker"]
CMD ["--config", "/etc/mediafarm/mediafarm.toml", "--queues", "notify"]
