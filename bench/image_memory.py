"""Peak memory per source format (issue 18): the VmHWM of a real `image-worker` processing the
worst case of each accepted source format through the broker — one job at `-c 1`, then four
jobs at `-c 2` (two at a time) — each job → 1280, 640 and 160 px wide JPEG q80, as
bench/image_broker.py's jobs.

Sources (made here with Pillow and zlib under var/bench/image-formats/, never committed), each
within the default limits (50 MP, 50 MB):
  rgba.png      9400×5300 8-bit RGBA PNG
  rgb.png       9400×5300 8-bit RGB PNG
  rgba16.png    8000×6000 16-bit RGBA PNG (48 MP; written by hand: Pillow has no 16-bit RGBA)
  gray16.png    9400×5300 16-bit grayscale PNG
  prog444.jpg   9400×5300 progressive 4:4:4 JPEG q90
  prog444-16mp.jpg, prog444-8mp.jpg  4900×3265 and 3464×2309, the same (the largest that
                libjpeg decodes with every coefficient, below lowres.rs's threshold)
  lossy.webp    16383×3050 lossy WebP (its largest side)
  alpha.webp    16383×3050 lossy WebP with alpha
  lossless.webp 16383×3050 lossless WebP
  big.gif       9400×5300 GIF (256 colours)
  big.heic      8064×6048 HEIC (48 MP, an iPhone's largest; libheif's heif-enc with x265, q50)
  alpha.avif    4032×3024 AVIF with alpha (12 MP; heif-enc -A with libaom, q50: AV1 encoding of
                48 MP takes too long for a benchmark's set-up)
  grid.heic     8064×6048 HEIC as a phone writes it: a grid of 512×512 HEVC tiles (16×12, cut
                to size at the right and bottom), each tile encoded by heif-enc (x265, q50) and
                the tiles put in one file here (heif-enc 1.15 writes no grids)

Usage: .venv/bin/python bench/image_memory.py [--binary target/release/image-worker]
       [--only rgba.png,...] [--real-heif] [--no-build] [--jobs 4] [--worker-env NAME=VALUE ...]
(`--real-heif`: also the phones' and cameras' HEIC/HIF files bench/heif_real.py fetches;
`--only` names them too.)
Only 127.0.0.1 is contacted; every phase has a time limit and every process is stopped.
"""
import argparse
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import image_broker  # noqa: E402  (drain, stage, build; the same job and settings)

FORMATS = ROOT / "var" / "bench" / "image-formats"


def picture(w, h, mode):
    """A smooth but not flat picture: gradients, a Mandelbrot band, a radial alpha."""
    from PIL import Image
    red = Image.linear_gradient("L").rotate(90).resize((w, h))
    green = Image.linear_gradient("L").resize((w, h))
    blue = Image.effect_mandelbrot((w, h), (-2.2, -1.2, 1.0, 1.2), 60)
    if mode == "RGB":
        return Image.merge("RGB", (red, green, blue))
    alpha = Image.radial_gradient("L").resize((w, h)).point(lambda v: 255 - v // 2)
    return Image.merge("RGBA", (red, green, blue, alpha))


def png16(path, w, h, channels):
    """A 16-bit PNG (grey or RGBA) with smooth content, written row by row."""
    color_type = {1: 0, 4: 6}[channels]
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    z = zlib.compressobj(1)
    with open(path, "wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n")
        out.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)))
        # Each sample c·257 (both bytes c): 16 bits deep, and as compressible as 8-bit data.
        ramp = bytes(x * 255 // (w - 1) for x in range(w))
        back = ramp[::-1]
        idat = bytearray()
        for y in range(h):
            v = y * 65535 // (h - 1)
            if channels == 1:
                line = ramp if (y // 64) % 2 else back
                row = bytearray(2 * w)
                row[0::2], row[1::2] = line, line
            else:
                g, a = v >> 8, 255 - (v >> 9)
                row = bytearray(8 * w)
                row[0::8], row[1::8] = ramp, ramp
                row[2::8], row[3::8] = bytes([g]) * w, bytes([g]) * w
                row[4::8], row[5::8] = back, back
                row[6::8], row[7::8] = bytes([a]) * w, bytes([a]) * w
            idat += z.compress(b"\x00" + bytes(row))
            if len(idat) > 1 << 20:
                out.write(chunk(b"IDAT", bytes(idat)))
                idat.clear()
        idat += z.flush()
        out.write(chunk(b"IDAT", bytes(idat)))
        out.write(chunk(b"IEND", b""))


def heif_box(kind, body, version=None):
    if version is not None:
        body = bytes([version, 0, 0, 0]) + body
    return struct.pack(">I", 8 + len(body)) + kind + body


def grid_heic(path, w, h, tile=512):
    """A HEIC whose primary image is a grid of `tile`-sized HEVC tiles, each encoded alone by
    heif-enc; its hvcC and coded data are taken from heif-enc's file (one item: the data is
    its mdat's body)."""
    import tempfile
    pic = picture(w, h, "RGB")
    cols, rows = -(-w // tile), -(-h // tile)
    tiles = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rows):
            for c in range(cols):
                png, out = Path(tmp) / "t.png", Path(tmp) / "t.heic"
                pic.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)).save(png)
                subprocess.run(["heif-enc", "-q", "50", "-o", str(out), str(png)], check=True,
                               timeout=300, stdout=subprocess.DEVNULL)
                data = out.read_bytes()
                at = data.index(b"hvcC") - 4
                hvcc = data[at:at + struct.unpack(">I", data[at:at + 4])[0]]
                at = data.index(b"mdat") - 4
                size = struct.unpack(">I", data[at:at + 4])[0]
                tiles.append((hvcc, data[at + 8:at + size]))
    ispe = lambda a, b: heif_box(b"ispe", struct.pack(">II", a, b), 0)
    items = [(1, b"grid", [ispe(w, h)], struct.pack(">BBBBII", 0, 1, rows - 1, cols - 1, w, h))]
    items += [(2 + i, b"hvc1", [hvcc, ispe(tile, tile)], d) for i, (hvcc, d) in enumerate(tiles)]
    def meta(mdat_at):
        hdlr = heif_box(b"hdlr", b"\0" * 4 + b"pict" + b"\0" * 13, 0)
        pitm = heif_box(b"pitm", struct.pack(">H", 1), 0)
        iinf = heif_box(b"iinf", struct.pack(">H", len(items)) + b"".join(
            # Version 2; the tiles hidden (flags 1), as phones write them.
            heif_box(b"infe", bytes([2, 0, 0, k == b"hvc1"]) + struct.pack(">HH", i, 0) + k
                     + b"\0") for i, k, _, _ in items), 0)
        dimg = heif_box(b"dimg", struct.pack(">HH", 1, len(tiles))
                        + b"".join(struct.pack(">H", i) for i, *_ in items[1:]))
        iref = heif_box(b"iref", dimg, 0)
        ipco, ipma, n = b"", struct.pack(">I", len(items)), 0
        for i, _, props, _ in items:
            ipma += struct.pack(">HB", i, len(props))
            for p in props:
                ipco += p
                n += 1
                ipma += struct.pack(">H", 0x8000 | n)
        # ipma version 0, flags 1: 15-bit property indexes (there are 2 a tile).
        iprp = heif_box(b"iprp", heif_box(b"ipco", ipco) + heif_box(b"ipma", b"\0\0\0\1" + ipma))
        iloc, at = struct.pack(">BBH", 0x44, 0, len(items)), mdat_at + 8
        for i, _, _, d in items:
            iloc += struct.pack(">HHHHII", i, 0, 0, 1, at, len(d))
            at += len(d)
        return heif_box(b"meta", hdlr + pitm + iinf + iref + iprp + heif_box(b"iloc", iloc, 1), 0)
    ftyp = heif_box(b"ftyp", b"heic\0\0\0\0mif1heic")
    body = ftyp + meta(len(ftyp) + len(meta(0)))
    path.write_bytes(body + heif_box(b"mdat", b"".join(d for *_, d in items)))


def make_sources(only=()):
    FORMATS.mkdir(parents=True, exist_ok=True)
    made = {}
    def want(name):
        if only and name not in only:
            return None
        path = FORMATS / name
        made[name] = path
        return None if path.exists() else path
    if (p := want("rgba.png")):
        picture(9400, 5300, "RGBA").save(p, compress_level=6)
    if (p := want("rgb.png")):
        picture(9400, 5300, "RGB").save(p, compress_level=6)
    if (p := want("rgba16.png")):
        png16(p, 8000, 6000, 4)
    if (p := want("gray16.png")):
        png16(p, 9400, 5300, 1)
    if (p := want("prog444.jpg")):
        picture(9400, 5300, "RGB").save(p, quality=90, progressive=True, subsampling=0)
    if (p := want("prog444-16mp.jpg")):
        picture(4900, 3265, "RGB").save(p, quality=90, progressive=True, subsampling=0)
    if (p := want("prog444-8mp.jpg")):
        picture(3464, 2309, "RGB").save(p, quality=90, progressive=True, subsampling=0)
    if (p := want("lossy.webp")):
        picture(16383, 3050, "RGB").save(p, quality=80, method=0)
    if (p := want("alpha.webp")):
        picture(16383, 3050, "RGBA").save(p, quality=80, method=0)
    if (p := want("lossless.webp")):
        picture(16383, 3050, "RGB").save(p, lossless=True, quality=0, method=0)
    if (p := want("big.gif")):
        picture(9400, 5300, "RGB").quantize(256).save(p)
    for name, (w, h, mode, avif) in HEIF_SOURCES.items():
        if (p := want(name)):
            png = p.with_suffix(".src.png")
            picture(w, h, mode).save(png, compress_level=1)
            subprocess.run(["heif-enc", *(["-A"] if avif else []), "-q", "50", "-o", str(p),
                            str(png)], check=True, timeout=1800, stdout=subprocess.DEVNULL)
            png.unlink()
    if (p := want("grid.heic")):
        grid_heic(p, 8064, 6048)
    return made


# HEIF sources: Pillow neither writes nor reads them (heif-enc makes them; sizes as made).
HEIF_SOURCES = {"big.heic": (8064, 6048, "RGB", False), "alpha.avif": (4032, 3024, "RGBA", True)}
HEIF_SIZES = {**{k: v[:2] for k, v in HEIF_SOURCES.items()}, "grid.heic": (8064, 6048)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default=str(ROOT / "target/release/image-worker"))
    parser.add_argument("--only", default="")
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--jobs", type=int, default=4, help="jobs for the -c 2 run")
    parser.add_argument("--real-heif", action="store_true",
                        help="also the device HEIC/HIF files of bench/heif_real.py")
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for image-worker (repeatable)")
    args = parser.parse_args()
    if not args.no_build:
        image_broker.build()
    only = tuple(filter(None, args.only.split(",")))
    sources = make_sources(only)
    real_sizes = {}
    if args.real_heif:
        import heif_real
        for name, (path, _) in heif_real.fetch().items():
            # 200MP.heic is over the limit: refused from its header, nothing decoded.
            if name != "200MP.heic" and (not only or name in only):
                sources[name] = path
                info = subprocess.run(["heif-info", str(path)], capture_output=True,
                                      text=True, timeout=120).stdout
                line = next(x for x in info.splitlines() if "primary" in x)
                real_sizes[name] = line.split()[1].replace("x", "×")
    image_broker.STORAGE.mkdir(parents=True, exist_ok=True)
    broker, backend, storage = image_broker.BROKER, image_broker.BACKEND, image_broker.STORAGE
    os.environ.update({"BENCH_BROKER_URL": broker, "BENCH_RESULT_BACKEND": backend,
                       "BENCH_STORAGE_DIR": str(storage)})
    from celery import Celery
    app = Celery("image_memory_client", broker=broker, backend=backend)
    env = {"MEDIAFARM_BROKER_URL": broker, "MEDIAFARM_RESULT_BACKEND": backend,
           "MEDIAFARM_STORAGE_URL": storage.as_uri(), "MEDIAFARM_METRICS_ADDR": "127.0.0.1:0",
           **dict(kv.split("=", 1) for kv in args.worker_env)}

    def worker(concurrency):
        return lambda q: [args.binary, "--concurrency", str(concurrency), "--queues", q,
                          "--loglevel", "warning"]

    print(f"\nimage-worker {args.binary}; each job → 1280, 640, 160 px JPEG q80; "
          f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"| source | size | file MB | peak RSS MB, 1 job -c 1 | peak RSS MB, {args.jobs} jobs -c 2 "
          "| worker CPU ms a job (-c 2 run, after the first result) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, path in sources.items():
        from PIL import Image
        Image.MAX_IMAGE_PIXELS = None
        if name in real_sizes:
            size = real_sizes[name] + " (libheif's header)"
        elif name in HEIF_SIZES:
            size = "{}×{}".format(*HEIF_SIZES[name])
        else:
            with Image.open(path) as im:
                size = f"{im.width}×{im.height}"
        keys = image_broker.stage([path], f"fmt-{name}-")
        peaks = []
        for concurrency, jobs in ((1, 1), (2, args.jobs)):
            _, peak, cpu, *_ = image_broker.drain(app, f"memory {name} c{concurrency}",
                                                  worker(concurrency), keys, jobs, 900, env)
            peaks.append(peak)
        mb = path.stat().st_size / 1e6
        print(f"| {name} | {size} | {mb:.1f} | {peaks[0]:.0f} | {peaks[1]:.0f} | {cpu:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
