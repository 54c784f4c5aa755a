"""PyTorch interop: semseg's and mmseg's state_dict names, .pth files, reference torch models."""
