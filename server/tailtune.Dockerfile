# Ray head, Ray GPU workers and the search driver: Ray's image with the project installed, so every
# node runs the same trainables. The Ray and Python versions must match pyproject.toml (a driver
# whose Ray differs from the cluster's is rejected at connect).
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /opt/tailtune
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users trainables trainables
COPY --chown=ray:users spaces spaces
COPY --chown=ray:users search search
COPY --chown=ray:users server server
RUN pip install --no-cache-dir -e .
