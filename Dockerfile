# syntax=docker/dockerfile:1
# The pushgate node image: `pushgate serve`, non-root, on port 8080.
#
#     docker build -t pushgate .
#     docker run --rm -p 8080:8080 -e PUSHGATE_JWT_SECRET=change-me pushgate
#
# Configure it with PUSHGATE_* environment variables (docs/protocol.md, "Configuration"). Give
# `docker stop` more time than the drain period (`--stop-timeout 20`; docker's default of 10 s
# equals PUSHGATE_DRAIN_PERIOD's default and would cut the drain short).

# Build stage: the Rust toolchain on the same Debian release as the runtime image (glibc match).
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
# Line tables are dropped from the image's binary (the release profile keeps them for local
# backtraces): about a fifth of the size. Cache mounts keep crates and build output between
# builds (BuildKit).
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p pushgate \
    && install -D -m 0755 target/release/pushgate /out/pushgate

# A statically linked busybox: its `wget` runs the health check in a runtime image that has no
# shell or HTTP client of its own.
FROM busybox:1.36-musl AS busybox

# Runtime: glibc and libgcc only (distroless "cc"), no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/pushgate /usr/local/bin/pushgate
COPY --from=busybox /bin/busybox /usr/local/bin/busybox
# The image's `nonroot` account (uid and gid 65532); the node needs no privileges and writes
# no files.
USER 65532:65532
ENV PUSHGATE_LISTEN=0.0.0.0:8080
EXPOSE 8080
# Liveness: /healthz answers 200 while the process serves HTTP. The check assumes the port
# above: override it along with PUSHGATE_LISTEN.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/healthz"]
# SIGTERM starts the graceful drain: /readyz turns 503, connections close with 1001 in batches
# over PUSHGATE_DRAIN_PERIOD, then the process exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pushgate", "serve"]
