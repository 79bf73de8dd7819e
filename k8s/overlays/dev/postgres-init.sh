# DEVELOPMENT ONLY. Run by the postgres image on the first start of an empty data directory
# (here every start, since the data lives in an emptyDir). It gives each service but identity
# a database and a login role of its own, named after the service, that no other role may
# connect to; identity keeps the database POSTGRES_DB and the superuser POSTGRES_USER.
# The image's entrypoint sources this file (it is not executable); the passwords come from
# the Secret `postgres-dev` and must match the DATABASE_URL of each service's .dev.env.
create_service_database() {
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
        -v service="$1" -v password="$2" <<'SQL'
CREATE ROLE :"service" LOGIN PASSWORD :'password';
CREATE DATABASE :"service" OWNER :"service";
REVOKE ALL ON DATABASE :"service" FROM PUBLIC;
SQL
}
create_service_database risk "$RISK_DB_PASSWORD"
create_service_database gateway "$GATEWAY_DB_PASSWORD"
create_service_database testing "$TESTING_DB_PASSWORD"
create_service_database vaccination "$VACCINATION_DB_PASSWORD"
create_service_database exchange "$EXCHANGE_DB_PASSWORD"
