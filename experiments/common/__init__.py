"""What every experiment shares: checks and results, config overrides, figures, the report."""
