"""A tiny fake reports folder: executed notebooks with outputs and one PNG figure each."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import nbformat


def write_png(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (64, 40)) -> Path:
    """A solid-colour RGB PNG, written without any imaging library."""
    width, height = size

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def executed_notebook(path: Path, conclusion: str | None, heading: str = "## Conclusion") -> Path:
    """An 'executed' notebook: a results cell, then (when `conclusion` is given) a conclusion heading
    and a code cell that printed `conclusion` plus the notebook's timing line."""
    nb = nbformat.v4.new_notebook()
    table = nbformat.v4.new_code_cell("table")
    table.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "   ppl\n0  12.5"}, execution_count=1)]
    nb.cells = [nbformat.v4.new_markdown_cell("# A notebook"), table]
    if conclusion is not None:
        cell = nbformat.v4.new_code_cell("print(...)")
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=conclusion + "\nnotebook time 3 s\n")]
        nb.cells += [nbformat.v4.new_markdown_cell(heading), cell]
    nbformat.write(nb, path)
    return path


def fake_run(out: Path) -> list[dict]:
    """Two executed notebooks with one figure each (and their HTML stand-ins); the index rows."""
    rows = []
    for i, (name, colour) in enumerate((("00_alpha", (200, 30, 30)), ("01_beta", (30, 30, 200)))):
        out.mkdir(parents=True, exist_ok=True)
        executed_notebook(out / f"{name}.ipynb", f"- {name}: PTP at 0.{55 + i}")
        (out / f"{name}.html").write_text(f"<html><body>{name}</body></html>")
        write_png(out / "figures" / f"{name[:3]}curve.png", colour)
        rows.append({"notebook": name, "status": "ok", "error": "", "seconds": 1.5 + i, "ipynb": f"{name}.ipynb",
                     "html": f"{name}.html", "figures": [f"figures/{name[:3]}curve.png"]})
    return rows
