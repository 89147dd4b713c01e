"""Named recipes (YAML), installed as package data of llmprune.recipes."""
