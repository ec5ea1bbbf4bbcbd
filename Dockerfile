# Herald and its load-test tools in one small image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p herald -p herald-load-tests --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/herald /src/target/release/herald-sink /src/target/release/herald-load /usr/local/bin/
RUN useradd --system --home /var/lib/herald herald && mkdir -p /var/lib/herald && chown herald /var/lib/herald
USER herald
WORKDIR /var/lib/herald
EXPOSE 8080
ENTRYPOINT ["herald"]
CMD ["serve", "--config", "/etc/herald/herald.toml"]
