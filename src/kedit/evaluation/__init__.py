"""Edit evaluation: METRICS.md metrics, the canary suite and the promotion gates."""
