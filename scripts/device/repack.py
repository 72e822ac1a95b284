"""Re-packs the parts .p1 ... .pN (scripts/device/gather.sh) so that each one plus the repo's own tree fits one device
call (64 MiB travel together: tracked and untracked-not-ignored files, and the carried part).

Slices of one wheel (NAME.whl.slice00, .slice01, ...) are joined and cut again at the new size; every file is then
packed first-fit (largest first) into parts; `tokenizer/` stays in the last part. Each new part is listed in
.git/info/exclude. receive.sh copies any part to /tmp/w and joins slices in order at install, so the parts may be
received in any order; the install call is the last part's.

Usage (repo root): python3 scripts/device/repack.py [--margin-mib 1.5]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

CALL_BYTES = 64 * 2**20
SLICE = re.compile(r"^(.+)\.slice(\d\d)$")


def tree_bytes() -> int:
    """What travels besides the part: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    return sum(Path(p).stat().st_size for p in out.decode().split("\0") if p and Path(p).is_file())


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--margin-mib", type=float, default=1.5, help="room left for the tree to grow")
    args = parser.parse_args(argv)
    parts = sorted(Path(".").glob(".p[0-9]"), key=lambda p: int(p.name[2:]))
    if not parts:
        print("no parts .p1 ... (run scripts/device/gather.sh)", file=sys.stderr)
        return 1
    limit = CALL_BYTES - tree_bytes() - int(args.margin_mib * 2**20)
    if all(size(p) <= limit for p in parts):
        print(f"every part fits ({limit} bytes each)")
        return 0
    exclude = Path(".git/info/exclude")
    listed = exclude.read_text().splitlines() if exclude.exists() else []
    stage = Path(".repack")  # ignored too: a run cut short must not make the tree travel the wheels
    if "/.repack/" not in listed:
        with open(exclude, "a") as out:
            out.write("/.repack/\n")
        listed.append("/.repack/")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    slices: dict[str, list[Path]] = {}
    for part in parts:
        for f in part.iterdir():
            m = SLICE.match(f.name)
            if m:
                slices.setdefault(m[1], []).append(f)
            else:
                f.rename(stage / f.name)
    for name, pieces in slices.items():
        with open(stage / name, "wb") as out:
            for piece in sorted(pieces, key=lambda p: p.name):
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out, 16 * 2**20)
                piece.unlink()
    for part in parts:
        part.rmdir()
    piece = limit - 64 * 1024
    items: list[tuple[int, Path]] = []
    for f in stage.iterdir():
        if f.is_file() and f.stat().st_size > piece:
            with open(f, "rb") as src:
                i = 0
                while chunk := src.read(piece):
                    cut = stage / f"{f.name}.slice{i:02d}"
                    cut.write_bytes(chunk)
                    items.append((len(chunk), cut))
                    i += 1
            f.unlink()
        elif f.name != "tokenizer":
            items.append((size(f), f))
    tokenizer = stage / "tokenizer"
    bins: list[list] = []  # [free bytes, [paths]]
    for n, f in sorted(items, key=lambda x: -x[0]):
        target = next((b for b in bins if b[0] >= n), None)
        if target is None:
            target = [limit, []]
            bins.append(target)
        target[0] -= n
        target[1].append(f)
    if tokenizer.exists():
        need = size(tokenizer)
        last = next((b for b in reversed(bins) if b[0] >= need), None)
        if last is None:
            last = [limit, []]
            bins.append(last)
        last[0] -= need
        bins.remove(last)
        bins.append(last)
        last[1].append(tokenizer)
    if len(bins) > 9:
        print(f"{len(bins)} parts needed; only .p1 ... .p9 are named", file=sys.stderr)
        return 1
    for i, (_, files) in enumerate(bins, 1):
        part = Path(f".p{i}")
        part.mkdir()
        for f in files:
            f.rename(part / f.name)
        if f"/{part.name}/" not in listed:
            with open(exclude, "a") as out:
                out.write(f"/{part.name}/\n")
        print(f"{part.name}: {size(part)} bytes, {len(files)} entries")
    stage.rmdir()
    print(f"{len(bins)} parts of at most {limit} bytes (the tree: {tree_bytes()} bytes); install with the last")
    return 0


if __name__ == "__main__":
    sys.exit(main())
