# Warren, the AMQP 0-9-1 broker, in an image built from local files only (no registry):
# a fully static `warren` binary in an empty (scratch) image, run as user 10001.
#
# Build it with scripts/docker-build.sh, which compiles the static binary and stages
# target/docker/ (this file copies from there; a plain `docker build .` without that step
# fails with "COPY failed: ... target/docker/warren: no such file or directory").
#
#   docker run -d -p 5672:5672 -v warren-data:/var/lib/warren warren:local
#
# Configuration: the environment variables of docs/cli.md (WARREN_*), and those of the
# official rabbitmq image: RABBITMQ_DEFAULT_USER, RABBITMQ_DEFAULT_PASS, RABBITMQ_DEFAULT_VHOST.
FROM scratch

ARG WARREN_VERSION=unknown
ARG WARREN_REVISION=unknown
LABEL org.opencontainers.image.title="warren" \
      org.opencontainers.image.description="Warren: an AMQP 0-9-1 message broker compatible with RabbitMQ clients" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${WARREN_VERSION}" \
      org.opencontainers.image.revision="${WARREN_REVISION}"

# The binaries (root-owned, read-only for the broker), /tmp (1777), /etc/passwd and /etc/group.
COPY target/docker/warren/ /
# The data directory, owned by the non-root user; a new named volume mounted here takes this
# ownership.
COPY --chown=10001:10001 target/docker/warren-data/ /var/lib/warren/

# Like the official rabbitmq image, the default user may connect from any address (the image's
# network is not the host's loopback): an empty WARREN_LOOPBACK_USERS means no restriction.
# NO_COLOR: plain log lines in `docker logs`.
ENV WARREN_DATA_DIR=/var/lib/warren \
    WARREN_LOOPBACK_USERS= \
    NO_COLOR=1

WORKDIR /var/lib/warren
VOLUME /var/lib/warren
USER 10001:10001

# 5672 AMQP; 5671 AMQPS, 15672 management and 15692 metrics are reserved (RabbitMQ's ports).
EXPOSE 5672 5671 15672 15692

# `warren diagnostics ping` sends the AMQP protocol header to 127.0.0.1:5672 and waits for
# connection.start.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/warren", "diagnostics", "ping", "--timeout-ms", "4000"]

# Process 1 is warren itself: on SIGTERM (docker stop) it closes every connection with
# 320 CONNECTION_FORCED and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/warren"]
