"""Run exported models: preprocessing, backends, verification, benchmarks, CLI."""
