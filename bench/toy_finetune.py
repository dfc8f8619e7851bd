"""Fine-tune the toy CLIP v1 on the CPU and watch every property (the experiments of
docs/toy-model.md, "Why a property is not learned"); a scratch tool, not the training recipe.

    PYTHONPATH=src python bench/toy_finetune.py steps=300 hard=0.5 nfree=2 group=16 lr=3e-4
    PYTHONPATH=src python bench/toy_finetune.py steps=400 hard=0.75 nfree=1 group=8 lr=5e-4
    PYTHONPATH=src python bench/toy_finetune.py steps=400 hard=0 pw=1.0 lr=5e-4 every=50
    PYTHONPATH=src python bench/toy_finetune.py steps=400 init=random hard=0.5 group=8 nfree=1 pw=1 lr=5e-4

v1 is no longer the bundled model (v2 is, since 2026-12-06): init=v1 reads v1's weights from git history
(`git show 0786aa2:src/clip_interpret/toyworld/weights/toy.safetensors > /tmp/v1.safetensors`), path v1=FILE.

key=value options: steps, lr, bs (batch, 128), hard (share of the batch in contrast groups), group,
nfree (free properties per group, from hardp=shape,size,count,position), pw (weight of a per-property
cross-entropy against one phrase per value, from the world's caption vocabulary), init (v1 or random),
every (evaluate every N steps on 500 held-out images), out (where the weights go).
"""
import json
import math
import sys
import time

import numpy as np
import torch

from clip_interpret.toyworld import train as T
from clip_interpret.toyworld.world import PROPERTIES, generate
from clip_interpret.toyworld.evaluate import class_prompts
from clip_interpret.models.loader import open_clip_preprocess, registered_open_clip
from safetensors.torch import load_file
from clip_interpret.toyworld import world as W
torch.set_num_threads(2)
args = dict(a.split("=") for a in sys.argv[1:])
lr = float(args.get("lr", 3e-4)); steps = int(args.get("steps", 1000)); group = int(args.get("group", 16))
share = args.get("share", "color,background,pattern").split(",")
hard = float(args.get("hard", 1.0)); init = args.get("init", "v1"); bs = int(args.get("bs", 128))
cfg = T.TrainConfig()
model = T.build_model(cfg)
if init == "v1":
    sd = load_file(args.get("v1", "/tmp/v1.safetensors"))
    model.load_state_dict({k: v.float() for k, v in sd.items()})
oc = registered_open_clip()
ctx = model.context_length
tok = oc.tokenizer.SimpleTokenizer(context_length=ctx)
pre = open_clip_preprocess(model, model.visual.image_size)
# eval set
ev = [generate(i, 1) for i in range(500)]
evpix = pre.batch([e.image for e in ev])
evlab = {p: np.array([PROPERTIES[p].index(e.attributes[p]) for e in ev]) for p in PROPERTIES}
evcap = tok([e.caption for e in ev], context_length=ctx)
def evaluate():
    model.eval()
    with torch.no_grad():
        im = model.encode_image(evpix, normalize=True)
        out = {}
        for p in PROPERTIES:
            rows = []
            for prompts in class_prompts(p):
                e = model.encode_text(tok(prompts, context_length=ctx), normalize=True).mean(0)
                rows.append(e / e.norm())
            out[p] = float(((im @ torch.stack(rows).T).argmax(1).numpy() == evlab[p]).mean())
        tx = model.encode_text(evcap, normalize=True)
        s = im @ tx.T
        out["r@1"] = float(((s > s.diag()[:, None]).sum(1) < 1).float().mean())
    model.train()
    return out
rng = np.random.default_rng(123)
HARDP = args.get("hardp", "shape,size,count,position").split(",")
nfree = int(args.get("nfree", 2))
def attrs(size):
    out = []
    n_hard = int(round(size * hard / group)) * group
    for first in range(0, n_hard, group):
        free = [HARDP[k] for k in rng.choice(len(HARDP), nfree, replace=False)]
        fixed = {p: PROPERTIES[p][int(rng.integers(len(PROPERTIES[p])))] for p in PROPERTIES if p not in free}
        out += [(fixed, free)] * group
    out += [({}, ())] * (size - n_hard)
    return out
decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
nod = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": nod, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
PW = float(args.get("pw", 0.0))
VOCAB = {
    "shape": lambda v: [f"a {w}" for w in W.SHAPE_WORDS[v]],
    "color": lambda v: [f"a {w} {g}" for w in W.COLOR_WORDS[v] for g in ("shape", "object")],
    "size": lambda v: [f"a {w} {g}" for w in W.SIZE_WORDS[v] for g in ("shape", "object")],
    "count": lambda v: [f"{w} {'object' if v == '1' else 'objects'}" for w in W.COUNT_WORDS[int(v)]],
    "position": lambda v: [f"an object {w}" for w in W.POSITION_WORDS[v]],
    "background": lambda v: [f"on a {w} background" for w in W.BACKGROUND_WORDS[v]],
    "pattern": lambda v: [f"on a {w} background" for w in W.PATTERN_WORDS[v]],
}
prng = np.random.default_rng(7)
def prop_loss(i_f, attrs_list, ls):
    total = 0.0
    for p, values in PROPERTIES.items():
        texts = [VOCAB[p](v)[int(prng.integers(len(VOCAB[p](v))))] for v in values]
        t = model.encode_text(tok(texts, context_length=ctx), normalize=True)
        y = torch.tensor([values.index(a[p]) for a in attrs_list])
        total = total + torch.nn.functional.cross_entropy(ls * i_f @ t.T, y)
    return total / len(PROPERTIES)
print("init", json.dumps(evaluate()), flush=True)
t0 = time.time(); idx = 10_000_000; hist = []
for step in range(steps):
    w = min(1, (step + 1) / 50)
    cur = w * (2e-5 + 0.5 * (lr - 2e-5) * (1 + math.cos(math.pi * step / steps)))
    for g in opt.param_groups: g["lr"] = cur
    imgs, caps, alist = [], [], []
    for a, m in attrs(bs):
        it = generate(idx, 0, attributes=a, mention=m); idx += 1
        imgs.append(it.image); caps.append(it.caption); alist.append(it.attributes)
    px = pre.batch(imgs); tk = tok(caps, context_length=ctx)
    i_f, t_f, ls = model(px, tk)[:3]
    loss = T.contrastive_loss(i_f, t_f, ls)
    if PW > 0:
        loss = loss + PW * prop_loss(i_f, alist, ls)
    opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(): model.logit_scale.clamp_(0, math.log(100))
    hist.append(float(loss.detach()))
    if (step + 1) % int(args.get("every", 100)) == 0:
        print(step + 1, f"{time.time()-t0:.0f}s loss {np.mean(hist[-100:]):.3f}", json.dumps({k: round(v, 3) for k, v in evaluate().items()}), flush=True)
from pathlib import Path
out = Path(args.get("out", "bench/results/toy-finetune.pt"))
out.parent.mkdir(parents=True, exist_ok=True)
torch.save(model.state_dict(), out)
print("wrote", out)
