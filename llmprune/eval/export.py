"""Task and perplexity data for offline machines: `export_data` (run where the Hub is reachable)
writes every lm-eval task's splits and the wikitext2/c4 test text to a folder that `--data-dir` reads;
`ppl_texts` reads perplexity text from there, the datasets cache or a local file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmprune.errors import UserError
from llmprune.eval.suites import TaskSpec
from llmprune.eval.tasks import index_for

PPL_EXPORT_DIR = "_perplexity"     # --export-data writes wikitext2/c4 test text here as jsonl
HUB_PPL_SOURCES = ("wikitext2", "c4")


def ppl_texts(data: str, data_dir: str | None) -> list[str]:
    """Test documents of a perplexity source; named Hub sources come from --data-dir when exported."""
    from llmprune.calibration.data import load_texts, read_local_texts

    if data in HUB_PPL_SOURCES and data_dir:
        local = Path(data_dir).expanduser() / PPL_EXPORT_DIR / f"{data}.jsonl"
        if local.is_file():
            return read_local_texts(local)
    try:
        return load_texts(data, split="test")
    except UserError:
        if data not in HUB_PPL_SOURCES:
            raise
        from llmprune.io.network import hub_reachable, why_offline

        why = f"not in the datasets cache and {why_offline()}" if not hub_reachable() else "not available"
        raise UserError(f"perplexity data {data} is {why}; export it on a connected machine with "
                        f"`llmprune eval --export-data DIR --suite lm` and pass --data-dir DIR, or use "
                        f"--ppl-data stdlib or a local .txt/.jsonl") from None


def export_data(specs: list[TaskSpec], out_dir: Path, include_path: list[str] | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Download each lm-eval task's splits (as its YAML loads them) and write
    `out_dir/<leaf task>/<split>.parquet` plus `manifest.json`. Run where the Hub is reachable."""
    import hashlib

    from tqdm.auto import tqdm

    from llmprune.io.sidecar import versions

    from llmprune.calibration.data import load_texts
    from llmprune.eval.ppl import protocol_for

    lm_specs = [s for s in specs if s.kind == "lm_eval"]
    ppl_specs = [s for s in specs if s.kind == "perplexity" and s.params["data"] in HUB_PPL_SOURCES]
    if not lm_specs and not ppl_specs:
        raise UserError("nothing to export: the chosen suites need no downloaded data (probes, local files)")
    manifest: dict[str, Any] = {"versions": versions(), "tasks": {}, "perplexity": {}}
    for spec in ppl_specs:
        name = spec.params["data"]
        texts = load_texts(name, split="test")
        max_docs = protocol_for(name)[1]
        texts = texts[:max_docs] if max_docs else texts
        (out_dir / PPL_EXPORT_DIR).mkdir(exist_ok=True)
        path = out_dir / PPL_EXPORT_DIR / f"{name}.jsonl"
        with open(path, "w") as fh:
            fh.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        manifest["perplexity"][name] = {"docs": len(texts), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    include = [str(Path(p).expanduser().resolve()) for p in (include_path or [])]
    tm = index_for([s.name for s in lm_specs], include) if lm_specs else None
    for spec in tqdm(lm_specs, desc="export", disable=not progress):
        try:
            loaded = tm.load([spec.name])
        except Exception as exc:
            raise UserError(f"could not download data for {spec.name}: {type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
        for leaf, task in sorted(loaded["tasks"].items()):
            dataset = getattr(task, "dataset", None)
            if dataset is None:
                raise UserError(f"task {leaf} has no dataset object to export")
            leaf_dir = out_dir / leaf
            leaf_dir.mkdir(parents=True, exist_ok=True)
            files = {}
            for split in dataset:
                path = leaf_dir / f"{split}.parquet"
                dataset[split].to_parquet(str(path))
                files[split] = {"rows": len(dataset[split]),
                                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            manifest["tasks"][leaf] = {"suite_task": spec.name, "splits": files}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
