"""Key statistics: the uncentred second moment E[k kᵀ] of the edited matrices' inputs over a corpus."""
