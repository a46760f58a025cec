"""flamingo-fast: Flamingo vision-language models with fused Hopper attention kernels."""

__version__ = "0.1.0"

__all__ = ["Flamingo", "FlamingoConfig", "__version__"]


def __getattr__(name):
    # Lazy so that `import flamingo_fast.ops` does not pull in the models (ops sit below models).
    if name == "FlamingoConfig":
        from flamingo_fast.models.config import FlamingoConfig

        return FlamingoConfig
    if name == "Flamingo":
        from flamingo_fast.models.flamingo import Flamingo

        return Flamingo
    raise AttributeError(f"module 'flamingo_fast' has no attribute {name!r}")
