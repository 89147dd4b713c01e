"""Eval suites (YAML), installed as package data of llmprune.evals."""
