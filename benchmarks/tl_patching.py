"""TransformerLens side of benchmarks/patching.py; runs in the PyTorch environment (Python 3.11, torch, transformer_lens).

python benchmarks/tl_patching.py IN.npz OUT.npz REPEATS
IN.npz holds the jaxicl GPT's weights (TransformerLens names and layouts), the clean and corrupted token
batches and the answer tokens; OUT.npz gets the (layer, position, head) grid of
patching.get_act_patch_attn_head_out_by_pos and the wall times of the clean run_with_cache and that grid.
"""

import sys
import time
from importlib.metadata import version

import numpy as np
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig, patching


def main(src: str, dst: str, repeats: int) -> None:
    torch.set_grad_enabled(False)
    data = dict(np.load(src))
    n_layers, n_heads, d_model, d_head = (int(data[k]) for k in ("n_layers", "n_heads", "d_model", "d_head"))
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_ctx=int(data["n_ctx"]), d_head=d_head,
                                  n_heads=n_heads, d_mlp=int(data["d_mlp"]), d_vocab=int(data["d_vocab"]),
                                  act_fn="gelu_new", normalization_type="LN", device="cpu", seed=0)
    model = HookedTransformer(cfg)
    state = model.state_dict()
    for name in state:
        if name in data:
            state[name] = torch.tensor(data[name])
        elif name.endswith(("b_Q", "b_K", "b_V", "b_O")):
            state[name] = torch.zeros_like(state[name])  # the jaxicl GPT's attention has no biases
    model.load_state_dict(state)
    clean, corrupted = torch.tensor(data["clean"]), torch.tensor(data["corrupted"])
    answer = torch.tensor(data["answer"])
    rows = torch.arange(len(answer))

    def metric(logits):
        return logits[rows, -1, answer].mean()

    times, grid = [], None
    for _ in range(repeats):  # the clean run is timed too: jaxicl's activation_patching does it inside its call
        start = time.perf_counter()
        _, clean_cache = model.run_with_cache(clean)
        grid = patching.get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, metric)
        times.append(time.perf_counter() - start)
    np.savez(dst, grid=grid.numpy(), times=np.array(times), torch=torch.__version__,
             version=version("transformer_lens"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
