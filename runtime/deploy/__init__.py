"""`scarlet deploy` and `scarlet check`: the fastest artifact that is still the model, as a package that re-checks itself."""
