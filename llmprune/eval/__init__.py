"""Evaluation: paper-protocol perplexity (ppl), lm-eval glue (harness), probes, report, plots.

Entry points: `llmprune eval`, `llmprune report`, `llmprune sweep` (llmprune/commands/). The
results.json schema is documented at the top of `llmprune/eval/results.py`.
"""
