# PostgreSQL for machines without an image hub (docker-compose.ci.yml): Debian bookworm's
# postgresql-15 with an entrypoint that honours what docker-compose.yml gives the official
# postgres image: POSTGRES_USER/PASSWORD/DB, /docker-entrypoint-initdb.d/*.sql on first start,
# data in /var/lib/postgresql/data, pg_isready for the healthcheck.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive PGDATA=/var/lib/postgresql/data PATH=/usr/lib/postgresql/15/bin:$PATH
# No default cluster: the entrypoint creates the one it is told to.
RUN set -eu; mkdir -p /etc/postgresql-common; \
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; \
    apt-get update -qq; apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null; \
    rm -rf /var/lib/apt/lists/*; \
    install -d -o postgres -g postgres /var/run/postgresql "$PGDATA"
COPY server/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
EXPOSE 5432
ENTRYPOINT ["sh", "/usr/local/bin/postgres-entrypoint.sh"]
