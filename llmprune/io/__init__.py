"""Everything that writes to disk: atomic output directories, the llmprune.json sidecar, hub upload."""
