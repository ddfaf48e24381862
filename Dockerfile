# backfill: one-shot job image. Build:  docker build -t backfill:$(git rev-parse --short HEAD) .
# Without a registry (base images made locally, a private daemon): bash scripts/image.sh
# Run:    docker run --rm --env-file db.env -v "$PWD/jobs:/jobs:ro" backfill:TAG run /jobs
# No secrets are baked in: specs read ${DATABASE_URL} / ${CLICKHOUSE_URL} from the environment
# at run time. No `# syntax=` line: the builder's own Dockerfile frontend covers everything used
# here, so BuildKit fetches no frontend image from Docker Hub and the classic builder works too.

# ---- build -------------------------------------------------------------------------------------
# Same Rust as CI (rustc 1.95, edition 2024); bookworm so the binary's glibc matches the runtime.
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# Dependencies first, in their own layer: build the locked dependency graph against placeholder
# sources, so editing src/ only recompiles this crate, not the few hundred crates it depends on.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# (A build.rs, if one is ever added, must be copied above and allowed in .dockerignore.)
COPY src ./src
# touch: the real sources must look newer than the placeholder build, or cargo keeps its output.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked

# ---- runtime -----------------------------------------------------------------------------------
# distroless/cc: glibc, libgcc, CA certificates (TLS to Postgres and the push gateway), tzdata;
# no shell, no package manager. About 25 MB plus the binary.
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=builder /src/target/release/backfill /usr/local/bin/backfill
# Example specs: the Postgres ones in /jobs (`run /jobs` needs only DATABASE_URL), the ClickHouse
# one in /jobs/clickhouse (a directory run does not descend into it). Mount your own over /jobs
# (docker -v ...:/jobs:ro, a Kubernetes ConfigMap).
COPY jobs/ /jobs/

# Numeric uid:gid (distroless "nonroot"): Kubernetes can only verify runAsNonRoot for a number.
USER 65532:65532
WORKDIR /jobs
# Prometheus listener, when run with --metrics-addr 0.0.0.0:9464.
EXPOSE 9464

# Signals: no tini. The exec-form ENTRYPOINT makes backfill itself PID 1, so docker stop and the
# kubelet's SIGTERM reach it directly; it handles SIGTERM/SIGINT itself (the first stops at the
# next batch boundary and exits 75, a second exits at once) and starts no child processes, so
# there are no zombies to reap. As PID 1 a signal without a handler is ignored rather than fatal;
# that only matters before the handlers are installed (while specs are parsed: nothing written
# yet), and the runtime's SIGKILL after the grace period covers it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/backfill"]
# Harmless default: check the baked-in specs without touching a database.
CMD ["validate", "/jobs"]
