"""What several test modules share: tiny jittered models of the real architectures, an independent
plainly written forward (the reference for the decomposition, hooks and interventions), a local
OpenAI-compatible chat server, WebDataset tars and a tiny tokenizer. Fixtures are in conftest.py."""

import io
import json
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from clip_interpret.toyworld import generate

BROKEN = b"\xff\xd8\xff\xe0 not really a jpeg"


def jitter(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter: fresh inits have unit LayerNorm gains, zero biases and
    constant LayerScale, which would hide a dropped bias or gain."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module


def make_open_clip(arch: str, seed: int = 0, **kwargs):
    import open_clip

    from clip_interpret.models.loader import registered_open_clip

    registered_open_clip()  # registers the package's test-* configs
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None, pretrained_text=False, pretrained_image=False, **kwargs)
    return jitter(model.eval(), seed=seed)


def make_hf_siglip(seed: int = 0, version: int = 1):
    """A jittered random Hugging Face SiglipModel (or Siglip2Model): 3 layers x 3 heads, width 48, 32x32
    images in 8x8 patches (SigLIP 2: a 4x4 grid of position embeddings)."""
    import transformers

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_size=48,
                max_position_embeddings=16, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3, patch_size=8)
    vision.update(image_size=32) if version == 1 else vision.update(num_patches=16)
    config, model = (("SiglipConfig", "SiglipModel") if version == 1 else ("Siglip2Config", "Siglip2Model"))
    torch.manual_seed(seed)
    cfg = getattr(transformers, config)(text_config=text, vision_config=vision)
    return jitter(getattr(transformers, model)(cfg).eval(), seed=seed)


def make_hf_clip(seed: int = 0, act: str = "quick_gelu", image_size: int = 64, patch: int = 16):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=49408, hidden_act=act),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                           image_size=image_size, patch_size=patch, hidden_act=act),
        projection_dim=24,
    )
    torch.manual_seed(seed)
    return jitter(CLIPModel(cfg).eval(), seed=seed)


@torch.no_grad()
def explicit_forward(vit, pixels, hook=None):
    """An independent, plainly written forward of a HookedViT (full attention matrices, no
    shortcut): the reference for the decomposition, the hooks and the interventions.
    ``hook(name, value)`` may replace ``attn.hook_z`` [B, H, T, d], ``hook_attn_out`` and
    ``hook_mlp_out`` of any block, and in an attention-pooled tower ``ln_post.hook_normalized``,
    ``pool.hook_z`` and ``pool.hook_mlp_out`` (names as the HookedViT's), in a CoCa tower
    ``ln_post.hook_normalized``, ``pool.hook_z`` and ``pool.hook_attn_out``. An average-pooled tower
    (CLIPA) takes the mean of the patch rows (not the CLS row), then LN_post. EVA02's pieces are
    written out here too: rotary q/k (``rope_by_hand``), a LayerNorm over the concatenated heads, SwiGLU
    with its sub-LN, post-norm blocks (no pre-norms; a LayerNorm on each branch's output)."""
    hook = hook or (lambda name, value: value)
    cfg = vit.cfg
    x = vit.embed(pixels)
    cache = {"hook_embed": x}
    for index, block in enumerate(vit.blocks):
        name = f"blocks.{index}"
        cache[f"{name}.hook_resid_pre"] = x
        post_norm = getattr(cfg, "post_norm", False)  # EVA02-E: no pre-norms, a LayerNorm on each branch's output
        h = x if post_norm else torch.nn.functional.layer_norm(x, (cfg.width,), block.ln1.weight, block.ln1.bias,
                                                               cfg.ln_eps)
        q, k, v = (h @ block.qkv.weight.T + block.qkv.bias).split(cfg.width, dim=-1)
        q, k, v = (t.view(*t.shape[:2], cfg.heads, cfg.head_dim).transpose(1, 2) for t in (q, k, v))
        if getattr(vit, "rope_table", None) is not None:
            q, k = rope_by_hand(q, vit.rope_table, cfg.rope, cfg.rope_prefix), \
                rope_by_hand(k, vit.rope_table, cfg.rope, cfg.rope_prefix)
            cache[f"{name}.attn.hook_q_rot"], cache[f"{name}.attn.hook_k_rot"] = q, k
        pattern = torch.softmax(q @ k.transpose(-1, -2) / cfg.head_dim ** 0.5, dim=-1)
        z = hook(f"{name}.attn.hook_z", pattern @ v)
        cache[f"{name}.attn.hook_v"], cache[f"{name}.attn.hook_pattern"], cache[f"{name}.attn.hook_z"] = v, pattern, z
        merged = z.transpose(1, 2).reshape(*x.shape)
        if getattr(cfg, "attn_ln", False):  # EVA02: a LayerNorm over the concatenated heads
            merged = _ln_by_hand(merged, block.ln_inner, cfg.ln_eps)
            cache[f"{name}.attn.ln.hook_scale"] = torch.sqrt(z.transpose(1, 2).reshape(*x.shape).var(
                dim=-1, unbiased=False) + cfg.ln_eps)
        attn = merged @ block.out.weight.T + block.out.bias
        if post_norm:
            cache[f"{name}.ln1_post.hook_scale"] = torch.sqrt(attn.var(dim=-1, unbiased=False) + cfg.ln_eps)
            attn = _ln_by_hand(attn, block.ln1_post, cfg.ln_eps)
        attn = hook(f"{name}.hook_attn_out", attn * block.ls1 if block.ls1 is not None else attn)
        cache[f"{name}.hook_attn_out"] = attn
        x = x + attn
        h2 = x if post_norm else torch.nn.functional.layer_norm(x, (cfg.width,), block.ln2.weight, block.ln2.bias,
                                                                cfg.ln_eps)
        pre = h2 @ block.fc1.weight.T + block.fc1.bias
        if getattr(cfg, "glu", False):  # SwiGLU: the first half gates the second
            hidden = torch.nn.functional.silu(pre[..., :cfg.mlp_width]) * pre[..., cfg.mlp_width:]
        else:
            hidden = vit._act(pre)
        if getattr(cfg, "mlp_ln", False):  # EVA02's sub-LN
            hidden = _ln_by_hand(hidden, block.mlp_ln, cfg.ln_eps)
        mlp = hidden @ block.fc2.weight.T + block.fc2.bias
        if post_norm:
            mlp = _ln_by_hand(mlp, block.ln2_post, cfg.ln_eps)
        mlp = hook(f"{name}.hook_mlp_out", mlp * block.ls2 if block.ls2 is not None else mlp)
        cache[f"{name}.hook_mlp_out"] = mlp
        x = x + mlp
        cache[f"{name}.hook_resid_post"] = x
    if vit.cfg.pool == "attn-pool":
        return explicit_multi_query_pool(vit, x, hook, cache)
    if vit.pool is not None:
        return _explicit_pool(vit, x, hook, cache)
    r = x[:, 0] if cfg.pool == "cls" else x[:, 1:].sum(dim=1) / (x.shape[1] - 1)  # "avg": the patches' mean
    cache["ln_post.hook_scale"] = torch.sqrt(r.var(dim=-1, unbiased=False) + cfg.ln_eps)
    emb = torch.nn.functional.layer_norm(r, (cfg.width,), vit.ln_post.weight, vit.ln_post.bias, cfg.ln_eps) @ vit.proj
    if getattr(vit, "proj_bias", None) is not None:  # EVA01's head: a Linear with a bias
        emb = emb + vit.proj_bias
    cache["hook_image_embed"] = emb
    return emb, cache


def _ln_by_hand(x, ln, eps):
    """A LayerNorm over the last dimension, written out."""
    centred = x - x.mean(dim=-1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(dim=-1, keepdim=True) + eps) * ln.weight + ln.bias


def rope_by_hand(x, table, mode, prefix):
    """Rotary embeddings written as complex multiplication: each rotating pair (a, b) of a head's
    vector at stream position prefix + p is the complex number a + ib, times exp(i theta), with
    sin theta, cos theta read from ``table[p]`` ([sines | cosines]); pairs are (2j, 2j+1)
    ("interleaved") or (j, j + d/2) ("half"). The first ``prefix`` positions are left alone."""
    d = x.shape[-1]
    sin, cos = table[:, :d], table[:, d:]
    if mode == "interleaved":
        a, b, s, c = x[..., 0::2], x[..., 1::2], sin[:, 0::2], cos[:, 0::2]
    else:
        a, b, s, c = x[..., :d // 2], x[..., d // 2:], sin[:, :d // 2], cos[:, :d // 2]
    a, b = a[..., prefix:, :], b[..., prefix:, :]
    turned = torch.complex(a, b) * torch.complex(c, s)
    if mode == "interleaved":
        rotated = torch.stack([turned.real, turned.imag], dim=-1).flatten(-2)
    else:
        rotated = torch.cat([turned.real, turned.imag], dim=-1)
    return torch.cat([x[..., :prefix, :], rotated], dim=-2)


def _explicit_pool(vit, x, hook, cache):
    """The attention-pooling (MAP) head written out: LN_post of every token, one query, its MLP."""
    cfg, pool = vit.cfg, vit.pool
    w, n_heads = cfg.width, cfg.pool_heads
    d = w // n_heads
    cache["ln_post.hook_scale"] = torch.sqrt(x.var(dim=-1, unbiased=False) + cfg.ln_eps)
    normed = hook("ln_post.hook_normalized", torch.nn.functional.layer_norm(
        x, (w,), vit.ln_post.weight, vit.ln_post.bias, cfg.ln_eps))
    query = pool.query @ pool.q.weight.T + pool.q.bias
    keys = normed @ pool.kv.weight[:w].T + pool.kv.bias[:w]
    values = normed @ pool.kv.weight[w:].T + pool.kv.bias[w:]
    patterns, results = [], []
    for h in range(n_heads):
        part = slice(h * d, (h + 1) * d)
        pattern = torch.softmax(keys[..., part] @ query[part] / d ** 0.5, dim=-1)  # [B, T]
        patterns.append(pattern)
        results.append((pattern[..., None] * values[..., part]).sum(dim=1))  # [B, d]
    pattern = torch.stack(patterns, dim=1)[:, :, None]  # [B, Hp, 1, T]
    z = hook("pool.hook_z", torch.stack(results, dim=1)[:, :, None])  # [B, Hp, 1, d]
    cache["pool.hook_pattern"], cache["pool.hook_z"] = pattern, z
    cache["pool.hook_v"] = values.view(*values.shape[:2], n_heads, d).transpose(1, 2)
    y = z[:, :, 0].reshape(z.shape[0], w) @ pool.out.weight.T + pool.out.bias
    cache["pool.hook_attn_out"] = y
    h2 = torch.nn.functional.layer_norm(y, (w,), pool.ln.weight, pool.ln.bias, cfg.ln_eps)
    mlp = hook("pool.hook_mlp_out", vit._act(h2 @ pool.fc1.weight.T + pool.fc1.bias) @ pool.fc2.weight.T + pool.fc2.bias)
    cache["pool.hook_mlp_out"] = mlp
    emb = y + mlp
    emb = emb @ vit.proj if vit.proj is not None else emb
    if getattr(vit, "proj_bias", None) is not None:  # PE-Core's head: the trunk's Linear, with a bias
        emb = emb + vit.proj_bias
    cache["hook_image_embed"] = emb
    return emb, cache


def explicit_multi_query_pool(vit, x, hook, cache):
    """CoCa's attentional pooler written out for its first query: LN_k of every token, LN_q of the query,
    each pooler head's softmax over the tokens, the output projection, the LayerNorm of the pooled row, P."""
    cfg, pool = vit.cfg, vit.pool
    e, n_heads = cfg.pool_width, cfg.pool_heads
    d = e // n_heads
    ln = torch.nn.functional.layer_norm
    normed = hook("ln_post.hook_normalized", ln(x, (cfg.width,), vit.ln_post.weight, vit.ln_post.bias, cfg.ln_eps))
    query = ln(pool.query, (e,), pool.ln_q.weight, pool.ln_q.bias, cfg.ln_eps) @ pool.q.weight.T + pool.q.bias
    keys = normed @ pool.kv.weight[:e].T + pool.kv.bias[:e]
    values = normed @ pool.kv.weight[e:].T + pool.kv.bias[e:]
    patterns, results = [], []
    for h in range(n_heads):
        part = slice(h * d, (h + 1) * d)
        pattern = torch.softmax(keys[..., part] @ query[part] / d ** 0.5, dim=-1)  # [B, T]
        patterns.append(pattern)
        results.append((pattern[..., None] * values[..., part]).sum(dim=1))  # [B, d]
    z = hook("pool.hook_z", torch.stack(results, dim=1)[:, :, None])  # [B, Hp, 1, d]
    cache["pool.hook_pattern"], cache["pool.hook_z"] = torch.stack(patterns, dim=1)[:, :, None], z
    cache["pool.hook_v"] = values.view(*values.shape[:2], n_heads, d).transpose(1, 2)
    y = hook("pool.hook_attn_out", z[:, :, 0].reshape(z.shape[0], e) @ pool.out.weight.T + pool.out.bias)
    cache["pool.hook_attn_out"] = y
    cache["pool.ln.hook_scale"] = torch.sqrt(y.var(dim=-1, unbiased=False) + cfg.ln_eps)
    emb = ln(y, (e,), pool.ln.weight, pool.ln.bias, cfg.ln_eps) @ vit.proj
    cache["hook_image_embed"] = emb
    return emb, cache


class ChatServer:
    """Answers POST /v1/chat/completions with ``script(request, n)``: a dict (JSON reply content),
    a string (raw content), ("status", code), or ("sleep", seconds, content)."""

    def __init__(self, script):
        self.script = script
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                if self.path != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                action = outer.script(body, len(outer.requests))
                if isinstance(action, tuple) and action[0] == "status":
                    self.send_response(action[1])
                    self.end_headers()
                    return
                if isinstance(action, tuple) and action[0] == "sleep":
                    time.sleep(action[1])
                    action = action[2]
                content = action if isinstance(action, str) else json.dumps(action)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def toy_png(i: int) -> bytes:
    buffer = io.BytesIO()
    generate(i, seed=5).image.save(buffer, format="PNG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tars(folder, n_tars: int = 3, per_tar: int = 4, broken: int | None = 5) -> list[int]:
    """WebDataset shards shard-0.tar ...: per sample KEY.png (KEY.jpg broken), KEY.cls, KEY.json and a
    caption KEY.txt; returns the toy image number of each sample, in order."""
    numbers = []
    for t in range(n_tars):
        with tarfile.open(folder / f"shard-{t}.tar", "w") as tar:
            for j in range(per_tar):
                i = t * per_tar + j
                key = f"sample{i:04d}"
                if i == broken:
                    add_member(tar, f"{key}.jpg", BROKEN)
                else:
                    add_member(tar, f"{key}.png", toy_png(i))
                add_member(tar, f"{key}.cls", str(i % 2).encode())
                add_member(tar, f"{key}.json", json.dumps({"color": ["red", "blue", "green"][i % 3], "id": i}).encode())
                add_member(tar, f"{key}.txt", f"caption number {i}".encode())
                numbers.append(i)
    return numbers


def tiny_tokenizer(folder=None, extra: int = 0):
    """A word-level Hugging Face tokenizer of 69 ids (a stand-in for SigLIP's SentencePiece one);
    ``extra`` more words make its vocabulary that much larger."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "</s>"] + [f"w{i}" for i in range(50)] + \
        "a an the photo of dog cat red blue green square circle big small striped dotted".split() + \
        [f"x{i}" for i in range(extra)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    if folder is not None:
        fast.save_pretrained(folder)
    return fast
