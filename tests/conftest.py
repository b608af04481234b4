import torch

# Tiny models on a 2-core machine: one intra-op thread is many times faster than two
# (oversubscription when pytest, gloo workers and BLAS threads compete).
torch.set_num_threads(1)
