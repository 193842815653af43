-- The basic-auth app keeps its users in a second database of the same cluster (as server/stack.py does).
CREATE DATABASE mlflow_auth OWNER mlflow;
