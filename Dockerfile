# syntax=docker/dockerfile:1
# One Dockerfile, one target per binary:
#   docker build --target backend      -t lb-demo/backend:0.1.0 .
#   docker build --target loadbalancer -t lb-demo/loadbalancer:0.1.0 .
# `make images` runs both. Both targets share the builder stages, so the
# workspace is compiled once.

ARG RUST_VERSION=1.89

# cargo-chef splits the build in two: dependencies (slow, rarely change)
# are cooked from a recipe in their own cached layer; our code comes after.
FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked -p backend -p loadbalancer

# Runtime images: distroless with glibc, no shell, no package manager,
# running as the unprivileged user 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot AS backend
COPY --from=builder /src/target/release/backend /usr/local/bin/backend
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/backend"]

FROM gcr.io/distroless/cc-debian12:nonroot AS loadbalancer
COPY --from=builder /src/target/release/loadbalancer /usr/local/bin/loadbalancer
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/loadbalancer"]
