"""deploy/docker: hadolint, each Dockerfile's build line, user and build packages, and that its
runtime image has every shared library the binary links."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

from common import DEBUG_BINARIES, ROOT, run
from report import Report


def workspace_bins() -> dict[str, set[str]]:
    """Package name -> binary names, from the workspace's Cargo.toml files."""
    root = tomllib.loads((ROOT / "Cargo.toml").read_text())
    out: dict[str, set[str]] = {}
    for member in root["workspace"]["members"]:
        manifest = tomllib.loads((ROOT / member / "Cargo.toml").read_text())
        bins = {b["name"] for b in manifest.get("bin", [])}
        bins |= {p.stem for p in (ROOT / member / "src/bin").glob("*.rs")}
        out[manifest["package"]["name"]] = bins
    return out


# Debian packages a crate's build needs (as opposed to what its tests need, like the ffmpeg CLI):
# headers and the compilers and generators build scripts call.
BUILD_TOOLS = {"nasm", "yasm", "clang", "cmake", "pkg-config", "protobuf-compiler", "meson",
               "ninja-build", "build-essential"}


def setup_build_packages(binary: str) -> set[str]:
    """Build packages scripts/setup.d/<kind>.sh installs for a worker's crate; its Dockerfile's
    builder must install them too, or the image build breaks where the tests passed."""
    script = ROOT / "scripts/setup.d" / f"{binary.removesuffix('-worker')}.sh"
    if not binary.endswith("-worker") or not script.is_file():
        return set()
    text = script.read_text().replace("\\\n", " ")
    packages: set[str] = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        if "apt_install" in line:
            packages.update(line.split("apt_install", 1)[1].split())
    return {p for p in packages if p.endswith("-dev") or p in BUILD_TOOLS}


def check_dockerfiles(report: Report, hadolint: str | None) -> None:
    files = sorted((ROOT / "deploy/docker").glob("*.Dockerfile"))
    if hadolint is None:
        report.check("Dockerfiles: hadolint", ["hadolint is not installed: run scripts/setup.sh"])
    else:
        r = run([hadolint, "--no-color", *[str(f.relative_to(ROOT)) for f in files]])
        report.check(f"Dockerfiles: hadolint ({len(files)} files)",
                     r.stdout.splitlines() + r.stderr.splitlines() if r.returncode else [])
    bins = workspace_bins()
    out: list[str] = []
    for f in files:
        text = f.read_text()
        m = re.search(r"cargo build --release --locked -p (\S+) --bin (\S+)", text)
        if not m:
            out.append(f"{f.name}: no `cargo build --release --locked -p <crate> --bin <bin>`")
            continue
        pkg, binary = m.groups()
        if pkg not in bins:
            out.append(f"{f.name}: -p {pkg} is no workspace package")
        elif binary not in bins[pkg]:
            out.append(f"{f.name}: package {pkg} has no binary {binary}")
        if f"target/release/{binary}" not in text:
            out.append(f"{f.name}: does not copy target/release/{binary}")
        if not re.search(r"^FROM rust:1\.95-bookworm AS builder$", text, re.M):
            out.append(f"{f.name}: builder must be rust:1.95-bookworm")
        builder = text.split("AS builder", 1)[-1].split("\nFROM ", 1)[0]
        for package in sorted(setup_build_packages(binary)):
            if not re.search(rf"(?<![\w.+-]){re.escape(package)}(?![\w.+-])", builder):
                out.append(f"{f.name}: the builder lacks {package}, which "
                           f"scripts/setup.d/{binary.removesuffix('-worker')}.sh installs to build it")
        # metrics_addr has one source, the settings file: an image's ENV would override it
        # silently and leave the probes (which follow the settings) on another port.
        if re.search(r"^ENV\b.*\bMEDIAFARM_METRICS_ADDR\b", text, re.M):
            out.append(f"{f.name}: sets MEDIAFARM_METRICS_ADDR; metrics_addr comes from the "
                       f"settings file only (the probes follow it)")
        user = re.findall(r"^USER (\S+)$", text, re.M)
        if not user or not re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[-1]):
            out.append(f"{f.name}: the runtime stage must run as a numeric non-root USER uid:gid")
        ffmpeg = "libavcodec" in text.split("AS builder", 1)[-1].split("FROM", 1)[-1]
        if ffmpeg != (binary == "snapshot-worker"):
            out.append(f"{f.name}: only the snapshot-worker runtime carries FFmpeg's libraries")
    ignore = (ROOT / ".dockerignore").read_text().split() if (ROOT / ".dockerignore").exists() else []
    for heavy in ("target", ".git", ".venv"):
        if heavy not in ignore:
            out.append(f".dockerignore: does not leave out {heavy}")
    report.check("Dockerfiles: cargo build lines, users, FFmpeg only in snapshot, .dockerignore", out)
    report.check("Dockerfiles: each runtime image has every library its binary links",
                 runtime_library_problems(files))


# What distroless cc (and any Debian image) has: glibc and libgcc.
BASE_LIBRARIES = {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2",
                  "libpthread.so.0", "libdl.so.2", "librt.so.1"}


def runtime_libraries(text: str) -> set[str]:
    """Shared libraries the runtime stage provides: the base ones, plus the sonames of the
    Debian runtime packages it installs (Debian names them lib<name><soversion>, or
    lib<name>-<soversion> when the name ends in a digit)."""
    runtime = text.rsplit("\nFROM ", 1)[-1]
    libs = set(BASE_LIBRARIES)
    for name, version in re.findall(r"(?<![\w-])(lib[a-z]+?)(\d+)(?![\w.+-])", runtime):
        libs.add(f"{name}.so.{version}")
    # A name that ends in a digit takes a dash before its soversion (libde265-0: libde265.so.0).
    for name, version in re.findall(r"(?<![\w-])(lib[a-z0-9]*\d)-(\d+)(?![\w.+-])", runtime):
        libs.add(f"{name}.so.{version}")
    return libs


def linked_libraries(binary: Path) -> set[str] | None:
    r = run(["readelf", "-d", str(binary)])
    if r.returncode != 0:
        return None
    return set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", r.stdout))


def runtime_library_problems(files: list[Path]) -> list[str]:
    """The debug build of each binary (scripts/test.sh builds them first) links the same
    system libraries as the release build in the image; each must be in the runtime stage."""
    out: list[str] = []
    for f in files:
        text = f.read_text()
        m = re.search(r"cargo build --release --locked -p \S+ --bin (\S+)", text)
        if not m:
            continue
        built = DEBUG_BINARIES / m.group(1)
        needed = linked_libraries(built) if built.is_file() else None
        if needed is None:
            out.append(f"{f.name}: {built} is not built (cargo build --workspace)")
            continue
        runtime = text.rsplit("\nFROM ", 1)[-1]
        if "distroless" in runtime.splitlines()[0] and re.search(r"^RUN ", runtime, re.M):
            out.append(f"{f.name}: a distroless runtime stage has no shell or apt-get to RUN")
        for lib in sorted(needed - runtime_libraries(text)):
            out.append(f"{f.name}: {m.group(1)} links {lib}, which its runtime image does not install")
    return out
