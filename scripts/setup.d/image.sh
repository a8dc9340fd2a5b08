# image-worker: nasm assembles libjpeg-turbo's x86 SIMD code when mozjpeg-sys builds it (its
# `nasm_simd` feature; the SIMD decode/encode is what the benchmark figures rely on). The C
# codecs (libjpeg-turbo via mozjpeg-sys, libwebp via libwebp-sys) are compiled from their crates
# with the C compiler setup.sh already installs. Sourced by scripts/setup.sh (uses apt_install).
command -v nasm >/dev/null || apt_install nasm
# HEIC and AVIF sources: image-worker links Debian's libheif (1.15 on Debian 12; heif.rs declares
# the calls it makes) and, for HEVC-coded HEIC, libde265 directly (de265.rs; libheif-dev pulls it
# in, named here because the binary links it itself). heif-enc (libheif-examples) makes the
# tests' HEIC and AVIF sources.
apt_install libheif-dev libde265-dev libheif-examples
