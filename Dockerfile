# syntax=docker/dockerfile:1
# Build stage: a wheel and its dependencies, compiled where needed.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY metering metering
COPY quota quota
COPY billing_sync billing_sync
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: only the installed wheels, a non-root user, no compilers.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin gateway \
 && mkdir -p /app/var && chown gateway /app/var
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/example.yaml /app/config.yaml
WORKDIR /app
USER gateway
# The admin listener serves the admin API and an unauthenticated /metrics (tenant ids in its labels): it
# stays on the container's loopback unless it is exposed on purpose, on a network only operators and
# Prometheus reach, e.g. `docker run -e GATEWAY__LISTEN__ADMIN=0.0.0.0:8081 --network ops-private ...`
# (never with `-p 8081:8081` on a public interface). The HEALTHCHECK below works either way.
ENV GATEWAY_CONFIG=/app/config.yaml \
    GATEWAY__LISTEN__PROXY=0.0.0.0:8080 \
    GATEWAY__LISTEN__ADMIN=127.0.0.1:8081 \
    PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=2)" || exit 1
# Migrations run as a separate step (`cosmos-gateway db upgrade`) in production deployments.
ENTRYPOINT ["cosmos-gateway"]
CMD ["serve"]
