"""fmnist-mlp (shipped in the package) compressed by the CLI, for the runtime's tests."""

from __future__ import annotations

from pathlib import Path

from symshrink.cli import main


def compressed_fmnist(folder: Path, variants: dict[str, list[str]]) -> dict[str, str]:
    """Paths by variant name, one compression per distinct set of flags. Random calibration: these tests are about
    the runtime, and the GPU machines lack the Debian data; the gate widened to any cosine (lossy codes on random
    inputs)."""
    made: dict[tuple[str, ...], str] = {}
    paths = {}
    for name, flags in variants.items():
        if tuple(flags) not in made:
            path = folder / f"{name}.onnx"
            assert main(["compress", "fmnist-mlp", "-o", str(path), "-q", "--random-calib", "--min-cosine", "0",
                         *flags]) == 0
            made[tuple(flags)] = str(path)
        paths[name] = made[tuple(flags)]
    return paths
