# tunnel-gateway: one image for the gateway, the tunnel client and the demo backend.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml setup.cfg README.md ./
COPY gateway ./gateway
COPY proto ./proto
COPY scripts ./scripts
COPY conf ./conf
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin tunnel \
    && mkdir -p /etc/tunnel-gateway /var/lib/tunnel-client \
    && cp conf/gateway.toml /etc/tunnel-gateway/gateway.toml \
    && chown tunnel /var/lib/tunnel-client

USER tunnel

# 8001 HTTP entry, 8002 gRPC entry, 50001 tunnel, 9090 admin (DESIGN.md).
EXPOSE 8001 8002 50001 9090

# The admin port's /healthz answers 200 while the gateway serves, 503 while it drains.
# (For the client and the backend, compose sets their own checks.)
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HEALTH_PORT', '9090'), timeout=2)"]

# The image's own config is the demo's (conf/gateway.toml, on loopback); in a container the
# public ports must listen on every address (a container's loopback is unreachable from
# outside). The admin port stays on the container's loopback (admin_host in the file): a
# non-loopback admin needs admin_token, and the HEALTHCHECK reaches it from inside.
CMD ["tunnel-gateway", "--config", "/etc/tunnel-gateway/gateway.toml", "--host", "0.0.0.0"]
