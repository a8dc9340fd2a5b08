"""Image pipeline benchmark (issue 4): one source → 1280, 640 and 160 px wide JPEG q80, on
one core each (taskset -c 0), side by side in one run, rounds interleaved:

  (a) image-worker's pipeline (workers/image/examples/pipeline-bench.rs: decode once, derive
      every output, encode; no broker, no storage),
  (b) libvips through pyvips: thumbnail to 1280 px wide with shrink-on-load and EXIF
      auto-rotation, the rest derived from it,
  (c) Pillow: decode in draft mode (libjpeg's DCT scaling, Pillow's shrink-on-load), EXIF
      transpose, LANCZOS resize to 1280, the rest derived from it.
Every contender reads its sources into memory and loads its modules before its clock starts, so
each window is decode + resize + encode. Every output is as wide as asked *as shown* (after
the EXIF orientation), portrait or landscape; each contender reports its outputs' sizes and the
script stops if they differ by more than a pixel (libvips' thumbnail fits a square box unless
given a height: until 2026-11-30 its portrait outputs were 1280 px *tall*, 0.3–0.6× the pixels
of the others').

Clock (--clock): `cpu` (default) is each contender's process CPU time, user and system, of
every thread (libvips runs its pipeline on worker threads even at VIPS_CONCURRENCY=1): what the
work cost, on a machine shared with other sessions, where wall time also counts the waits for
the core. `wall` is elapsed time (the figures before 2026-11-30). Either way each contender is
pinned to core 0 and the load average is printed with the table. Each contender's process
makes one untimed pass over the files before its timed round (since 2026-11-30; the first
job of a process also pays its allocator's first page faults and library set-up, which a
worker pays once).
Every contender writes the same kind of JPEG: progressive 4:2:0 (image-worker's default), or
baseline 4:2:0 with standard Huffman tables with --jpeg baseline (libvips' and Pillow's default).

Corpus: the large JPEGs of Debian's plasma-workspace-wallpapers package (5120×2880 and
2560×1600), fetched with `apt-get download` into bench/corpus/ (never committed). With
--corpus photos: bench/image_stages.py's photographs instead (8–24 MP from Debian's ukui and
lomiri wallpaper packages, plus camera-like and EXIF-rotated copies), in sub-groups by how the
source is coded (baseline/progressive × chroma sampling), EXIF-rotated ones and portrait ones
(a file can be in two sub-groups), and all together. Installs libvips42 (apt) and
bench/image_requirements.txt (.venv) when missing.

Usage: .venv/bin/python bench/image_pipeline.py [--rounds 3] [--max-files 8] [--jpeg progressive|baseline]
       [--corpus wallpapers|photos] [--clock cpu|wall] [--no-build]
Only local files are read; every phase has a time limit.
"""
import argparse
import glob
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "bench" / "corpus"
WIDTHS = (1280, 640, 160)


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, timeout=900, **kw)


def ensure_tools(build=True):
    if subprocess.run(["dpkg", "-s", "libvips42"], capture_output=True).returncode != 0:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        sh(*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "libvips42")
    try:
        import pyvips  # noqa: F401
        import PIL  # noqa: F401
    except ImportError:
        sh(sys.executable, "-m", "pip", "install", "-q", "-r", str(ROOT / "bench" / "image_requirements.txt"))
    if build:
        sh("cargo", "build", "--release", "--locked", "-q", "-p", "image-worker", "--example",
           "pipeline-bench", cwd=ROOT)


def ensure_corpus():
    found = sorted(glob.glob(str(CORPUS / "**" / "*.jpg"), recursive=True))
    if not found:
        CORPUS.mkdir(parents=True, exist_ok=True)
        sh("apt-get", "download", "plasma-workspace-wallpapers", cwd=CORPUS)
        deb = next(CORPUS.glob("plasma-workspace-wallpapers_*.deb"))
        sh("dpkg-deb", "-x", str(deb), str(CORPUS / "extracted"))
        found = sorted(glob.glob(str(CORPUS / "**" / "*.jpg"), recursive=True))
    from PIL import Image
    by_size = {}
    for f in found:
        with Image.open(f) as im:
            kind = "progressive" if im.info.get("progressive") else "baseline"
            by_size.setdefault(im.size, []).append((f, kind))
    return by_size


def one_core(cmd):
    return ["taskset", "-c", "0", *cmd]


def parse_timer(stdout):
    """(ms per image, [outputs' sizes per file]) from a timer's output: the ms on the first
    line, then one line per file of `W×H` in WIDTHS order."""
    lines = stdout.strip().splitlines()
    return float(lines[0]), [line.split() for line in lines[1:]]


def time_rust(files, rounds, kind, clock):
    extra = ["--baseline"] if kind == "baseline" else []
    out = subprocess.run(one_core([str(ROOT / "target/release/examples/pipeline-bench"),
                                   "--rounds", str(rounds), "--clock", clock, "--sizes",
                                   "--warm-up", *extra,
                                   *files]),
                         check=True, capture_output=True, text=True, timeout=900)
    return parse_timer(out.stdout)


PY_TIMER = r'''
import sys, time, statistics, io
which, rounds, kind, clock, files = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
W = (1280, 640, 160)
now = time.process_time if clock == "cpu" else time.perf_counter
PROGRESSIVE = kind == "progressive"
VIPS_JPEG = ".jpg[Q=80,interlace=true]" if PROGRESSIVE else ".jpg[Q=80]"
# As pipeline-bench does: modules loaded and sources read into memory before the clock starts,
# so every contender's window is decode + resize + encode only.
if which == "vips":
    import pyvips
    pyvips.cache_set_max(0)
else:
    from PIL import Image, ImageOps, JpegImagePlugin  # noqa: F401  (the JPEG plugin, loaded up front)
    TURNED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
sources = [open(f, "rb").read() for f in files]
def vips(data):
    # Decoded once (shrink-on-load), turned by its EXIF orientation, held in memory, every
    # output derived from it. `height`: a box as tall as any picture, so the 1280 is the width
    # as shown (without it libvips fits a 1280×1280 box: a portrait came out 1280 px tall).
    big = pyvips.Image.thumbnail_buffer(data, W[0], height=100_000, size="down").copy_memory()
    outs = [(big.write_to_buffer(VIPS_JPEG), big.width, big.height)]
    for w in W[1:]:
        img = big.resize(w / big.width, kernel="lanczos3")
        outs.append((img.write_to_buffer(VIPS_JPEG), img.width, img.height))
    return outs
def pillow(data):
    # As bench/image_celery_app.py's pillow_job (the Celery side of the broker benchmark).
    with Image.open(io.BytesIO(data)) as im:
        turned = im.getexif().get(0x0112) in TURNED
        shown_w, shown_h = (im.height, im.width) if turned else im.size
        h = round(shown_h * W[0] / shown_w)
        # Pillow's fastest honest decode: draft mode, libjpeg's DCT scaling down to the
        # smallest power-of-two scale still at least the largest output (its shrink-on-load);
        # draft() works in the stored frame.
        im.draft("RGB", (h, W[0]) if turned else (W[0], h))
        im = ImageOps.exif_transpose(im).convert("RGB")
        big = im.resize((W[0], h), Image.LANCZOS)
    outs = []
    for w in W:
        img = big if w == W[0] else big.resize((w, round(big.height * w / big.width)), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80, subsampling=2, progressive=PROGRESSIVE)
        outs.append((buf.getvalue(), img.width, img.height))
    return outs
fn = vips if which == "vips" else pillow
for data in sources:  # one untimed pass, as pipeline-bench --warm-up
    fn(data)
per = []
for _ in range(rounds):
    made = []
    t = now()
    for data in sources:
        made.append(fn(data))
    per.append((now() - t) * 1000 / len(sources))
print(f"{statistics.median(per):.1f}")
for outs in made:
    print(" ".join(f"{w}×{h}" for _, w, h in outs))
'''


def time_python(which, files, rounds, kind, clock):
    env = {**os.environ, "VIPS_CONCURRENCY": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(one_core([sys.executable, "-c", PY_TIMER, which, str(rounds), kind, clock,
                                   *files]),
                         capture_output=True, text=True, timeout=1800, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{which} failed:\n{out.stderr[-2000:]}")
    return parse_timer(out.stdout)


def same_sizes(files, made):
    """Stops unless every contender's outputs of each file are the same size (±1 px: a side
    may round a height the other way)."""
    for i, f in enumerate(files):
        per = {who: [tuple(map(int, s.split("×"))) for s in sizes[i]] for who, sizes in made.items()}
        first = per["rust"]
        for who, sizes in per.items():
            if len(sizes) != len(first) or any(abs(a - b) > 1 for s, t in zip(sizes, first)
                                               for a, b in zip(s, t)):
                raise SystemExit(f"{Path(f).name}: outputs differ, {per}")


def interleaved(files, rounds, jpeg, clock="cpu"):
    """Median ms/image of each contender over `files`, rounds interleaved (one of each
    contender per round), so a change in the load from other processes falls on all three
    alike; the median round counts. Checks that the contenders made the same sizes."""
    runs = {"rust": [], "vips": [], "pillow": []}
    made = {}
    for _ in range(rounds):
        for who, (ms, sizes) in (("rust", time_rust(files, 1, jpeg, clock)),
                                 ("vips", time_python("vips", files, 1, jpeg, clock)),
                                 ("pillow", time_python("pillow", files, 1, jpeg, clock))):
            runs[who].append(ms)
            made[who] = sizes
    same_sizes(files, made)
    return tuple(statistics.median(runs[k]) for k in ("rust", "vips", "pillow"))


def load():
    return "load average " + " / ".join(f"{v:.1f}" for v in os.getloadavg())


def photo_groups():
    """[(sub-group, files)] of bench/image_stages.py's photographs."""
    sys.path.insert(0, str(ROOT / "bench"))
    from image_stages import ensure_photos, describe
    groups = {}
    for f in ensure_photos():
        size, kind, sampling, *orientation = describe(f).split()
        w, h = map(int, size.split("×"))
        kind = "progressive" if kind == "prog" else "baseline"
        groups.setdefault(f"{kind} {sampling}", []).append(f)
        if orientation:
            groups.setdefault("EXIF-rotated (o6, o8)", []).append(f)
        if h > w:
            groups.setdefault("portrait", []).append(f)
        groups.setdefault("**all**", []).append(f)
    return sorted(groups.items(), key=lambda g: (g[0] == "**all**", g[0]))


def main_photos(args):
    print(f"photographs; one source → {', '.join(map(str, WIDTHS))} px wide {args.jpeg} JPEG q80; "
          f"one core each; {args.clock} ms; median of {args.rounds} rounds; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; {load()}")
    print("| sub-group | files | image-worker ms/image | libvips ms/image | Pillow ms/image | image-worker ÷ libvips |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, files in photo_groups():
        rust, vips, pil = interleaved(files, args.rounds, args.jpeg, args.clock)
        print(f"| {name} | {len(files)} | {rust:.0f} | {vips:.0f} | {pil:.0f} | {rust / vips:.2f}× |",
              flush=True)
    print(f"end: {time.strftime('%H:%M')}; {load()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-files", type=int, default=8)
    parser.add_argument("--jpeg", choices=("progressive", "baseline"), default="progressive",
                        help="the kind of JPEG every contender writes")
    parser.add_argument("--corpus", choices=("wallpapers", "photos"), default="wallpapers")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="process CPU time (default) or elapsed time")
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    ensure_tools(build=not args.no_build)
    if args.corpus == "photos":
        return main_photos(args)
    by_size = ensure_corpus()
    print(f"one source → {', '.join(map(str, WIDTHS))} px wide {args.jpeg} JPEG q80; one core each; "
          f"{args.clock} ms; median of {args.rounds} rounds; {time.strftime('%Y-%m-%d')}; {load()}")
    print("| source size | source JPEG kind | files | image-worker ms/image | libvips ms/image | Pillow ms/image | image-worker ÷ libvips |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for size in ((5120, 2880), (2560, 1600)):
        # Distinct files only (several wallpapers ship the same picture), at most --max-files.
        seen, entries = set(), []
        for f, kind in by_size.get(size, []):
            digest = Path(f).stat().st_size, Path(f).read_bytes()[-4096:]
            if digest not in seen:
                seen.add(digest)
                entries.append((f, kind))
        entries = entries[: args.max_files]
        groups = [(kind, [f for f, k in entries if k == kind]) for kind in ("baseline", "progressive")]
        groups.append(("all", [f for f, _ in entries]))
        for kind, files in groups:
            if not files:
                print(f"| {size[0]}×{size[1]} | {kind} | 0 | – | – | – | – |")
                continue
            rust, vips, pil = interleaved(files, args.rounds, args.jpeg, args.clock)
            print(f"| {size[0]}×{size[1]} | {kind} | {len(files)} | {rust:.0f} | {vips:.0f} | {pil:.0f} | "
                  f"{rust / vips:.2f}× (target ≤ 0.5×) |", flush=True)


if __name__ == "__main__":
    main()
