"""Writes a demo photo (a 1600×1200 gradient PNG) for the bring-up's image job.

Usage: demo_image.py PATH. Standard library only, so it runs before anything is installed.
"""
import struct
import sys
import zlib

W, H = 1600, 1200


def chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


rows = bytearray()
for y in range(H):
    rows.append(0)  # no filter
    for x in range(W):
        rows += bytes((x * 255 // W, y * 255 // H, 160))
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
png += chunk(b"IDAT", zlib.compress(bytes(rows), 6)) + chunk(b"IEND", b"")
with open(sys.argv[1], "wb") as f:
    f.write(png)
