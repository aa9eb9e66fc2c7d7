"""Edit evaluation: docs/metrics.md metrics, the canary suite and the promotion gates."""
