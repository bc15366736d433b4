# MAIS for MONAI Label: a GPU image serving the app on the bundled sample data.
#
#   docker build -t mais .
#   docker run --gpus all -p 8000:8000 -v mais-trained:/trained mais        # sample data
#   docker run --gpus all -p 8000:8000 -v mais-trained:/trained -v /path/to/studies:/studies mais \
#       --studies /studies                                                   # your images (NIfTI/NRRD folder)
#   docker run -p 8000:8000 -v mais-trained:/trained mais                   # CPU only: no --gpus
#
# The torch wheel in requirements.txt is a CUDA build: it uses the GPUs that `--gpus all` exposes and falls back
# to the CPU without them. Nothing is downloaded when the container runs: weights and sample data are inside.
# Training runs and the weights they publish go to /trained (`--conf train_dir`): a named volume keeps them when
# the container is replaced; without one they live and die with the container. .dockerignore keeps a used
# checkout's trained weights and datastore files out of the image.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MONAI_LABEL_TRACKING_ENABLED=false

WORKDIR /opt/mais
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY apps ./apps
COPY sample-data ./sample-data

# Studies mounted here are written to (labels, datastore index): mount a folder you own.
VOLUME ["/studies", "/trained"]
EXPOSE 8000

ENTRYPOINT ["monailabel", "start_server", "--app", "/opt/mais/apps/mais", "--host", "0.0.0.0", "--port", "8000", \
            "--conf", "train_dir", "/trained"]
CMD ["--studies", "/opt/mais/sample-data"]
