"""Triton kernels of uamt_fast, installed and imported as `uamt_fast.kernels`."""
if __name__ == "kernels":
    raise ImportError(
        "uamt_fast's kernels/ folder is imported as `uamt_fast.kernels`, not `kernels` "
        "(the top-level name belongs to Hugging Face's Kernel Hub package)."
    )
