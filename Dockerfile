# One image for every Headrace process: api, worker, flower, migrate, simulate.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY broker_config ./broker_config
COPY db ./db
COPY workers ./workers
COPY api ./api
COPY headrace ./headrace
RUN pip install . && useradd --system --uid 10001 headrace
USER headrace
ENTRYPOINT ["headrace"]
CMD ["--help"]
