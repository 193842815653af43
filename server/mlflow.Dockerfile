# The tracking server image: the official MLflow image plus what it lacks for this stack, the
# PostgreSQL driver and the basic-auth app's CSRF dependency. Keep the tag equal to the MLflow
# version pyproject.toml pins (tests/test_compose.py checks it).
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir "psycopg2-binary>=2.9" "mlflow[auth]==3.17.2"
