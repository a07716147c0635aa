# Shared helpers for the scripts in this folder (sourced, not run).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# wait_for_port HOST PORT SECONDS: true once something accepts connections there.
wait_for_port() {
  local host=$1 port=$2 limit=$3 i
  for ((i = 0; i < limit * 10; i++)); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "nothing listening on $host:$port after ${limit}s" >&2
  return 1
}

# free_port: a TCP port nobody listens on right now.
free_port() {
  "$root/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# build_tools WHO REQUIREMENTS...: .venv-build (the large build tools: cargo-lambda, zig, the
# SAM CLI), with these requirement files installed; pip runs again only when they change.
build_tools() {
  local who=$1 venv="$root/.venv-build" want
  shift
  want="$(cat "$@" | sha256sum | cut -d' ' -f1)"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  if [ ! -e "$venv/.installed-$want" ]; then
    echo "$who: installing $(basename -a "$@" | tr '\n' ' ')into .venv-build" >&2
    local r
    for r in "$@"; do
      "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$r" >&2
    done
    touch "$venv/.installed-$want"
  fi
}
