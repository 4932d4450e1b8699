#!/usr/bin/env bash
# The one entry point for a fresh Debian machine. Idempotent: re-running skips what is there.
#
#   scripts/setup.sh serve   install dependencies, build, start `moe-serve serve` (tiny model)
#   scripts/setup.sh test    install dependencies, build, run the whole test suite (ctest)
#   scripts/setup.sh deps    install dependencies only
#   scripts/setup.sh build   install dependencies and build
#   scripts/setup.sh golden  also install torch + transformers and regenerate the golden
#                            fixtures under tests/golden/ (needs PyPI; not part of `test`)
#
# Environment: BUILD_DIR (default build), MOE_CUDA (AUTO|ON|OFF, default AUTO),
# JOBS (default nproc).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build}"
JOBS="${JOBS:-$(nproc)}"
MODE="${1:-test}"
shift || true

APT_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git python3 python3-venv
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  libabsl-dev libyaml-cpp-dev nlohmann-json3-dev libcpp-httplib-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libopenblas-dev libdnnl-dev libpcre2-dev libicu-dev prometheus curl iproute2
)
PIP_PACKAGES=(numpy pytest openai grpcio grpcio-tools grpcio-health-checking grpcio-reflection
  prometheus-client tokenizers jinja2 safetensors requests)
GOLDEN_PIP_PACKAGES=(torch transformers)

log() { echo "[setup] $*" >&2; }

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    log "Debian packages: all present"
    return
  fi
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "Debian packages: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

python_for_venv() {
  # Prefer the machine's python3; Debian's needs python3-venv (installed above).
  command -v python3
}

install_venv() {
  local venv="$ROOT/.venv"
  if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    "$(python_for_venv)" -m venv "$venv"
  fi
  local stamp="$venv/.moe-packages"
  local want="${PIP_PACKAGES[*]} $*"
  if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
    log "PyPI packages: ${PIP_PACKAGES[*]} $*"
    "$venv/bin/pip" install -q --disable-pip-version-check "${PIP_PACKAGES[@]}" "$@"
    echo "$want" > "$stamp"
  else
    log "PyPI packages: all present"
  fi
}

build() {
  local cuda="${MOE_CUDA:-AUTO}"
  local gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  if [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
    cmake -S "$ROOT" -B "$BUILD_DIR" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_CUDA="$cuda"
  fi
  cmake --build "$BUILD_DIR" -j "$JOBS"
}

case "$MODE" in
  deps)
    install_apt; install_venv ;;
  build)
    install_apt; install_venv; build ;;
  test)
    install_apt; install_venv; build
    cd "$BUILD_DIR"
    ctest --output-on-failure -j "$JOBS" "$@" ;;
  serve)
    install_apt; install_venv; build
    exec "$BUILD_DIR/moe-serve" serve "$@" ;;
  golden)
    install_apt; install_venv "${GOLDEN_PIP_PACKAGES[@]}"; build
    "$ROOT/.venv/bin/python" "$ROOT/tests/golden/make_golden.py" --moe-serve "$BUILD_DIR/moe-serve" "$@" ;;
  *)
    echo "usage: scripts/setup.sh serve|test|deps|build|golden" >&2; exit 2 ;;
esac
