# syntax=docker/dockerfile:1
# One image for every service: `cem ingest`, `cem scoring`, `cem api`, `cem migrate`
# (docker run IMAGE scoring). Built from the repository root:
#   docker build -t cem-touchpoints:0.1.0 .

# ---- build: install the package and its pinned dependencies into a venv -------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A venv is one directory to copy into the runtime stage, without pip's build leftovers.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
# Not editable: the runtime stage has no source tree. pip byte-compiles what it
# installs, which matters since the containers run with a read-only root filesystem.
RUN pip install --no-cache-dir .

# ---- runtime ---------------------------------------------------------------------------
FROM python:3.11-slim AS runtime

# A numeric uid, so Kubernetes' runAsNonRoot can verify it without resolving a name.
RUN groupadd --system --gid 10001 cem \
 && useradd --system --uid 10001 --gid cem --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin cem

COPY --from=build /opt/venv /opt/venv
# Journey maps and JSON schemas; Kubernetes may mount other journeys over
# /app/schemas/journeys or point CEM_JOURNEYS_DIR elsewhere.
COPY schemas /app/schemas

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CEM_HOST=0.0.0.0 \
    CEM_SCHEMAS_DIR=/app/schemas \
    CEM_JOURNEYS_DIR=/app/schemas/journeys

# Fail the build, not the first pod, if the installed package cannot load the journeys
# (they and their JSON schema must be found outside a source checkout).
RUN cem --help > /dev/null \
 && python -c "from services.core.journeys import load_journeys; from services.core.settings import Settings; load_journeys(Settings().journeys_dir)"

WORKDIR /app
USER 10001:10001

# api, ingest, scoring (health and metrics)
EXPOSE 8000 8001 8002

ENTRYPOINT ["cem"]
CMD ["api"]
