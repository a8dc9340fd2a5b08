"""The Celery side of bench/image_broker.py: a plain Celery 5.7 app whose `image.transform` does
image-worker's job with Pillow — read the source from the same local storage directory, decode
it once (with Pillow's JPEG draft mode, its DCT-scaled shrink-on-load, down to the largest
output as shown, i.e. after the EXIF orientation), EXIF-orient, resize with LANCZOS (smaller
outputs derived from the largest), save progressive JPEG 4:2:0 at the asked quality (libjpeg
optimises the Huffman tables of every progressive JPEG, as image-worker's encoder does), and
return the same result shape. JSON, late acks, prefetch multiplier 4, Redis backend, as the
worker is configured.

`pillow_job` is the whole CPU part; bench/image_stages.py times its stages with the same code.

BENCH_BROKER_URL, BENCH_RESULT_BACKEND and BENCH_STORAGE_DIR come from the environment.
"""
import io
import os
from pathlib import Path

from bench_common import bench_app
from PIL import Image, ImageOps

app = bench_app("image_bench", "redis://127.0.0.1:6379/12")
STORAGE = Path(os.environ.get("BENCH_STORAGE_DIR", "var/bench/image-storage"))
# EXIF orientations that swap width and height.
TURNED = {5, 6, 7, 8}


def _nothing(_stage):
    pass


def pillow_job(data, outputs, mark=_nothing):
    """Decodes `data` once and encodes every output; `mark(stage)` is called as each stage
    ends (decode, finish, resize, encode). Returns (source info, {key: (bytes, w, h)})."""
    with Image.open(io.BytesIO(data)) as im:
        src_w, src_h = im.size
        turned = im.getexif().get(0x0112) in TURNED
        shown_w, shown_h = (src_h, src_w) if turned else (src_w, src_h)
        widest = max(o["width"] for o in outputs)
        want = (widest, round(shown_h * widest / shown_w))
        # draft() works in the stored frame: ask for the shown size turned back.
        im.draft("RGB", want[::-1] if turned else want)
        im.load()
        mark("decode")
        im = ImageOps.exif_transpose(im).convert("RGB")
        mark("finish")
    made, result = [], {}
    for spec in sorted(outputs, key=lambda o: -o["width"]):
        w = spec["width"]
        base = next((m for m in reversed(made) if m.width >= 2 * w), im)
        img = base.resize((w, round(shown_h * w / shown_w)), Image.LANCZOS)
        made.append(img)
        mark("resize")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=spec.get("quality", 80), progressive=True, subsampling="4:2:0")
        result[spec["key"]] = (buf.getvalue(), img.width, img.height)
        mark("encode")
    source = {"width": shown_w, "height": shown_h, "format": "jpeg", "bytes": len(data)}
    return source, result


@app.task(name="image.transform")
def transform(source, outputs, **_):
    data = (STORAGE / source).read_bytes()
    info, made = pillow_job(data, outputs)
    result = []
    for spec in outputs:
        encoded, width, height = made[spec["key"]]
        out = STORAGE / spec["key"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(encoded)
        result.append({"key": spec["key"], "url": out.resolve().as_uri(), "width": width,
                       "height": height, "format": "jpeg", "bytes": len(encoded)})
    return {"source": info, "outputs": result}
