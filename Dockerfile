# The `orderflow` binary in a small image. One image for every role: the command picks it
# (`all` by default; `api`, `worker <name>`, `migrate`, `token ...`).
#
#   docker build -t orderflow .
#   docker run --rm -p 8080:8080 -e DATABASE_URL=... -e AMQP_URL=... orderflow

# --- build ------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /app
# Runtime queries only today; if compile-time checked queries arrive, they build from .sqlx/.
ENV SQLX_OFFLINE=true CARGO_TERM_COLOR=never

# 1. Dependencies only: the manifests and the lock file with empty crate roots, so this layer
#    is rebuilt only when dependencies change. (The image's toolchain is the version that
#    rust-toolchain.toml pins; that file is left out so rustup does not fetch components.)
COPY Cargo.toml Cargo.lock ./
COPY api/Cargo.toml api/
COPY workers/Cargo.toml workers/
COPY shared/Cargo.toml shared/
COPY bench/Cargo.toml bench/
RUN mkdir -p src api/src workers/src shared/src bench/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch api/src/lib.rs workers/src/lib.rs shared/src/lib.rs bench/src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src api/src workers/src shared/src bench/src

# 2. The real sources. Touch them so cargo never mistakes them for the placeholders above.
COPY src src
COPY api api
COPY workers workers
COPY shared shared
COPY bench bench
COPY migrations migrations
RUN find src api workers shared bench -name '*.rs' -exec touch {} + \
 && cargo build --release --locked \
 && install -m 0755 target/release/orderflow /usr/local/bin/orderflow

# --- run --------------------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin orderflow
COPY --from=builder /usr/local/bin/orderflow /usr/local/bin/orderflow
USER orderflow
ENV HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["orderflow"]
CMD ["all"]
