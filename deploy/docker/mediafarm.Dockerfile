# syntax=docker/dockerfile:1.7
# The `mediafarm` command: `beat` (the scheduler; run two, its Redis lease keeps one active) and
# the CLI (submit, result, revoke, purge, dead letters). Build from the repository root:
#   docker build -f deploy/docker/mediafarm.Dockerfile -t mediafarm/mediafarm .

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mediafarm --bin mediafarm \
 && install -D -m 0755 target/release/mediafarm /out/mediafarm

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/mediafarm /usr/local/bin/mediafarm
# beat serves /metrics, /healthz and /readyz on metrics_addr from the settings file, like the
# workers (one source: no MEDIAFARM_METRICS_ADDR in any image; 0.0.0.0:9808 in the settings).
EXPOSE 9808
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mediafarm", "--config", "/etc/mediafarm/mediafarm.toml"]
CMD ["beat"]
