"""Mixture-of-experts support: family data (`families`), routing reproduction (`routing`), per-expert
calibration statistics (`observe`), expert-selection criteria and merging (`criteria`), and the
compute-then-edit expert drop (`edit`). Plain functions; no stage wiring here."""
