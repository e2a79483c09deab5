"""`qcpu convert` and `qcpu quantize` (being written)."""


def register(app) -> None:
    """Add the quantization commands to the `qcpu` Typer app."""
