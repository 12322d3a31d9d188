"""Values every layer agrees on."""

# The label of a position the loss skips: PyTorch's cross_entropy default, and what transformers' models expect.
IGNORE_INDEX = -100
