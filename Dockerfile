# The image the Helm chart runs: Ray 2.60 with moeserve installed. BASE picks Ray's CPU or GPU image.
#   docker build -t registry.example/moeserve:0.1.0 .
#   docker build --build-arg BASE=rayproject/ray:2.60.0-py311-gpu -t registry.example/moeserve:0.1.0-gpu .
ARG BASE=rayproject/ray:2.60.0-py311
FROM ${BASE}
COPY --chown=ray:users . /home/ray/moeserve
RUN pip install --no-cache-dir /home/ray/moeserve && rm -rf /home/ray/moeserve
