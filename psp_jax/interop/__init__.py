"""PyTorch interop: official state_dict names, .pth files and the reference torch model."""
