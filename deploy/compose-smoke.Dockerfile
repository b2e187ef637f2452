# Redis and Prometheus for deploy/compose-smoke.sh where redis:7-alpine and prom/prometheus
# cannot be pulled: Debian's packages on the same base image as nlpmesh:dev
# (deploy/compose.smoke.yml runs them with docker-compose.yml's commands and config files).
# compose's Redis command runs redis-server as the redis user with su-exec, as redis:7-alpine has it; Debian
# has no su-exec package, so a two-line one over util-linux's setpriv stands in for it.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && printf '#!/bin/sh\nuser="$1"; shift\nexec setpriv --reuid="$user" --regid="$user" --init-groups "$@"\n' > /usr/local/bin/su-exec \
 && chmod 755 /usr/local/bin/su-exec \
 && redis-server --version && prometheus --version
