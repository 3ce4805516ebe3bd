#!/usr/bin/env bash
# Build the Warren docker images without any registry: the `warren` binary is built fully
# static on this machine, staged under target/docker/ and copied into `FROM scratch` images.
#
#   scripts/docker-build.sh [--no-examples]
#
# Images (tags overridable by environment):
#   ${WARREN_IMAGE:-warren:local}                    the broker (Dockerfile)
#   ${WARREN_EXAMPLES_IMAGE:-warren-examples:local}  the example pika producer/consumer
#                                                    (examples/compose/Dockerfile); skipped
#                                                    with --no-examples
#
# Steps, all idempotent:
#   1. one release build: RUSTFLAGS='-C target-feature=+crt-static' cargo build --release
#      --target x86_64-unknown-linux-gnu --bin warren (and --bin warren-perf when the workspace
#      has it); it reuses target/ (the target triple gives it its own subdirectory) and waits
#      on cargo's lock when someone else is building.
#   2. checks that the binary is static (file, ldd), then stages target/docker/warren/: the
#      binaries (debug info stripped), /tmp (1777), /etc/passwd and /etc/group naming user
#      10001, and target/docker/warren-data/ (the data directory, chowned to 10001 by COPY).
#   3. docker build -t $WARREN_IMAGE .
#   4. stages target/docker/python/: the CPython that runs .venv (scripts/setup-python.sh makes
#      it), its trimmed standard library, the shared libraries it loads (from ldd) and pika
#      from .venv, all at their host paths; then docker build -f examples/compose/Dockerfile.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TRIPLE=x86_64-unknown-linux-gnu
UID_GID=10001
WARREN_IMAGE=${WARREN_IMAGE:-warren:local}
WARREN_EXAMPLES_IMAGE=${WARREN_EXAMPLES_IMAGE:-warren-examples:local}
STAGE=$ROOT/target/docker
EXAMPLES=1

for arg in "$@"; do
  case $arg in
    --no-examples) EXAMPLES=0 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "docker-build: unknown argument '$arg' (try --help)" >&2
      exit 2
      ;;
  esac
done

say() { echo "docker-build: $*"; }
die() {
  echo "docker-build: $*" >&2
  exit 1
}
# build_image TAG DOCKER-BUILD-ARGS...: builds TAG and removes the image it replaces (when no
# container uses it), so that rebuilds do not pile up dangling images.
build_image() {
  local tag=$1 old new
  shift
  old=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
  docker build -t "$tag" "$@"
  new=$(docker image inspect -f '{{.Id}}' "$tag")
  if [[ -n $old && $old != "$new" ]]; then
    docker rmi "$old" >/dev/null 2>&1 || true
  fi
}

command -v docker >/dev/null || die "no docker client installed"

# ---- 1. the static release build --------------------------------------------------------------
BINS=(warren)
if cargo metadata --no-deps --format-version 1 2>/dev/null | grep '"name":"warren-perf"' >/dev/null; then
  BINS+=(warren-perf)
fi
bin_args=()
for b in "${BINS[@]}"; do bin_args+=(--bin "$b"); done
say "cargo build --release --target $TRIPLE ${bin_args[*]} (static)"
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
  cargo build --release --target "$TRIPLE" "${bin_args[@]}"

# ---- 2. stage the broker image's root filesystem ----------------------------------------------
rm -rf "$STAGE/warren" "$STAGE/warren-data"
# var/lib exists (root-owned) before the Dockerfile's COPY --chown creates var/lib/warren, so
# that no builder gives the parent directories to user 10001.
mkdir -p "$STAGE/warren/usr/local/bin" "$STAGE/warren/etc" "$STAGE/warren/tmp" "$STAGE/warren/var/lib" \
  "$STAGE/warren-data"
chmod 1777 "$STAGE/warren/tmp"
chmod 0750 "$STAGE/warren-data"
for b in "${BINS[@]}"; do
  src=target/$TRIPLE/release/$b
  [[ -x $src ]] || die "$src was not built"
  # A static binary: `file` says "statically linked" or "static-pie linked", ldd says so too.
  if ! file -b "$src" | grep -Eq 'static(ally|-pie) linked'; then
    die "$src is not static: $(file -b "$src")"
  fi
  if ldd "$src" 2>&1 | grep '=>' >/dev/null; then
    die "$src loads shared libraries: $(ldd "$src" 2>&1 | tr '\n' ' ')"
  fi
  # The release profile keeps line tables (debug = 1) for profiling; the image does not need
  # them. The symbol table stays, so panics still print function names.
  strip --strip-debug -o "$STAGE/warren/usr/local/bin/$b" "$src"
  chmod 0755 "$STAGE/warren/usr/local/bin/$b"
  say "staged $b: $(file -b "$src" | cut -d, -f1-4 | tr -s ' '), $(du -h "$STAGE/warren/usr/local/bin/$b" | cut -f1) stripped"
done
printf 'root:x:0:0:root:/root:/sbin/nologin\nwarren:x:%s:%s:warren:/var/lib/warren:/sbin/nologin\n' \
  "$UID_GID" "$UID_GID" >"$STAGE/warren/etc/passwd"
printf 'root:x:0:\nwarren:x:%s:\n' "$UID_GID" >"$STAGE/warren/etc/group"
chmod 0644 "$STAGE/warren/etc/passwd" "$STAGE/warren/etc/group"

# ---- 3. the broker image ----------------------------------------------------------------------
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
revision=$(git describe --always --dirty 2>/dev/null || echo unknown)
say "docker build -t $WARREN_IMAGE ."
# The engine may lack buildx; then docker uses the legacy builder, which is enough here
# (FROM scratch, COPY, no RUN), and prints a deprecation notice.
build_image "$WARREN_IMAGE" \
  --build-arg "WARREN_VERSION=$version" --build-arg "WARREN_REVISION=$revision" \
  -f Dockerfile .
say "$WARREN_IMAGE: $(docker image inspect -f '{{.Size}}' "$WARREN_IMAGE" | awk '{printf "%.1f MB", $1 / 1e6}')"

if ((!EXAMPLES)); then
  exit 0
fi

# ---- 4. the example client image: CPython + pika, from this machine ---------------------------
# No Python image can be pulled, so the interpreter that runs .venv is copied in with exactly
# the files it needs, at the same absolute paths (its RUNPATH and prefix stay valid).
[[ -x .venv/bin/python ]] || scripts/setup-python.sh
PY=.venv/bin/python
PYSTAGE=$STAGE/python
rm -rf "$PYSTAGE"
mkdir -p "$PYSTAGE/usr/local/bin" "$PYSTAGE/app/lib" "$PYSTAGE/tmp" "$PYSTAGE/etc"
chmod 1777 "$PYSTAGE/tmp"
cp -a "$STAGE/warren/etc/passwd" "$STAGE/warren/etc/group" "$PYSTAGE/etc/"

# exe | stdlib | lib-dynload | pika package dir
mapfile -t paths < <("$PY" - <<'EOF'
import os, sys, sysconfig, _socket, pika
print(os.path.realpath(sys._base_executable))
print(sysconfig.get_paths()["stdlib"])
print(os.path.dirname(_socket.__file__))
print(os.path.dirname(pika.__file__))
EOF
)
pyexe=${paths[0]} stdlib=${paths[1]} dynload=${paths[2]} pikadir=${paths[3]}
[[ -x $pyexe && -f $stdlib/os.py && -d $dynload && -f $pikadir/__init__.py ]] ||
  die "cannot find the Python installation behind .venv (got: ${paths[*]})"

copy_host_path() { # copy files/dirs to the same absolute path under $PYSTAGE, dereferenced
  local p
  for p in "$@"; do
    mkdir -p "$PYSTAGE$(dirname "$p")"
    cp -aL "$p" "$PYSTAGE$p"
  done
}

copy_host_path "$pyexe"
ln -s "$pyexe" "$PYSTAGE/usr/local/bin/python3"
# The standard library without tests, IDLE, Tk, 2to3, pip's bootstrap, the build config,
# caches and third-party packages.
(cd "$stdlib" && find . \
  \( -name __pycache__ -o -name test -o -name tests -o -name idlelib -o -name tkinter \
  -o -name turtledemo -o -name ensurepip -o -name lib2to3 -o -name 'config-*' \
  -o -name site-packages -o -name dist-packages -o -name lib-dynload \) -prune \
  -o -type f -print) |
  while IFS= read -r f; do
    mkdir -p "$PYSTAGE$stdlib/$(dirname "$f")"
    cp -a "$stdlib/$f" "$PYSTAGE$stdlib/$f"
  done
mkdir -p "$PYSTAGE$stdlib/site-packages"
# Extension modules, minus the ones for tests, Tk, curses, readline and NIS.
mkdir -p "$PYSTAGE$dynload"
exts=()
for so in "$dynload"/*.so; do
  case $(basename "$so") in
    _test* | _ctypes_test* | _xxtestfuzz* | xxlimited* | _tkinter* | _curses* | readline* | nis.*) ;;
    *) exts+=("$so") ;;
  esac
done
cp -a "${exts[@]}" "$PYSTAGE$dynload/"
# Every shared library the interpreter and those modules load, and the dynamic loader.
libs=$(for f in "$pyexe" "${exts[@]}"; do
  ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
done | sort -u)
# shellcheck disable=SC2086 # one path per word
copy_host_path $libs
# pika, pure Python.
cp -a "$pikadir" "$PYSTAGE/app/lib/"
find "$PYSTAGE" -name __pycache__ -prune -exec rm -rf {} +
say "docker build -t $WARREN_EXAMPLES_IMAGE -f examples/compose/Dockerfile . (Python $("$pyexe" -c 'import platform; print(platform.python_version())'), pika $("$PY" -c 'import pika; print(pika.__version__)'))"
build_image "$WARREN_EXAMPLES_IMAGE" -f examples/compose/Dockerfile .
# Smoke test: the interpreter starts and finds pika and its native modules.
docker run --rm --network none --entrypoint /usr/local/bin/python3 "$WARREN_EXAMPLES_IMAGE" \
  -c 'import pika, ssl, socket, json; print("pika", pika.__version__, "ok")' ||
  die "$WARREN_EXAMPLES_IMAGE cannot import pika"
say "$WARREN_EXAMPLES_IMAGE: $(docker image inspect -f '{{.Size}}' "$WARREN_EXAMPLES_IMAGE" | awk '{printf "%.1f MB", $1 / 1e6}')"
