# snapshot-worker: FFmpeg 5.1 development files (ffmpeg-next links them), clang for bindgen,
# the ffmpeg CLI that the tests and benchmark use to make streams, and nginx with the RTMP
# module for the RTMP tests (started per test on a free port with its own config, not here).
# Sourced by scripts/setup.sh (uses apt_install).
apt_install pkg-config clang libclang-dev \
  libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libavfilter-dev libavdevice-dev \
  ffmpeg nginx-light libnginx-mod-rtmp
