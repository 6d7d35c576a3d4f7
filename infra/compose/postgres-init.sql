-- Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d).
-- POSTGRES_DB already created `mlflow` (MLflow's backend store); this adds the database of the
-- Iceberg SQL catalog and flowscore's job locks, owned by the same user.
CREATE DATABASE iceberg;
