"""Key statistics: the uncentred second moment E[k kᵀ] of the edited matrices' inputs over a corpus."""

# the token budget the shipped hyperparameters and published numbers were measured with (params.yaml)
DEFAULT_STATS_TOKENS = 200_000
