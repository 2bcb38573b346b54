"""PyTorch CPU reference for bench/engine.ts: one llama training step (forward,
loss on every token, backward, AdamW) with LoRA on every projection or with
every weight trainable, on the same configuration and thread count.

Usage: python3 bench/torch_llama_step.py '<json config>'  -> prints one JSON line.
"""
import json
import math
import resource
import sys
import time

import torch
import torch.nn.functional as F

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
H, L, nh, nkv, I, V = cfg["hidden"], cfg["layers"], cfg["heads"], cfg["kvHeads"], cfg["intermediate"], cfg["vocab"]
B, T, r, mode = cfg["batch"], cfg["seq"], cfg["r"], cfg["mode"]
hd = H // nh
full = mode == "full"


def weight(out_f, in_f):
    return torch.nn.Parameter(torch.randn(out_f, in_f) * 0.02, requires_grad=full)


class Linear(torch.nn.Module):
    def __init__(self, in_f, out_f):
        super().__init__()
        self.w = weight(out_f, in_f)
        if not full:
            self.a = torch.nn.Parameter(torch.empty(r, in_f).uniform_(-1 / math.sqrt(in_f), 1 / math.sqrt(in_f)))
            self.b = torch.nn.Parameter(torch.randn(out_f, r) * 0.01)

    def forward(self, x):
        y = x @ self.w.t()
        if not full:
            y = y + (x @ self.a.t() @ self.b.t()) * 2.0
        return y


def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
ang = torch.outer(torch.arange(T).float(), inv)
cos = torch.cat([ang, ang], -1).cos()
sin = torch.cat([ang, ang], -1).sin()


def rope(x):
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.n1 = torch.nn.Parameter(torch.ones(H), requires_grad=full)
        self.n2 = torch.nn.Parameter(torch.ones(H), requires_grad=full)
        self.q, self.k, self.v, self.o = Linear(H, nh * hd), Linear(H, nkv * hd), Linear(H, nkv * hd), Linear(nh * hd, H)
        self.g, self.u, self.d = Linear(H, I), Linear(H, I), Linear(I, H)

    def forward(self, x, mask):
        h = rms(x, self.n1)
        q = rope(self.q(h).view(B, T, nh, hd).transpose(1, 2))
        k = rope(self.k(h).view(B, T, nkv, hd).transpose(1, 2)).repeat_interleave(nh // nkv, 1)
        v = self.v(h).view(B, T, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, 1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask
        a = (s.softmax(-1) @ v).transpose(1, 2).reshape(B * T, nh * hd).view(B, T, H)
        x = x + self.o(a)
        h = rms(x, self.n2)
        return x + self.d(F.silu(self.g(h)) * self.u(h))


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = weight(V, H)
        self.layers = torch.nn.ModuleList([Layer() for _ in range(L)])
        self.norm = torch.nn.Parameter(torch.ones(H), requires_grad=full)
        self.head = weight(V, H)

    def forward(self, ids, targets, mask):
        x = self.emb[ids]
        for layer in self.layers:
            x = layer(x, mask)
        logits = rms(x, self.norm) @ self.head.t()
        return F.cross_entropy(logits.view(-1, V), targets.view(-1), reduction="sum")


model = Model()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
mask = torch.full((T, T), -1e9).triu(1)
ids = torch.randint(0, V, (B, T))
targets = torch.randint(0, V, (B, T))


def step():
    opt.zero_grad(set_to_none=True)
    loss = model(ids, targets, mask) / (B * T)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


for _ in range(cfg["warmup"]):
    step()
t0 = time.perf_counter()
for _ in range(cfg["steps"]):
    step()
secs = time.perf_counter() - t0
print(json.dumps({
    "tokensPerSec": B * T * cfg["steps"] / secs,
    "stepMs": 1000 * secs / cfg["steps"],
    "peakRssBytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "trainable": sum(p.numel() for p in params),
}))
