"""Interoperability with the PyTorch code of the published methods.

`torch_layouts` (NumPy only) maps their checkpoints' state dicts onto jaxda's variables,
`convert` reads the files (needs PyTorch: pip install -e '.[torch]') and writes orbax
checkpoints, and `torch_reference` is a PyTorch DeepLabV2 written from the reference for parity
tests and speed comparisons.
"""
