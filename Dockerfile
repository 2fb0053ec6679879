# SLIDE service image: `docker build -t slide .` then `docker run -p 8000:8000 -v slide-data:/data slide`
# (or `docker compose up`). Anything after the image name replaces the default `serve` command,
# e.g. `docker run --rm -v slide-data:/data slide slide gen --help`.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Unprivileged runtime user; fixed ids so a bind-mounted data dir can be chown'ed to match.
RUN groupadd --system --gid 10001 slide \
    && useradd --system --uid 10001 --gid slide --create-home --home-dir /home/slide \
        --shell /usr/sbin/nologin slide

WORKDIR /opt/slide

# Optional extras of pyproject.toml to install too, comma-separated (the compose file's ray profile builds
# with EXTRAS=ray,postgres: Ray nodes and the service that drives them need the same Ray).
ARG EXTRAS=""

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when pyproject.toml changes,
# not on every source edit.
COPY pyproject.toml ./
RUN python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = [e for e in os.environ.get('EXTRAS', '').split(',') if e]; print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself (dependencies already present).
COPY README.md ./
COPY engine ./engine
COPY app ./app
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info

COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/slide-entrypoint

# /data holds the database, datasets and model snapshots (mount a volume there).
# Numba writes its compiled-kernel cache to NUMBA_CACHE_DIR, since site-packages is not writable by the
# runtime user.
ENV SLIDE_DATA_DIR=/data \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    PORT=8000
RUN mkdir -p /data /tmp/numba-cache \
    && chown slide:slide /data /tmp/numba-cache
VOLUME ["/data"]

USER 10001:10001
EXPOSE 8000

# /healthz only says the process is alive; /readyz also checks the database and data dir.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]

ENTRYPOINT ["slide-entrypoint"]
CMD ["serve"]
