#!/bin/sh
# Container entry point. With no arguments or `serve`: run the HTTP service on $PORT (default 8000).
# Anything else is executed as given, e.g. `slide gen ...` or `sh`.
set -eu

data_dir="${SLIDE_DATA_DIR:-/data}"
mkdir -p "$data_dir" "${NUMBA_CACHE_DIR:-/tmp/numba-cache}" 2>/dev/null || true
if [ ! -d "$data_dir" ] || [ ! -w "$data_dir" ]; then
    echo "slide-entrypoint: data dir $data_dir is missing or not writable by uid $(id -u)." >&2
    echo "  For a bind mount, run 'chown -R $(id -u):$(id -g) <host dir>' or start with '--user \$(id -u):\$(id -g)'." >&2
    exit 1
fi

if [ "$#" -eq 0 ] || [ "$1" = "serve" ]; then
    [ "$#" -gt 0 ] && shift
    # One worker: the service owns its trainer processes and swaps live models in-process.
    # exec: uvicorn becomes this process, so `docker stop` (SIGTERM) reaches it directly.
    exec uvicorn app.main:app --host 0.0.0.0 --port "${PORT:-8000}" "$@"
fi

exec "$@"
