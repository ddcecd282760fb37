"""Golden tensors: case definitions, generation, verification and file formats (spec/golden.yaml)."""
