"""Analysis of trained models: equivalence to algorithms, probes, geometry."""
