# The image the DaemonSet and the controller Deployment run: the agent, spiderctl, the CNI plugins
# `spiderpool` and `coordinator` (copied to the host by the DaemonSet's init container, the
# coordinator also as `veth`, the seed's name) and spiderpool-controller. Build: docker build -t spiderpool-rs:0.1.0 .
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p spiderpool-agent -p spiderpool-cni -p spiderpool-controller \
 && install -m 0755 target/release/spiderpool-agent target/release/spiderctl target/release/spiderpool target/release/coordinator target/release/spiderpool-controller /usr/local/bin/

FROM debian:bookworm-slim
COPY --from=build /usr/local/bin/spiderpool-agent /usr/local/bin/spiderctl /usr/local/bin/spiderpool /usr/local/bin/coordinator /usr/local/bin/spiderpool-controller /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/spiderpool-agent"]
