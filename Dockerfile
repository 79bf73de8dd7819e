# syntax=docker/dockerfile:1
# One image per service binary, built from the whole workspace:
#   docker build --build-arg SERVICE=identity -t healthcode/identity:0.1.0 .
# Needs BuildKit (the default builder of current Docker) for the cache mounts.

FROM rust:1.95-bookworm AS builder
ARG SERVICE=identity
WORKDIR /src
COPY . .
# The cache mounts keep downloaded crates and build artefacts between builds. They are not
# part of the image, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git/db \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin "${SERVICE}" \
    && cp "target/release/${SERVICE}" /usr/local/bin/service

# glibc and libgcc only, no shell; Debian 12 matches the builder's glibc.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /usr/local/bin/service /usr/local/bin/service
# Numeric, so that Kubernetes can verify runAsNonRoot from the image alone.
USER 65532:65532
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/service"]
