"""Text helpers of the card: numbers, percentages, bytes, Markdown tables, tensor type names."""
from __future__ import annotations

import math
import re
from typing import Any


def is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def pct(x: Any, digits: int = 2) -> str:
    return f"{100 * float(x):.{digits}f}%" if is_num(x) else str(x)


def ret(x: Any) -> str:
    """A retained % that is already in percent."""
    return f"{float(x):.1f}%" if is_num(x) else "n/a"


def num(x: Any) -> str:
    if not is_num(x):
        return "n/a" if x is None else str(x)
    x = float(x)
    if x == int(x) and abs(x) < 1e6:
        return str(int(x))
    if abs(x) >= 100:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.3f}"
    return f"{x:.4f}"


def size(n: Any) -> str:
    from llmprune.io.files import format_bytes

    return format_bytes(n) if is_num(n) else str(n)


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def numel(shape: Any) -> int | None:
    if isinstance(shape, (list, tuple)) and shape and all(isinstance(d, int) for d in shape):
        return math.prod(shape)
    return None


def module_type(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `q_proj`; a trailing `.weight` is dropped first.
    Expert linears (`...experts.7.up_proj`) and fused-expert slices (`...experts.gate_up_proj[7]`) group
    with their type; the expert index is not the type."""
    parts = [p for p in name.split(".") if p]
    if parts and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return parts[-1].split("[", 1)[0] if parts else name


def tag(text: str) -> str:
    return re.sub(r"[^\w.\-]+", "-", str(text).strip().lower()).strip("-")
