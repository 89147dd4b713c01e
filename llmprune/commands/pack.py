"""`llmprune pack DIR --output DIR2`: store the 2:4 linears of a dense checkpoint packed.

Reads a dense (zeros included) llmprune or Hugging Face model directory, packs every nn.Linear
(and GPT-2 Conv1D) whose weight is 2:4 along in_features (lm_head excluded) into values + bitmask
(9/16 of the dense bytes for 16-bit weights) and writes config, tokenizer, safetensors and an
updated llmprune.json (kind "pack"). Load the result with `llmprune.load_pretrained(DIR2)` or
`llmprune eval DIR2`; transformers alone refuses it (its config.json has model_type
llmprune_sparse24). `llmprune pack --unpack DIR2 --output DIR3` writes the dense checkpoint back.
"""
from __future__ import annotations

import argparse

DESCRIPTION = __doc__.split("\n", 2)[2]


def register(subparsers) -> None:
    p = subparsers.add_parser("pack", help="store the 2:4 linears of a dense checkpoint packed (sparse24)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="DIR", help="a local dense model directory (e.g. the output of `llmprune compress`)")
    p.add_argument("--output", required=True, metavar="DIR2", help="output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="output shard size, e.g. 5GB, 5G, 500MiB (default: 5GB)")
    p.add_argument("--unpack", action="store_true",
                   help="the reverse: write the plain dense checkpoint that the packed DIR stands for")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _read_sidecar(src) -> dict:
    from llmprune.io.sidecar import SIDECAR_NAME, read_sidecar

    return read_sidecar(src) if (src / SIDECAR_NAME).is_file() else {}


def _unpack(args: argparse.Namespace, src, target, max_shard_size: int, unpack_sparse24) -> int:
    """Packed -> dense: the weights a plain `from_pretrained` loads, with the source's sidecar."""
    import time

    from llmprune.io.save import output_dir
    from llmprune.io.sidecar import write_sidecar

    t0 = time.perf_counter()
    source_sidecar = _read_sidecar(src)
    packed_from = source_sidecar.get("packed_from") or {}
    with output_dir(target, args.overwrite, inputs=[src], expected_bytes=2 * _dir_bytes(src)) as tmp:
        result = unpack_sparse24(src, tmp, max_shard_size, trust_remote_code=args.trust_remote_code)
        sidecar = {k: v for k, v in source_sidecar.items()
                   if k not in ("format_version", "kind", "versions", "command", "wall_time_s", "peak_memory",
                                "pack", "packed_from")}
        source_kind = source_sidecar.get("kind")
        sidecar["kind"] = packed_from.get("kind") or (source_kind if source_kind not in (None, "pack") else "unpack")
        sidecar["save_format"] = "dense"
        sidecar["unpacked_from"] = {"path": str(src.resolve()), "command": source_sidecar.get("command")}
        sidecar["wall_time_s"] = round(time.perf_counter() - t0, 3)
        write_sidecar(tmp, sidecar)
    print(f"unpacked {result['modules']} linears into {len(result['files'])} shard(s)")
    print(f"wrote {target} (a plain checkpoint: AutoModelForCausalLM.from_pretrained loads it)")
    return 0


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from llmprune.errors import UserError
    from llmprune.io.checkpoint import CheckpointReader, packed_checkpoint_info, parse_size
    from llmprune.io.files import format_bytes, peak_rss_bytes
    from llmprune.io.save import RECIPE_NAME, check_output_dir, output_dir
    from llmprune.io.sidecar import base_model_entry, write_sidecar

    src = Path(args.model).expanduser()
    if not src.is_dir() or not (src / "config.json").is_file():
        raise UserError(f"{args.model} is not a local model directory (no config.json); give the output of "
                        "`llmprune compress` or a `save_pretrained` directory")
    max_shard_size = parse_size(args.max_shard_size, "--max-shard-size")
    target = check_output_dir(args.output, args.overwrite, inputs=[src])   # --overwrite never deletes the input
    CheckpointReader(src)   # missing, pickle-only, truncated or corrupt weights: one line, before any work

    from llmprune.io.load import load_model, load_tokenizer
    from llmprune.kernels import save_sparse24, unpack_sparse24

    packed = packed_checkpoint_info(src) is not None
    if args.unpack:
        if not packed:
            raise UserError(f"{args.model} is not a packed 2:4 checkpoint; there is nothing to unpack")
        return _unpack(args, src, target, max_shard_size, unpack_sparse24)
    if packed:
        raise UserError(f"{args.model} is already packed; load it with llmprune.load_pretrained, or write the "
                        f"dense checkpoint with `llmprune pack --unpack {args.model} --output DIR`")
    source_sidecar = _read_sidecar(src)

    t0 = time.perf_counter()
    try:
        tokenizer = load_tokenizer(str(src), args.trust_remote_code)
    except UserError:
        tokenizer = None  # a weights-only directory: pack it anyway, say so below
    model = load_model(str(src), "auto", args.trust_remote_code)

    with output_dir(target, args.overwrite, inputs=[src], expected_bytes=_dir_bytes(src)) as tmp:
        info = save_sparse24(model, tokenizer, tmp, max_shard_size=max_shard_size)
        if (src / RECIPE_NAME).is_file():
            (tmp / RECIPE_NAME).write_text((src / RECIPE_NAME).read_text())
        sidecar = {k: v for k, v in source_sidecar.items()
                   if k not in ("format_version", "kind", "versions", "command", "wall_time_s", "peak_memory")}
        if not isinstance(sidecar.get("base_model"), dict):     # a plain model folder: it is the base
            from llmprune.io.load import snapshot_revision

            sidecar["base_model"] = base_model_entry(str(src.resolve()), revision=snapshot_revision(src),
                                                     model_type=model.config.model_type)
        sidecar["kind"] = "pack"
        sidecar["packed_from"] = {"path": str(src.resolve()), "kind": source_sidecar.get("kind"),
                                  "command": source_sidecar.get("command")}
        sidecar["pack"] = info
        sidecar["dtype"] = str(model.dtype).replace("torch.", "")
        sidecar["wall_time_s"] = round(time.perf_counter() - t0, 3)
        sidecar["peak_memory"] = {"cpu_rss_bytes": peak_rss_bytes(), "cuda_bytes": None}
        write_sidecar(tmp, sidecar)
        disk_in, disk_out = _dir_bytes(src), _dir_bytes(tmp)

    rows = [
        ("packed linears", f"{len(info['modules'])}"),
        ("dense linears", f"{len(info.get('dense_linears', {}))} ({', '.join(sorted(set(info.get('dense_linears', {}).values()))) or '-'})"),
        ("linear weights", f"{format_bytes(info['bytes_dense'])} -> {format_bytes(info['bytes_packed'])} "
                           f"({info['bytes_packed'] / info['bytes_dense']:.2%})"),
        ("safetensors on disk", f"{format_bytes(disk_in)} -> {format_bytes(disk_out)} ({disk_out / max(disk_in, 1):.2%})"),
    ]
    if tokenizer is None:
        rows.append(("tokenizer", "none found in the input; not written"))
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"wrote {target} (load with llmprune.load_pretrained)")
    return 0
