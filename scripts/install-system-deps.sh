#!/usr/bin/env bash
# System libraries exo needs on Linux: an optimised BLAS for MLX's CPU backend (~3x faster
# decode), BLIS as the alternative, gcc (with libgomp) for exo's few-row matmul kernel, and
# clang for tinygrad's CPU backend. Best effort: without
# them exo still runs, only slower, and says so.
set -u
[ "$(uname -s)" = "Linux" ] || exit 0
command -v apt-get >/dev/null || { echo "install-system-deps: no apt-get; install OpenBLAS (pthread) and clang yourself" >&2; exit 0; }
packages=(libopenblas0-pthread libblis4-pthread gcc clang)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing ${missing[*]} (apt-get)" >&2
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"; } >&2; then
  echo "install-system-deps: could not install ${missing[*]}; exo will run on the slow bundled BLAS" >&2
fi
exit 0
