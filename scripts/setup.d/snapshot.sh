# snapshot-worker: FFmpeg 5.1 development files (ffmpeg-next links them), clang for bindgen,
# nasm for libjpeg-turbo's SIMD code (its JPEG encoder, built by mozjpeg-sys),
# the ffmpeg CLI that the tests and benchmark use to make streams, nginx with the RTMP module
# for the RTMP tests, and GStreamer's RTSP server library with python3-gi for the RTSP tests
# (the tests start their servers on free ports with their own config; nothing is started here).
# Sourced by scripts/setup.sh (uses apt_install).
apt_install pkg-config clang libclang-dev nasm \
  libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libavfilter-dev libavdevice-dev \
  ffmpeg nginx-light libnginx-mod-rtmp \
  python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-rtsp-server-1.0 \
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly
