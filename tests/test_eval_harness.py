"""Perplexity protocol, suites, and the real lm-eval path on a tiny random Llama (offline)."""
import math

import pytest
import torch

from llmprune.errors import UserError
import eval_toy as toy
from llmprune.eval import export as eval_export
from llmprune.eval import harness, ppl, selection, suites
from llmprune.eval import results as eval_results
from llmprune.eval import settings as eval_settings
from llmprune.eval import tasks as eval_tasks

TEXT = ["def add(a, b):\n    return a + b\n", "", "class Point:\n    x = 1\n    y = 2\n"] * 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = toy.make_tokenizer()
    model = toy.make_model(tok, seed=0)
    tasks = tmp_path_factory.mktemp("tasks")
    toy.write_tasks(tasks, n=6)
    return model, tok, tasks


def test_perplexity_equals_a_straightforward_computation(tiny):
    model, tok, _ = tiny
    seqlen = 48
    res = ppl.perplexity(model, tok, TEXT, seqlen=seqlen, name="wikitext2", batch_size=3)
    # independent: tokenize the "\n\n"-joined text, cut windows by hand, sum -log p token by token
    ids = tok("\n\n".join(TEXT))["input_ids"]
    n = len(ids) // seqlen
    assert res.windows == n and res.tokens == n * (seqlen - 1)   # tail dropped, first token unscored
    total = 0.0
    with torch.no_grad():
        for w in range(n):
            x = torch.tensor([ids[w * seqlen:(w + 1) * seqlen]])
            logp = torch.log_softmax(model(x).logits[0].double(), dim=-1)
            total -= logp[torch.arange(seqlen - 1), x[0, 1:]].sum().item()   # -log p(x_t+1 | x_<=t)
    assert res.ppl == pytest.approx(math.exp(total / (n * (seqlen - 1))), rel=1e-5)
    assert sum(res.window_nll) == pytest.approx(total, rel=1e-5)
    # batch size does not change the number
    assert ppl.perplexity(model, tok, TEXT, seqlen=seqlen, batch_size=1).ppl == pytest.approx(res.ppl, rel=1e-5)


def test_c4_protocol_joins_with_space_and_caps_windows(tiny):
    _, tok, _ = tiny
    w = ppl.token_windows(tok, TEXT, 16, *ppl.protocol_for("c4")[:2], max_windows=3)
    assert w.shape == (3, 16)
    assert ppl.protocol_for("c4")[0] == " " and ppl.protocol_for("my.txt")[0] == "\n\n"
    with pytest.raises(UserError, match="fewer than one"):
        ppl.token_windows(tok, ["tiny"], 4096)


def test_shipped_suites_are_valid():
    names = suites.available_suites()
    assert {"lm", "knowledge", "reasoning_mc", "reasoning_gen", "reasoning", "instruction", "probes"} <= set(names)
    seen = set()
    for name in names:
        for s in suites.load_suite(name):
            for t in s.tasks:
                assert t.metric and "," in t.metric
                assert t.chance is None or 0 <= t.chance < 1
                if name != "reasoning":
                    assert t.name not in seen, f"{t.name} in two suites"
                    seen.add(t.name)
    assert [s.name for s in suites.load_suite("reasoning")] == ["reasoning_mc", "reasoning_gen"]
    assert suites.load_suite("lm")[0].perplexity == ["wikitext2"]
    with pytest.raises(UserError, match="unknown suite"):
        suites.load_suite("nope")


def _settings(tasks, **kw):
    return eval_settings.Settings(seqlen=64, max_length=128, batch_size=4, limit=4, include_path=[str(tasks)],
                            progress=False, **kw)


def test_all_output_types_through_lm_eval_and_stale_free_reuse(tiny, tmp_path):
    model, tok, tasks = tiny
    model = toy.make_model(tok, seed=1)              # a private copy: this test prunes it
    text = tmp_path / "held.txt"
    text.write_text("\n\n".join(TEXT))
    sel = suites.load_suites(["probes"])
    for s in sel:   # keep the probes small
        for t in s.tasks:
            t.params["n"] = 3
    specs = selection.select_specs(sel, ["toy_mc", "toy_gen", "toy_roll"], [str(text)])
    ctx = harness.prepare(model, tok, sel, specs, _settings(tasks))
    dense = harness.evaluate(ctx, model, tok, "toy")
    r = dense.results
    assert set(r["tasks"]) == {"ppl_held", "probe_arithmetic", "probe_brackets", "probe_kv_retrieval",
                               "toy_mc", "toy_gen", "toy_roll"}
    assert r["tasks"]["toy_mc"]["metric"] == "acc,none" and r["tasks"]["toy_mc"]["n"] == 4
    assert r["tasks"]["toy_gen"]["metric"] == "exact_match,none"
    assert r["tasks"]["toy_roll"]["higher_is_better"] is False
    assert r["perplexity"]["held"] == r["tasks"]["ppl_held"]["value"] > 1
    assert r["sparsity"]["achieved"] == 0.0 and r["sparsity"]["modules"] == 14
    assert r["suites"]["probes"]["tasks"] == ["probe_arithmetic", "probe_brackets", "probe_kv_retrieval"]
    assert len(dense.items["toy_mc"]["x"]) == 4 and dense.items["toy_roll"]["kind"] == "ratio"
    # the rolling items reproduce lm-eval's own aggregate
    it = dense.items["toy_roll"]
    assert math.exp(sum(it["num"]) / sum(it["den"])) == pytest.approx(r["tasks"]["toy_roll"]["value"], rel=1e-6)
    # toy_mc per-sample log-likelihoods, to compare after pruning
    ll_dense = [s["filtered_resps"][0][0] for s in dense.samples["toy_mc"]]

    # prune 50% of every prunable weight by magnitude, in place, and evaluate again with the same ctx
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                thr = m.weight.abs().flatten().kthvalue(m.weight.numel() // 2).values
                m.weight[m.weight.abs() <= thr] = 0
    pruned = harness.evaluate(ctx, model, tok, "toy")
    ctx.close()
    p = pruned.results
    assert p["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01)
    assert p["perplexity"]["held"] != pytest.approx(r["perplexity"]["held"], rel=1e-4)
    assert p["tasks"]["toy_roll"]["value"] != pytest.approx(r["tasks"]["toy_roll"]["value"], rel=1e-4)
    ll_pruned = [s["filtered_resps"][0][0] for s in pruned.samples["toy_mc"]]
    assert all(abs(a - b) > 1e-4 for a, b in zip(ll_dense, ll_pruned))

    out = tmp_path / "res"
    eval_results.write_results(out, pruned)
    back = eval_results.read_results(out)
    assert back["tasks"]["toy_mc"]["value"] == p["tasks"]["toy_mc"]["value"]
    assert eval_results.read_items(out)["toy_mc"]["ids"] == pruned.items["toy_mc"]["ids"]
    assert (out / "samples" / "toy_gen.jsonl.gz").is_file() and (out / "lm_eval_results.json").is_file()


def test_export_then_data_dir_gives_the_same_numbers(tiny, tmp_path):
    model, tok, tasks = tiny
    specs = selection.select_specs([], ["toy_mc", "toy_roll"], [])
    direct = harness.evaluate(harness.prepare(model, tok, [], specs, _settings(tasks)), model, tok)
    export = tmp_path / "export"
    export.mkdir()
    manifest = eval_export.export_data(specs, export, [str(tasks)], progress=False)
    assert set(manifest["tasks"]) == {"toy_mc", "toy_roll"}
    assert (export / "toy_mc" / "test.parquet").is_file()
    ctx = harness.prepare(model, tok, [], specs, _settings(tasks, data_dir=str(export)))
    assert ctx.lm_eval_names["toy_mc"].startswith(eval_tasks.GENERATED_PREFIX)
    local = harness.evaluate(ctx, model, tok)
    ctx.close()
    for t in ("toy_mc", "toy_roll"):
        assert local.results["tasks"][t]["value"] == pytest.approx(direct.results["tasks"][t]["value"])
    # a task whose data was not exported: one clear error naming the task and the export command
    (export / "toy_roll" / "test.parquet").unlink()
    with pytest.raises(UserError, match=r"toy_roll.*llmprune eval --export-data DIR --tasks toy_roll"):
        harness.prepare(model, tok, [], specs, _settings(tasks, data_dir=str(export)))


def test_builtin_task_redirected_to_local_parquet(tiny, tmp_path):
    """Built-in arc_easy keeps its prompt and metric but reads a local parquet export."""
    pd = pytest.importorskip("pandas")
    model, tok, _ = tiny
    (tmp_path / "arc_easy").mkdir()
    rows = [{"id": f"q{i}", "question": f"Which number is {i}?",
             "choices": {"text": [str(i), "cat", "dog", "sun"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"}
            for i in range(5)]
    pd.DataFrame(rows).to_parquet(tmp_path / "arc_easy" / "test.parquet")
    specs = selection.select_specs(suites.load_suites(["reasoning_mc"]), [], [])
    specs = [s for s in specs if s.name == "arc_easy"]
    settings = eval_settings.Settings(seqlen=64, max_length=128, batch_size=4, limit=3, data_dir=str(tmp_path),
                                progress=False)
    ctx = harness.prepare(model, tok, [], specs, settings)
    run = harness.evaluate(ctx, model, tok)
    ctx.close()
    t = run.results["tasks"]["arc_easy"]
    assert t["metric"] == "acc,none" and t["chance"] == 0.25 and t["n"] == 3
    args = run.samples["arc_easy"][0]["arguments"]
    assert args[0][0] == "Question: Which number is 0?\nAnswer:" and [a[1] for a in args] == [" 0", " cat", " dog", " sun"]
    # its other splits are absent: fine at 0-shot; an unknown task is a one-line error
    with pytest.raises(UserError, match="unknown lm-eval task"):
        harness.prepare(model, tok, [], [suites.TaskSpec(name="no_such_task_xyz", suite="custom")], settings)


def test_perplexity_text_from_data_dir_and_offline_error(tmp_path):
    import json

    d = tmp_path / eval_export.PPL_EXPORT_DIR
    d.mkdir()
    (d / "wikitext2.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", "", " = b = "]))
    assert eval_export.ppl_texts("wikitext2", str(tmp_path)) == ["a", "", " = b = "]   # empty lines kept
    with pytest.raises(UserError, match=r"export-data DIR --suite lm"):
        eval_export.ppl_texts("c4", str(tmp_path))      # not exported, and the Hub is offline in tests


def test_auto_ppl_batch_keeps_big_vocab_windows_single_and_batches_small_ones():
    assert ppl.auto_batch_size(2048, 128256) == 1                 # 1 GiB of fp32 logits per window
    assert ppl.auto_batch_size(256, 4096) == 64                   # capped at 16k tokens
    assert ppl.auto_batch_size(2048, 32000) == 1 and ppl.auto_batch_size(512, 32000) == 4
