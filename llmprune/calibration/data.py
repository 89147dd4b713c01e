"""Text sources and seeded token windows.

Sources (`spec`):
  c4         allenai/c4, `en` shard 00000 (train) / validation shard 00000, through `datasets`
  wikitext2  Salesforce/wikitext `wikitext-2-raw-v1` train / test, through `datasets`
  stdlib     the Python standard library sources of this interpreter (offline, always present);
             files are split deterministically into train (~90%) and test (~10%)
  PATH       a local .txt (whole file), .jsonl (field `text`) or .parquet (column `text`)

`calibration_windows` draws `n_samples` random windows of `seqlen` tokens with `seed`, the way the
SparseGPT/Wanda reference loaders do (random document / random offset), but from one token stream
so short documents are usable too.
"""
from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from pathlib import Path
from typing import Sequence

from llmprune.errors import UserError

NAMED_SOURCES = ("c4", "wikitext2", "stdlib")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def describe_source(spec: str) -> str:
    return spec if spec in NAMED_SOURCES else str(Path(spec).expanduser().resolve())


def check_source(spec: str, flag: str = "--calib-data", check_hub: bool = True) -> None:
    """Validate a spec without reading it (so a bad path fails before a model is loaded). For a Hub
    source with the Hub unreachable (`check_hub`), switch to the cache now (no minutes of retries
    later) and refuse a source that is certainly not cached."""
    if spec in NAMED_SOURCES:
        if spec != "stdlib" and check_hub:
            from llmprune.io.network import dataset_maybe_cached, hub_or_cache, why_offline

            if not hub_or_cache() and not dataset_maybe_cached(HUB_REPOS[spec]):
                export = (" or export it on a connected machine with `llmprune eval --export-data DIR --suite lm` "
                          "and pass --data-dir DIR" if flag == "--ppl-data" else "")
                raise UserError(f"{flag} {spec} is not in the datasets cache and {why_offline()}; use {flag} stdlib "
                                f"or a local .txt/.jsonl/.parquet FILE{export}")
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"calibration data {spec} does not exist; give c4, wikitext2, stdlib or a .txt/.jsonl/.parquet file")
    if path.is_dir() or path.suffix.lower() not in LOCAL_SUFFIXES:
        raise UserError(f"calibration data {spec} must be a .txt, .jsonl or .parquet file (or c4, wikitext2, stdlib)")


HUB_REPOS = {"c4": "allenai/c4", "wikitext2": "Salesforce/wikitext"}


def load_texts(spec: str, split: str = "train") -> list[str]:
    """Documents of a source, in a deterministic order. `split` is train|test (validation for c4)."""
    check_source(spec, check_hub=False)       # the load itself decides (and says why it failed)
    if spec == "c4":
        return _hub_texts("allenai/c4", None, split,
                          {"train": "en/c4-train.00000-of-01024.json.gz",
                           "test": "en/c4-validation.00000-of-00008.json.gz"})
    if spec == "wikitext2":
        return _hub_texts("Salesforce/wikitext", "wikitext-2-raw-v1", split, None)
    if spec == "stdlib":
        return stdlib_texts(split)
    return read_local_texts(Path(spec).expanduser())


def _hub_texts(repo: str, name: str | None, split: str, data_files: dict | None) -> list[str]:
    try:
        import datasets

        if data_files is not None:
            ds = datasets.load_dataset(repo, data_files={split: data_files[split]}, split=split)
        else:
            ds = datasets.load_dataset(repo, name, split=split)
    except Exception as exc:  # network / cache problems surface as many exception types
        from llmprune.io.network import hub_reachable, why_offline

        if not hub_reachable():
            raise UserError(f"{repo} is not in the datasets cache and {why_offline()}; use --calib-data stdlib or a "
                            "local .txt/.jsonl/.parquet FILE (for eval: export it on a connected machine with "
                            "`llmprune eval --export-data DIR` and pass --data-dir DIR)") from None
        raise UserError(f"could not load {repo} ({type(exc).__name__}); use --calib-data stdlib or a local "
                        ".txt/.jsonl/.parquet file") from None
    return [t for t in ds["text"]]


def check_is_text(path: Path, text: str) -> None:
    """Refuse binary or mis-encoded files: random bytes make token windows that calibrate nothing."""
    sample = text[:200_000]
    if not sample:
        return
    bad = sum(1 for c in sample if c == "\ufffd" or (c < " " and c not in "\n\r\t\f\v"))
    if bad / len(sample) > 0.01:
        raise UserError(f"{path} does not look like text ({bad / len(sample):.0%} of its characters are not valid "
                        f"UTF-8 or are control bytes); give a UTF-8 text file")


def read_local_texts(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            text = path.read_text(encoding="utf-8", errors="replace")
            check_is_text(path, text)
            return [text]
        if suffix == ".jsonl":
            texts = []
            with path.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(f"{path}:{lineno} is not valid JSON") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise UserError(f"{path}:{lineno} has no string field 'text'")
                    texts.append(record["text"])
            return texts
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise UserError(f"{path} has no column 'text' (columns: {', '.join(table.column_names)})")
            return [t for t in table.column("text").to_pylist() if isinstance(t, str)]
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"could not read {path}: {type(exc).__name__}: {exc}") from None
    raise UserError(f"unsupported calibration file type {suffix}")


def stdlib_files(split: str = "train") -> list[Path]:
    """Top-level stdlib modules, split ~90/10 by a hash of the file name (stable across machines)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    def is_test(p: Path) -> bool:
        return int(hashlib.sha1(p.name.encode()).hexdigest(), 16) % 10 == 0
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split} for stdlib; use train or test")
    return [p for p in files if is_test(p) == (split == "test")]


def stdlib_texts(split: str = "train") -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(split)]


def token_stream(tokenizer, texts: Sequence[str], max_tokens: int | None = None, seed: int | None = None):
    """Tokenize documents joined by "\\n\\n" into one 1-D LongTensor.

    With `seed`, documents are visited in a seeded random order; with `max_tokens`, tokenizing stops
    once that many tokens are collected (C4 has 356k documents; we never need all of them).
    """
    import torch

    order = list(range(len(texts)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    ids: list[int] = []
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for i in order:
        text = texts[i]
        if not text or not text.strip():
            continue
        if ids:
            ids.extend(sep)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer, texts: Sequence[str], n_samples: int, seqlen: int, seed: int = 0):
    """`[n_samples, seqlen]` token windows at seeded random offsets of the joined text."""
    import torch

    if n_samples < 1 or seqlen < 1:
        raise UserError("--calib-samples and --calib-seqlen must be positive")
    # Enough text for windows to be mostly distinct, without tokenizing a whole C4 shard.
    stream = token_stream(tokenizer, texts, max_tokens=max(4 * n_samples * seqlen, 65536), seed=seed)
    if stream.numel() < seqlen:
        raise UserError(f"calibration data has only {stream.numel()} tokens but --calib-seqlen is {seqlen}; "
                        "give more text or a smaller --calib-seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (n_samples,), generator=gen)
    return torch.stack([stream[s: s + seqlen] for s in starts.tolist()])


def disjoint_windows(tokenizer, texts: Sequence[str], n_samples: int, seqlen: int, seed: int = 0, *,
                     exclude_samples: int = 0, exclude_seqlen: int | None = None, exclude_seed: int = 0,
                     allow_fewer: bool = False):
    """`[k, seqlen]` windows of the calibration token stream that overlap neither each other nor the
    windows `calibration_windows(tokenizer, texts, exclude_samples, exclude_seqlen, exclude_seed)` drew.

    For training on the calibration source without training on the calibration data (heal). The stream
    is the calibration one (documents in `exclude_seed` order), extended with more documents in the same
    order when it is too short; the free runs of tokens are cut into non-overlapping `seqlen` chunks and
    `seed` picks `n_samples` of them in random order. `allow_fewer`: return as many as there are (at
    least one) instead of failing.
    """
    import torch

    if n_samples < 1 or seqlen < 1:
        raise UserError("the number of heal windows and their seqlen must be positive")
    exclude_seqlen = exclude_seqlen or seqlen
    calib_tokens = max(4 * exclude_samples * exclude_seqlen, 65536)   # exactly what calibration_windows reads
    stream = token_stream(tokenizer, texts, max_tokens=calib_tokens, seed=exclude_seed)
    calib_len = stream.numel()
    used = torch.zeros(calib_len, dtype=torch.bool)
    if exclude_samples and calib_len >= exclude_seqlen:      # the same draws as calibration_windows
        gen = torch.Generator().manual_seed(exclude_seed)
        starts = torch.randint(0, calib_len - exclude_seqlen + 1, (exclude_samples,), generator=gen)
        for s in starts.tolist():
            used[s: s + exclude_seqlen] = True
    # Each free run wastes < seqlen tokens at its end, and there are at most exclude_samples + 1 runs.
    needed = int(used.sum()) + (n_samples + exclude_samples + 1) * seqlen
    if needed > calib_len and calib_len >= calib_tokens:     # more documents exist: read further, same order
        longer = token_stream(tokenizer, texts, max_tokens=needed, seed=exclude_seed)
        assert torch.equal(longer[:calib_len], stream), "token_stream must extend its own prefix"
        stream = longer
        used = torch.cat([used, torch.zeros(stream.numel() - calib_len, dtype=torch.bool)])
    # Free runs [a, b) of unused tokens -> chunk starts a, a + seqlen, ... (non-overlapping).
    edges = torch.diff(torch.cat([torch.tensor([0]), (~used).long(), torch.tensor([0])]))
    run_starts = (edges == 1).nonzero().flatten().tolist()
    run_ends = (edges == -1).nonzero().flatten().tolist()
    chunks = [s for a, b in zip(run_starts, run_ends) for s in range(a, b - seqlen + 1, seqlen)]
    if len(chunks) < (1 if allow_fewer else n_samples):
        raise UserError(f"the text has {stream.numel()} tokens; outside the {exclude_samples} calibration windows "
                        f"there is room for {len(chunks)} windows of {seqlen} tokens but {n_samples} are needed; "
                        "give more text, fewer windows or a smaller seqlen")
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed))[:n_samples]
    return torch.stack([stream[chunks[i]: chunks[i] + seqlen] for i in order.tolist()])
