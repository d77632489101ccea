"""litlab: a PyTorch Lightning experiment platform.

Importing `litlab` is cheap (no torch, no lightning): the CLI's --help stays fast. The notebook API
is loaded on first use::

    import litlab
    result = litlab.run("experiments/mlp/mlp_digits.yaml", ["optim.lr=0.01"])
    module = litlab.load(result.run_id)
"""

__version__ = "0.1.0"

__all__ = ["__version__", "run", "load"]


def __getattr__(name):  # PEP 562: lazy notebook API
    if name == "run":
        from litlab.api import run

        return run
    if name == "load":
        from litlab.api import load

        return load
    raise AttributeError(f"module 'litlab' has no attribute {name!r}")
