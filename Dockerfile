# syntax=docker/dockerfile:1
#
#   docker build -t lakebase-proxy .                       the proxy (the last stage, "runtime")
#   docker build --target demo -t lakebase-proxy:demo .    the OAuth stand-in of `docker compose --profile demo up`
#
# The runtime stage holds only production dependencies, dist/src and bin, and runs as a non-root user.

ARG NODE_IMAGE=node:24-bookworm-slim

# --- build: every dependency, then the TypeScript compiler ---------------------------------
FROM ${NODE_IMAGE} AS build
WORKDIR /app
COPY package.json package-lock.json ./
# --ignore-scripts: `prepare` would compile before the sources are here, and no dependency the
# build or the runtime uses needs an install script.
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY tsconfig.json ./
COPY bin ./bin
COPY src ./src
COPY test ./test
RUN npx tsc -p tsconfig.json

# --- the native relay (native/relay.c): a C compiler only in this stage ---------------------
# The official images carry Node's headers (OpenSSL's included) under /usr/local/include/node.
FROM ${NODE_IMAGE} AS native
RUN apt-get update && apt-get install -y --no-install-recommends python3 make g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY binding.gyp ./
COPY native ./native
RUN npm_config_nodedir=/usr/local npx --yes node-gyp@12 rebuild

# --- production dependencies only ----------------------------------------------------------
FROM ${NODE_IMAGE} AS prod-deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund && npm cache clean --force

# --- demo: the Databricks OAuth stand-in of the compose demo profile (test code, dev deps) --
FROM ${NODE_IMAGE} AS demo
ENV NODE_ENV=production
WORKDIR /app
COPY --from=build /app/package.json ./
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY --from=build /app/bin ./bin
USER 1000:1000
CMD ["node", "dist/test/harness/demo-standin.js"]

# --- runtime: the proxy ----------------------------------------------------------------------
FROM ${NODE_IMAGE} AS runtime
# In a container the loopback defaults would leave both endpoints unreachable from outside it.
# Listening beyond loopback needs client authentication: give ClientUsers (or AllowInsecureListen).
ENV NODE_ENV=production \
    LAKEBASE_PROXY_ADDRESS=0.0.0.0 \
    LAKEBASE_PROXY_HTTP_ADDRESS=0.0.0.0
WORKDIR /app
# package.json: --version reads it.
COPY package.json ./
COPY --from=prod-deps /app/node_modules ./node_modules
COPY --from=build /app/dist/src ./dist/src
COPY --from=native /app/build/Release/lakebase_relay.node ./build/Release/lakebase_relay.node
COPY bin ./bin
# Numeric, so that Kubernetes' runAsNonRoot can verify it (the image's "node" user).
USER 1000:1000
EXPOSE 5432 9090
# Slim images have no curl; Node's fetch does the probe. --no-http turns the endpoint off:
# run such a container with --no-healthcheck.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:'+(process.env.LAKEBASE_PROXY_HTTP_PORT||9090)+'/liveness').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
ENTRYPOINT ["node", "bin/lakebase-proxy.js"]
