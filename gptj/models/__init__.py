"""Model architectures. Each is one file of plain PyTorch with the same forward signature."""
