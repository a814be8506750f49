"""The guard's layers: 1 similarity to the scenario document (more layers arrive with the learning loop)."""
