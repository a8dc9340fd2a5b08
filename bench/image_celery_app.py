"""The Celery side of bench/image_broker.py: a plain Celery 5.7 app whose `image.transform` does
image-worker's job with Pillow — read the source from the same local storage directory, decode
it once (with Pillow's JPEG draft mode, its DCT-scaled shrink-on-load, down to the largest
output), EXIF-orient, resize with LANCZOS (smaller outputs derived from the largest), save
progressive JPEG 4:2:0 at the asked quality, and return the same result shape. JSON, late acks,
prefetch multiplier 4, Redis backend, as the worker is configured.

BENCH_BROKER_URL, BENCH_RESULT_BACKEND and BENCH_STORAGE_DIR come from the environment.
"""
import io
import os
from pathlib import Path

from bench_common import bench_app
from PIL import Image, ImageOps

app = bench_app("image_bench", "redis://127.0.0.1:6379/12")
STORAGE = Path(os.environ.get("BENCH_STORAGE_DIR", "var/bench/image-storage"))


@app.task(name="image.transform")
def transform(source, outputs, **_):
    path = STORAGE / source
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        src_w, src_h = im.size
        widest = max(o["width"] for o in outputs)
        im.draft("RGB", (widest, round(src_h * widest / src_w)))
        im = ImageOps.exif_transpose(im).convert("RGB")
    made, result = [], {}
    for spec in sorted(outputs, key=lambda o: -o["width"]):
        w = spec["width"]
        base = next((m for m in reversed(made) if m.width >= 2 * w), im)
        img = base.resize((w, round(src_h * w / src_w)), Image.LANCZOS)
        made.append(img)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=spec.get("quality", 80), progressive=True, subsampling="4:2:0")
        out = STORAGE / spec["key"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(buf.getvalue())
        result[spec["key"]] = {"key": spec["key"], "url": out.resolve().as_uri(), "width": img.width,
                               "height": img.height, "format": "jpeg", "bytes": len(buf.getvalue())}
    return {"source": {"width": src_w, "height": src_h, "format": "jpeg", "bytes": len(data)},
            "outputs": [result[o["key"]] for o in outputs]}
