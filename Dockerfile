# Agent Platform: one image for the web (gunicorn + uvicorn's worker), Celery worker and beat processes.
#
#   docker build -t agentplatform .
#   docker run --rm -p 8000:8000 -e SECRET_KEY=... -e DATABASE_URL=... -e REDIS_URL=... agentplatform
#
# The default command migrates and then serves on 0.0.0.0:8000; docker-compose.yml runs the
# migrations once in a service of their own and overrides the command per service.
FROM python:3.11-slim

# PYTHONPATH: the source tree in /app comes before site-packages, so BASE_DIR (templates,
# static, fixtures) is /app whichever way a process (gunicorn, daphne, celery, manage.py) imports it.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=agentplatform.settings \
    PYTHONPATH=/app \
    VAR_DIR=/app/var

WORKDIR /app

# Dependencies first (a layer that changes only with pyproject.toml), then the code.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# collectstatic needs the settings to load: ALLOW_INSECURE_SECRET_KEY for this one command
# only, so no secret is baked into the image (SECRET_KEY is required at run time).
COPY . .
RUN pip install --no-deps . \
    && ALLOW_INSECURE_SECRET_KEY=true python manage.py collectstatic --noinput -v 0 \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin app \
    && mkdir -p /app/var \
    && chown -R app:app /app/var

USER app

EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

CMD ["sh", "-c", "python manage.py migrate --noinput && exec gunicorn -c python:agentplatform.gunicorn_conf -w 1 -b 0.0.0.0:8000 agentplatform.asgi:application"]
