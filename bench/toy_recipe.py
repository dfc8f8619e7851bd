"""What makes every toy-world property learnable on 2 CPU cores: the image tower alone, trained
for a fixed wall time with one linear classifier per property on its embedding, evaluated on
1,000 held-out images (world seed 1) every minute. The experiments behind the v2 recipe
(docs/toy-model.md, "How v2 was found"); a measuring tool, not the training recipe.

    python bench/toy_recipe.py                          # v1's tower: patch 8, width 128, 6 layers
    python bench/toy_recipe.py patch=16                 # patch 16 (4x4 grid): the v2 tower
    python bench/toy_recipe.py patch=4 width=64 hw=16   # finer patches, narrower to keep the cost
    python bench/toy_recipe.py lr=2e-3                  # another learning rate
    python bench/toy_recipe.py patch=16 dense=1         # + a per-patch shape loss on the last tokens
    git show 0786aa2:src/clip_interpret/toyworld/weights/toy.safetensors > /tmp/v1.safetensors
    python bench/toy_recipe.py init=/tmp/v1.safetensors # start from v1's image tower (v1 is no longer bundled)

key=value options: patch, width, layers, hw (head width), lr (1e-3), bs (128), min (wall minutes, 5),
every (minutes between evaluations, 1), pool (training images, generated once with their masks and
cached in /tmp; 60,000), dense (weight of the per-patch shape loss: each patch token classified as
background or the shape of the object covering >= 25% of it), init (random, or a .safetensors file of a
toy CLIP whose tower has the same shape).
"""
import json
import os
import sys
import time
from multiprocessing import Pool

import numpy as np
import torch
import torch.nn.functional as F

from clip_interpret.toyworld.world import PROPERTIES, generate

PROPS = list(PROPERTIES)
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # open_clip's (OpenAI) constants
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def _make(job):
    seed, lo, hi = job
    images, labels, masks = [], [], []
    for i in range(lo, hi):
        item = generate(i, seed)
        images.append(np.asarray(item.image))
        labels.append([PROPERTIES[p].index(item.attributes[p]) for p in PROPS])
        masks.append(item.masks.any(0))
    return np.stack(images), np.array(labels), np.packbits(np.stack(masks), axis=-1)


def world(seed: int, n: int):
    """(uint8 images [n, 64, 64, 3], labels [n, 7], packed object masks) of world ``seed``, cached."""
    path = f"/tmp/toy_recipe_{seed}_{n}.npz"
    if os.path.exists(path):
        data = np.load(path)
        return data["x"], data["y"], data["m"]
    with Pool(os.cpu_count()) as pool:
        parts = pool.map(_make, [(seed, s, min(n, s + 2000)) for s in range(0, n, 2000)])
    x, y, m = (np.concatenate([p[k] for p in parts]) for k in range(3))
    np.savez(path, x=x, y=y, m=m)
    return x, y, m


def pixels(x):
    return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


def main():
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    torch.set_num_threads(os.cpu_count())
    a = dict(arg.split("=", 1) for arg in sys.argv[1:])
    patch, width, layers = int(a.get("patch", 8)), int(a.get("width", 128)), int(a.get("layers", 6))
    hw, lr, bs = int(a.get("hw", width // 8)), float(a.get("lr", 1e-3)), int(a.get("bs", 128))
    minutes, every, dense = float(a.get("min", 5)), float(a.get("every", 1)), float(a.get("dense", 0))
    x_train, y_train, m_train = world(0, int(a.get("pool", 60000)))
    x_test, y_test, _ = world(1, 1000)
    torch.manual_seed(0)
    tower = _build_vision_tower(128, CLIPVisionCfg(image_size=64, layers=layers, width=width, head_width=hw,
                                                   patch_size=patch))
    if a.get("init", "random") != "random":
        from safetensors.torch import load_file

        state = load_file(a["init"])
        tower.load_state_dict({k[7:]: v.float() for k, v in state.items() if k.startswith("visual.")})
    tower.output_tokens = dense > 0
    sizes = [len(PROPERTIES[p]) for p in PROPS]
    probes = torch.nn.Linear(128, sum(sizes))
    patch_head = torch.nn.Linear(width, len(PROPERTIES["shape"]) + 1)
    params = [*tower.parameters(), *probes.parameters(), *patch_head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    grid = 64 // patch

    def patch_targets(packed, shape):
        cover = np.unpackbits(packed, axis=-1)[..., :64].reshape(len(packed), grid, patch, grid, patch).mean((2, 4))
        cover = torch.from_numpy(cover.reshape(len(packed), -1))
        return torch.where(cover >= 0.25, (shape + 1)[:, None].expand_as(cover), torch.zeros_like(cover).long())

    test_pixels, test_labels = pixels(x_test), torch.from_numpy(y_test)
    print(json.dumps(a), f"tower parameters {sum(p.numel() for p in tower.parameters()):,}", flush=True)
    rng = np.random.default_rng(0)
    start, seen, step, next_eval = time.time(), 0, 0, every * 60
    while True:
        rows = rng.integers(0, len(x_train), bs)
        labels = torch.from_numpy(y_train[rows])
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        out = tower(pixels(x_train[rows]))
        emb, tokens = out if dense > 0 else (out, None)
        logits = probes(emb).split(sizes, dim=1)
        loss = sum(F.cross_entropy(lg, labels[:, k]) for k, lg in enumerate(logits))
        if dense > 0:
            target = patch_targets(m_train[rows], labels[:, 0])
            loss = loss + dense * F.cross_entropy(patch_head(tokens).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen, step = seen + bs, step + 1
        elapsed = time.time() - start
        if elapsed >= next_eval or elapsed >= minutes * 60:
            tower.eval()
            with torch.no_grad():
                emb = torch.cat([(lambda o: o[0] if dense > 0 else o)(tower(test_pixels[i:i + 250]))
                                 for i in range(0, len(test_pixels), 250)])
                logits = probes(emb).split(sizes, dim=1)
                acc = [float((lg.argmax(1) == test_labels[:, k]).float().mean()) for k, lg in enumerate(logits)]
            tower.train()
            print(f"{elapsed / 60:5.1f} min {seen:8,d} images  " +
                  "  ".join(f"{p} {v:6.1%}" for p, v in zip(PROPS, acc)), flush=True)
            next_eval += every * 60
            if elapsed >= minutes * 60:
                break


if __name__ == "__main__":
    main()
