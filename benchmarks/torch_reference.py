"""PyTorch side of benchmarks/vs_torch.py: the same models, loss, Adam and fresh Gaussian prompts each step, in plain
eager PyTorch, as a researcher would write them. Runs in the PyTorch environment (Python 3.11, torch).

python benchmarks/torch_reference.py IN.npz OUT.npz
IN.npz: the device ("cpu" or "cuda"), the workload (`workload` "lsa" or "gpt" and its sizes), jaxicl's initial weights under jaxicl's parameter
paths and layouts (param/...), the probe weights of the agreement check (probe/...) and one batch (inputs, targets,
mask). OUT.npz: the loss and the gradients (jaxicl's paths and layouts) on that batch at both weights (probe_loss,
probe_grad/...), the count of parameters the loss reaches and the matmul FLOPs of one training step's forward and
backward pass (torch's FlopCounterMode). Then it prints "ready" and, for every line read from stdin, trains `steps`
steps and prints their wall seconds, until stdin closes: benchmarks/vs_torch.py alternates these timed runs with
jaxicl's.

Models (the layouts convert once, at load):
  lsa: 1 linear self-attention layer with residual, x + (x Wq)(x Wk)^T / (T - 1) (x Wv) Wo; prediction -out[:, :, -1]
  gpt: pre-LN blocks, causal softmax attention (no biases), tanh-GELU MLP, learned positions, final LayerNorm,
       a linear input embedding and a scalar output. Trained and timed with F.scaled_dot_product_attention
       (is_causal=True), as nanoGPT and Hugging Face write it (5-7% faster than the written-out attention for the
       2-layer GPT on a 2-core AMD EPYC, equal for the 12-layer one); FlopCounterMode does not count SDPA's CPU
       kernel, so the FLOPs are counted on the same model with the attention written out, whose loss
       (`loss_explicit`) is returned too.
Loss: the mask-weighted mean squared error per prompt, averaged over prompts (jaxicl.train.losses.regression_loss).
"""

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def load(data: dict, device: str, prefix: str = "param/") -> dict[str, torch.Tensor]:
    """jaxicl's weights [H, D, dh] / [H, dh, D] (the entries under `prefix`) as matmul-ready [D, H*dh] / [H*dh, D]
    leaf tensors."""
    params = {}
    for name, value in data.items():
        if not name.startswith(prefix):
            continue
        name, value = name[len(prefix):], torch.tensor(value)
        kind = name.rsplit(".", 1)[-1]
        if kind in ("wq", "wk", "wv"):
            value = value.permute(1, 0, 2).reshape(value.shape[1], -1)
        elif kind == "wo":
            value = value.reshape(-1, value.shape[2])
        params[name] = value.contiguous().to(device).requires_grad_(True)
    return params


def to_jaxicl(name: str, grad: torch.Tensor, shape: tuple) -> np.ndarray:
    """A gradient back in jaxicl's layout `shape`."""
    kind = name.rsplit(".", 1)[-1]
    if kind in ("wq", "wk", "wv"):
        h, d, e = shape
        grad = grad.reshape(d, h, e).permute(1, 0, 2)
    return grad.reshape(shape).cpu().numpy()


def lsa_forward(p: dict, x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """x [B, T, D] -> predictions [B, T]."""
    heads = int(cfg["heads"])
    b, t, _ = x.shape
    q, k, v = ((x @ p[f"layers.0.{w}"]).view(b, t, heads, -1).transpose(1, 2) for w in ("wq", "wk", "wv"))
    z = (q @ k.transpose(-1, -2) / (t - 1)) @ v  # [B, H, T, K]
    out = x + z.transpose(1, 2).reshape(b, t, -1) @ p["layers.0.wo"]
    return -out[..., -1]


def layer_norm(x: torch.Tensor, p: dict, name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.scale"], p[f"{name}.bias"], eps=1e-5)


def gpt_forward(p: dict, x: torch.Tensor, cfg: dict, sdpa: bool = True) -> torch.Tensor:
    """x [B, T, input_dim] -> predictions [B, T]; sdpa=False writes the attention out (for FlopCounterMode)."""
    heads, layers = int(cfg["heads"]), int(cfg["layers"])
    b, t, _ = x.shape
    h = x @ p["embed"] + p["pos_embed"][:t]
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # True above the diagonal: keys after the query
    for l in range(layers):
        blk = f"blocks.{l}."
        a = layer_norm(h, p, blk + "ln1")
        q, k, v = ((a @ p[blk + f"attn.{w}"]).view(b, t, heads, -1).transpose(1, 2) for w in ("wq", "wk", "wv"))
        if sdpa:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(causal, float("-inf"))
            z = torch.softmax(scores, -1) @ v
        h = h + z.transpose(1, 2).reshape(b, t, -1) @ p[blk + "attn.wo"]
        m = layer_norm(h, p, blk + "ln2") @ p[blk + "mlp.w_in"] + p[blk + "mlp.bias_in"]
        h = h + F.gelu(m, approximate="tanh") @ p[blk + "mlp.w_out"] + p[blk + "mlp.bias_out"]
    return (layer_norm(h, p, "ln_final") @ p["unembed"] + p["unembed_bias"])[..., 0]


def loss_of(p: dict, inputs, targets, mask, cfg: dict, sdpa: bool = True) -> torch.Tensor:
    gpt = str(cfg["workload"]) == "gpt"
    pred = gpt_forward(p, inputs, cfg, sdpa) if gpt else lsa_forward(p, inputs, cfg)
    return ((mask * (pred - targets) ** 2).sum(-1) / mask.sum(-1).clamp_min(1e-12)).mean()


def fresh_batch(cfg: dict, batch: int, device: str):
    """Linear-regression prompts (w, x ~ N(0, I), y = x w): paired tokens [x; y] (lsa, loss at the query) or
    interleaved [x; 0], [0; y] ending at the query (gpt, loss at every x token)."""
    dim, n = int(cfg["dim"]), int(cfg["n_context"]) + 1
    w = torch.randn(batch, dim, 1, device=device)
    x = torch.randn(batch, n, dim, device=device)
    y = (x @ w)[..., 0]
    shown = torch.cat([y[:, :-1], torch.zeros(batch, 1, device=device)], 1)
    if str(cfg["workload"]) == "lsa":
        mask = torch.zeros(batch, n, device=device)
        mask[:, -1] = 1.0
        return torch.cat([x, shown[..., None]], -1), y, mask
    tokens = torch.zeros(batch, 2 * n, dim + 1, device=device)
    tokens[:, 0::2, :dim] = x
    tokens[:, 1::2, dim] = shown
    targets = torch.zeros(batch, 2 * n - 1, device=device)
    targets[:, 0::2] = y
    mask = torch.zeros(batch, 2 * n - 1, device=device)
    mask[:, 0::2] = 1.0
    return tokens[:, :-1], targets, mask


def main(src: str, dst: str) -> None:
    data = dict(np.load(src))
    cfg = {k: data[k] for k in ("workload", "heads", "layers", "dim", "n_context", "batch", "steps", "threads")}
    device = str(data["device"])
    torch.set_num_threads(int(cfg["threads"]))
    torch.set_float32_matmul_precision("highest")  # no TF32 on CUDA (the default; jaxicl's side runs float32 too)
    torch.manual_seed(0)
    params = load(data, device)
    inputs, targets, mask = (torch.tensor(data[k], device=device) for k in ("inputs", "targets", "mask"))
    out = {}
    for prefix, weights in (("", params), ("probe_", load(data, device, "probe/"))):
        loss = loss_of(weights, inputs, targets, mask, cfg)
        grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)  # None: a weight the loss skips
        if not prefix:  # the parameters the loss reaches (a reference that skips one counts fewer; its gradient is 0)
            out["n_params"] = sum(w.numel() for w, g in zip(weights.values(), grads) if g is not None)
        out |= {f"{prefix}loss": loss.item(),
                **{f"{prefix}grad/{n}": to_jaxicl(n, torch.zeros_like(w) if g is None else g, data[f"param/{n}"].shape)
                   for (n, w), g in zip(weights.items(), grads)}}

    opt = torch.optim.Adam(params.values(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    batch, steps = int(cfg["batch"]), int(cfg["steps"])

    def step():
        opt.zero_grad(set_to_none=True)
        loss_of(params, *fresh_batch(cfg, batch, device), cfg).backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:  # the model's forward and backward, not sampling or Adam
        loss_explicit = loss_of(params, inputs, targets, mask, cfg, sdpa=False)
        loss_explicit.backward()
    out["loss_explicit"] = loss_explicit.item()
    out["flops_per_step"] = counter.get_total_flops() * batch // len(inputs)
    np.savez(dst, torch=torch.__version__, threads=torch.get_num_threads(),
             device=torch.cuda.get_device_name() if device == "cuda" else "cpu", **out)
    print("ready", flush=True)
    for _ in sys.stdin:  # one timed run per line
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        print(time.perf_counter() - start, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
