"""SONIQ QAT on real data: scikit-learn's handwritten digits (1,797 8x8 images).

Trains a small CNN in fp32, then SONIQ-QATs it with the palettes {2, 8} and {1, 4}
(phase 1: learned per-channel precision under quantization noise and a bit budget;
snap; phase 2: straight-through fine-tuning), for several seeds, and prints the
test accuracy (mean and spread), the average bits per weight and the compression
of the weights against fp32. Optionally exports one model per palette and checks
ONNX Runtime against PyTorch.

    python examples/digits_qat.py                 # 3 seeds, the table in docs/qat.md
    python examples/digits_qat.py --seeds 0 --export /tmp/digits

Needs torch and scikit-learn (both CPU). About a minute per seed on 2 cores.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from soniq_tvm.torch import average_bits, bit_penalty, bit_report, export_onnx, prepare, snap

SPLIT_SEED = 0  # the fixed train/test split
TEST_FRACTION = 0.3


def load_digits_split():
    """``(x_train, y_train, x_test, y_test)``: images ``[N, 1, 8, 8]`` in ``[0, 1]``,
    a stratified 70/30 split fixed by ``SPLIT_SEED`` (1,257 train, 540 test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=TEST_FRACTION,
                                          random_state=SPLIT_SEED, stratify=d.target)
    t = torch.from_numpy
    return t(xtr), t(ytr).long(), t(xte), t(yte).long()


def make_cnn() -> nn.Module:
    """Conv-BN-ReLU x3 with two max-pools and a linear head (25,744 weights)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(model: nn.Module, x, y, *, epochs: int, lr: float, seed: int, penalty: bool = False,
          batch: int = 64) -> None:
    """Adam + cosine schedule, cross-entropy (+ ``bit_penalty`` when ``penalty``)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if penalty:
                loss = loss + bit_penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


@dataclass
class Recipe:
    fp32_epochs: int = 30
    fp32_lr: float = 3e-3
    phase1_epochs: int = 20
    phase2_epochs: int = 20
    qat_lr: float = 2e-3
    penalty: float = 1.0


# palette -> (levels, budget in bits per weight); both budgets are >= 8x below fp32
PALETTES = {"{2,8}": ((2, 8), 3.5), "{1,4}": ((1, 4), 3.0)}


def run_seed(seed: int, data, recipe: Recipe = Recipe(), palettes=PALETTES, export_dir=None,
             act_scales=("group",)):
    """fp32 then one QAT run per palette (and activation step layout), all from the
    same fp32 model. Returns ``{name: {"acc", "bits", "compression"}}``."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    fp32 = make_cnn()
    train(fp32, xtr, ytr, epochs=recipe.fp32_epochs, lr=recipe.fp32_lr, seed=seed)
    results = {"fp32": {"acc": accuracy(fp32, xte, yte), "bits": 32.0, "compression": 1.0}}
    runs = [(name, palette, target, layout) for name, (palette, target) in palettes.items() for layout in act_scales]
    for name, palette, target, layout in runs:
        if len(act_scales) > 1:
            name = f"{name} steps/{layout}"
        torch.manual_seed(seed)
        q = prepare(fp32.eval(), palette=palette, target_bits=target, penalty=recipe.penalty, act_scales=layout)
        train(q, xtr, ytr, epochs=recipe.phase1_epochs, lr=recipe.qat_lr, seed=seed, penalty=True)
        snap(q)
        train(q, xtr, ytr, epochs=recipe.phase2_epochs, lr=recipe.qat_lr, seed=seed + 1)
        bits = average_bits(q)
        results[name] = {"acc": accuracy(q, xte, yte), "bits": bits, "compression": 32.0 / bits,
                         "report": bit_report(q)}
        if export_dir is not None:
            _export_and_check(q, xte, f"{export_dir}/digits_{palette[0]}_{palette[1]}_{layout}_s{seed}.onnx")
    return results


def _export_and_check(q, xte, path):
    import os

    import onnxruntime as ort

    os.makedirs(os.path.dirname(path), exist_ok=True)
    export_onnx(q, xte, path)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    y_ort = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"x": xte.numpy()})[0]
    q.eval()
    with torch.no_grad():
        y_pt = q(xte).numpy()
    same = float((y_ort.argmax(1) == y_pt.argmax(1)).mean())
    print(f"  exported {path}: ORT vs PyTorch same prediction {same * 100:.2f}%, "
          f"max |diff| {np.abs(y_ort - y_pt).max():.2e}")


# ---- the attention path: a tiny transformer on a task generated in code ------------
SEQ, VOCAB = 8, 8


def pointer_data(n: int, seed: int):
    """Pointer retrieval: ``SEQ`` random tokens; token 0 holds a position ``p`` in
    ``1..SEQ-1`` and the label is the token at ``p``. Inputs are one-hot token and
    one-hot position features ``[n, SEQ, VOCAB + SEQ]``; solving it needs attention
    from position 0 to position ``p`` (chance: 1/8)."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    p = torch.randint(1, SEQ, (n,), generator=g)
    tok[:, 0] = p
    y = tok[torch.arange(n), p]
    x = torch.cat([F.one_hot(tok, VOCAB).float(), torch.eye(SEQ).expand(n, SEQ, SEQ)], -1)
    return x, y


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.dk = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, t, d = x.shape
        split = lambda z: z.view(b, t, self.heads, self.dk).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = self.softmax(torch.matmul(q, k.transpose(-2, -1)) / self.dk ** 0.5)
        return self.o(torch.matmul(a, v).transpose(1, 2).reshape(b, t, d))


class TinyTransformer(nn.Module):
    """One pre-LN encoder block (2 heads, GELU MLP) and a linear head on token 0."""

    def __init__(self, d: int = 32, heads: int = 2):
        super().__init__()
        self.embed = nn.Linear(VOCAB + SEQ, d)
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads)
        self.ln2, self.ff1, self.gelu, self.ff2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(self.ln1(h))
        h = h + self.ff2(self.gelu(self.ff1(self.ln2(h))))
        return self.head(self.ln(h)[:, 0])


def run_transformer(seed: int = 0, n_train: int = 4000, fp32_epochs: int = 40, qat_epochs: int = 15,
                    palette=(2, 8), target_bits: float = 3.5):
    """fp32 then SONIQ QAT of :class:`TinyTransformer` on :func:`pointer_data`.
    Returns ``(fp32 model, qat model, {"fp32": acc, "qat": acc, "bits": avg})``;
    the attention matmuls run as QMatMul at the palette's top width."""
    xtr, ytr = pointer_data(n_train, seed)
    xte, yte = pointer_data(1000, 10_000 + seed)
    torch.manual_seed(seed)
    fp32 = TinyTransformer()
    train(fp32, xtr, ytr, epochs=fp32_epochs, lr=3e-3, seed=seed, batch=128)
    q = prepare(fp32.eval(), palette=palette, target_bits=target_bits)
    train(q, xtr, ytr, epochs=qat_epochs, lr=1e-3, seed=seed, penalty=True, batch=128)
    snap(q)
    train(q, xtr, ytr, epochs=qat_epochs, lr=1e-3, seed=seed + 1, batch=128)
    return fp32, q, {"fp32": accuracy(fp32, xte, yte), "qat": accuracy(q, xte, yte), "bits": average_bits(q),
                     "x_test": xte}


def table(all_results: list[dict]) -> str:
    names = list(all_results[0])
    lines = ["| model | test accuracy (mean ± std) | per seed | bits / weight | compression vs fp32 |",
             "| --- | --- | --- | --- | --- |"]
    for name in names:
        accs = np.array([r[name]["acc"] for r in all_results]) * 100
        bits = np.array([r[name]["bits"] for r in all_results])
        comp = np.array([r[name]["compression"] for r in all_results])
        per = ", ".join(f"{a:.2f}" for a in accs)
        bits_s = "32" if name == "fp32" else f"{bits.mean():.2f} ({bits.min():.2f}–{bits.max():.2f})"
        comp_s = "1x" if name == "fp32" else f"{comp.mean():.1f}x"
        lines.append(f"| {name} | {accs.mean():.2f} ± {accs.std(ddof=1) if len(accs) > 1 else 0:.2f} % "
                     f"| {per} | {bits_s} | {comp_s} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--export", default=None, help="folder to export the QAT models to (checks ORT)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is as fast for a model this small, and steadier)")
    ap.add_argument("--no-transformer", action="store_true", help="skip the attention demo")
    ap.add_argument("--act-scales", nargs="+", default=["group"], choices=["group", "tensor"],
                    help="activation step layouts to train (one step per precision group: the default)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits_split()
    print(f"digits: {len(data[0])} train / {len(data[2])} test images, split seed {SPLIT_SEED}")
    all_results = []
    for seed in args.seeds:
        t0 = time.time()
        r = run_seed(seed, data, export_dir=args.export, act_scales=tuple(args.act_scales))
        all_results.append(r)
        accs = ", ".join(f"{k} {v['acc'] * 100:.2f}% @ {v['bits']:.2f}b" for k, v in r.items())
        print(f"seed {seed} ({time.time() - t0:.0f} s): {accs}")
    print()
    print(table(all_results))
    if not args.no_transformer:
        t0 = time.time()
        _, q, r = run_transformer()
        print(f"\ntransformer, pointer task ({time.time() - t0:.0f} s): fp32 {r['fp32'] * 100:.2f}%, "
              f"SONIQ {{2,8}} {r['qat'] * 100:.2f}% at {r['bits']:.2f} bits/weight")
        if args.export:
            _export_and_check(q, r["x_test"][:64], f"{args.export}/pointer_transformer.onnx")
    return all_results


if __name__ == "__main__":
    main()
