# syntax=docker/dockerfile:1
# Multi-stage: dependencies are built in a throwaway stage; the runtime image holds only the
# virtualenv and the code, and runs as an unprivileged user.
# One image for every command: `docker run IMAGE serve|consume|run|backfill ...|migrate`.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY handlers ./handlers
COPY consumers ./consumers
# SQL, demo dialogs and the Evolution schema are package data: installed with the package.
RUN pip install --no-compile .

FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=8084
RUN useradd --system --uid 10001 --home-dir /app --create-home crm
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
USER crm
EXPOSE 8084
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import os,urllib.request,sys; r=urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT','8084'), timeout=2); sys.exit(0 if r.status==200 else 1)"
ENTRYPOINT ["crm-backend"]
CMD ["run"]
