#!/usr/bin/python3
"""Independent float64 numpy reference of the mpilm GPT-2 model (DESIGN.md s.4).

Usage: gpt_ref.py IN.bin OUT.bin

IN.bin (little-endian): int32 n_layer, n_head, n_embd C, block_size Tmax,
vocab_size V, B, T; int32 tokens[B*T]; int32 targets[B*T]; float32 parameters
in param_specs() order.
OUT.bin: float64 logits [B,T,V]; float64 mean loss; float64 gradients of the
mean loss for every parameter, same order and shapes as in IN.bin.

Forward and backward are written by hand (no autograd); the self-check
tests/ref/test_gpt_ref_selfcheck.py verifies the gradients by finite differences.
"""
import sys
import numpy as np

EPS = 1e-5                      # LayerNorm eps
GELU_S = np.sqrt(2.0 / np.pi)   # GELU tanh-approximation constant
HEADER = 7                      # int32 header fields


def param_specs(L, C, Tmax, V):
    """[(name, shape)] in file order."""
    s = [("wte", (V, C)), ("wpe", (Tmax, C))]
    for l in range(L):
        p = "h.%d." % l
        s += [(p + "ln_1.weight", (C,)), (p + "ln_1.bias", (C,)),
              (p + "attn.qkv.weight", (3 * C, C)), (p + "attn.qkv.bias", (3 * C,)),
              (p + "attn.proj.weight", (C, C)), (p + "attn.proj.bias", (C,)),
              (p + "ln_2.weight", (C,)), (p + "ln_2.bias", (C,)),
              (p + "mlp.fc.weight", (4 * C, C)), (p + "mlp.fc.bias", (4 * C,)),
              (p + "mlp.proj.weight", (C, 4 * C)), (p + "mlp.proj.bias", (C,))]
    s += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    return s


# ---------------------------------------------------------------- layers
def ln_fwd(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)      # biased variance
    rstd = 1.0 / np.sqrt(var + EPS)
    xh = (x - mu) * rstd
    return xh * w + b, (xh, rstd, w)


def ln_bwd(dy, cache):
    xh, rstd, w = cache
    dw = (dy * xh).reshape(-1, xh.shape[-1]).sum(0)
    db = dy.reshape(-1, xh.shape[-1]).sum(0)
    dxh = dy * w
    dx = rstd * (dxh - dxh.mean(-1, keepdims=True)
                 - xh * (dxh * xh).mean(-1, keepdims=True))
    return dx, dw, db


def lin_fwd(x, W, b):               # W is [out, in]
    return x @ W.T + b, x


def lin_bwd(dy, x, W):
    C_in, C_out = W.shape[1], W.shape[0]
    dW = dy.reshape(-1, C_out).T @ x.reshape(-1, C_in)
    return dy @ W, dW, dy.reshape(-1, C_out).sum(0)


def gelu_fwd(x):
    t = np.tanh(GELU_S * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_bwd(dy, cache):
    x, t = cache
    du = GELU_S * (1.0 + 3 * 0.044715 * x ** 2)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t ** 2) * du)


def attn_fwd(qkv, nh):
    """qkv [B,T,3C] -> y [B,T,C]; causal softmax attention, scale 1/sqrt(hs)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // nh
    # [B,T,3,nh,hs] -> 3 x [B,nh,T,hs]
    q, k, v = qkv.reshape(B, T, 3, nh, hs).transpose(2, 0, 3, 1, 4)
    scale = 1.0 / np.sqrt(hs)
    s = (q @ k.transpose(0, 1, 3, 2)) * scale                      # [B,nh,T,T]
    mask = np.triu(np.ones((T, T), dtype=bool), 1)                  # future keys
    s = np.where(mask, -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, C)              # heads concat
    return y, (q, k, v, p, scale)


def attn_bwd(dy, cache):
    q, k, v, p, scale = cache
    B, nh, T, hs = q.shape
    dy = dy.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)             # [B,nh,T,hs]
    dp = dy @ v.transpose(0, 1, 3, 2)
    dv = p.transpose(0, 1, 3, 2) @ dy
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))                  # softmax bwd
    dq = (ds @ k) * scale
    dk = (ds.transpose(0, 1, 3, 2) @ q) * scale
    dqkv = np.stack([dq, dk, dv])                                    # [3,B,nh,T,hs]
    return dqkv.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * nh * hs)


# ---------------------------------------------------------------- model
def forward_backward(cfg, tokens, targets, P):
    """cfg: dict n_layer, n_head; tokens/targets int [B,T]; P: dict name ->
    float64 array. Returns (logits [B,T,V], loss, grads dict)."""
    L, nh = cfg["n_layer"], cfg["n_head"]
    B, T = tokens.shape
    wte, wpe = P["wte"], P["wpe"]
    V = wte.shape[0]

    # forward
    x = wte[tokens] + wpe[:T][None]
    caches = []
    for l in range(L):
        g = lambda n: P["h.%d.%s" % (l, n)]
        c = {}
        h, c["ln1"] = ln_fwd(x, g("ln_1.weight"), g("ln_1.bias"))
        qkv, c["qkv_in"] = lin_fwd(h, g("attn.qkv.weight"), g("attn.qkv.bias"))
        y, c["attn"] = attn_fwd(qkv, nh)
        a, c["proj_in"] = lin_fwd(y, g("attn.proj.weight"), g("attn.proj.bias"))
        x = x + a
        h, c["ln2"] = ln_fwd(x, g("ln_2.weight"), g("ln_2.bias"))
        f, c["fc_in"] = lin_fwd(h, g("mlp.fc.weight"), g("mlp.fc.bias"))
        f, c["gelu"] = gelu_fwd(f)
        m, c["mproj_in"] = lin_fwd(f, g("mlp.proj.weight"), g("mlp.proj.bias"))
        x = x + m
        caches.append(c)
    xf, lnf_cache = ln_fwd(x, P["ln_f.weight"], P["ln_f.bias"])
    logits = xf @ wte.T                                              # tied head
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    N = B * T
    loss = -np.take_along_axis(logp, targets[..., None], -1).sum() / N

    # backward
    G = {}
    dlogits = np.exp(logp)
    np.put_along_axis(dlogits, targets[..., None],
                      np.take_along_axis(dlogits, targets[..., None], -1) - 1.0, -1)
    dlogits /= N
    dwte = dlogits.reshape(N, V).T @ xf.reshape(N, -1)               # head part
    dxf = dlogits @ wte
    dx, G["ln_f.weight"], G["ln_f.bias"] = ln_bwd(dxf, lnf_cache)
    for l in reversed(range(L)):
        g = lambda n: P["h.%d.%s" % (l, n)]
        p = "h.%d." % l
        c = caches[l]
        # MLP residual branch
        df, G[p + "mlp.proj.weight"], G[p + "mlp.proj.bias"] = \
            lin_bwd(dx, c["mproj_in"], g("mlp.proj.weight"))
        df = gelu_bwd(df, c["gelu"])
        dh, G[p + "mlp.fc.weight"], G[p + "mlp.fc.bias"] = \
            lin_bwd(df, c["fc_in"], g("mlp.fc.weight"))
        dxl, G[p + "ln_2.weight"], G[p + "ln_2.bias"] = ln_bwd(dh, c["ln2"])
        dx = dx + dxl
        # attention residual branch
        dy, G[p + "attn.proj.weight"], G[p + "attn.proj.bias"] = \
            lin_bwd(dx, c["proj_in"], g("attn.proj.weight"))
        dqkv = attn_bwd(dy, c["attn"])
        dh, G[p + "attn.qkv.weight"], G[p + "attn.qkv.bias"] = \
            lin_bwd(dqkv, c["qkv_in"], g("attn.qkv.weight"))
        dxl, G[p + "ln_1.weight"], G[p + "ln_1.bias"] = ln_bwd(dh, c["ln1"])
        dx = dx + dxl
    # embeddings: token rows scatter-add (plus head part), positions sum over B
    np.add.at(dwte, tokens.reshape(-1), dx.reshape(N, -1))
    G["wte"] = dwte
    dwpe = np.zeros_like(wpe)
    dwpe[:T] = dx.sum(0)
    G["wpe"] = dwpe
    return logits, loss, G


# ---------------------------------------------------------------- file I/O
def read_in(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        sys.exit("gpt_ref: cannot read %s: %s" % (path, e.strerror))
    if len(raw) < 4 * HEADER:
        sys.exit("gpt_ref: %s: %d bytes, shorter than the %d-byte header"
                 % (path, len(raw), 4 * HEADER))
    L, nh, C, Tmax, V, B, T = (int(v) for v in np.frombuffer(raw, "<i4", HEADER))
    if min(L, nh, C, Tmax, V, B, T) <= 0 or C % nh or T > Tmax:
        sys.exit("gpt_ref: %s: bad header n_layer=%d n_head=%d n_embd=%d "
                 "block_size=%d vocab=%d B=%d T=%d" % (path, L, nh, C, Tmax, V, B, T))
    specs = param_specs(L, C, Tmax, V)
    nparam = sum(int(np.prod(s)) for _, s in specs)
    want = 4 * (HEADER + 2 * B * T + nparam)
    if len(raw) != want:
        sys.exit("gpt_ref: %s: size %d bytes, expected %d (header + 2*%d tokens "
                 "+ %d float32 params)" % (path, len(raw), want, B * T, nparam))
    off = 4 * HEADER
    tok = np.frombuffer(raw, "<i4", B * T, off).reshape(B, T).astype(np.int64)
    off += 4 * B * T
    tgt = np.frombuffer(raw, "<i4", B * T, off).reshape(B, T).astype(np.int64)
    off += 4 * B * T
    for name, a in (("tokens", tok), ("targets", tgt)):
        if a.min() < 0 or a.max() >= V:
            sys.exit("gpt_ref: %s: %s out of range [0,%d)" % (path, name, V))
    flat = np.frombuffer(raw, "<f4", nparam, off).astype(np.float64)
    P, i = {}, 0
    for name, shape in specs:
        n = int(np.prod(shape))
        P[name] = flat[i:i + n].reshape(shape)
        i += n
    cfg = dict(n_layer=L, n_head=nh, n_embd=C, block_size=Tmax, vocab_size=V)
    return cfg, tok, tgt, P, specs


def write_in(path, cfg, tokens, targets, P):
    """Write an IN.bin (used by tests; parameters are stored as float32)."""
    B, T = tokens.shape
    specs = param_specs(cfg["n_layer"], cfg["n_embd"], cfg["block_size"],
                        cfg["vocab_size"])
    hdr = [cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["block_size"],
           cfg["vocab_size"], B, T]
    with open(path, "wb") as f:
        f.write(np.asarray(hdr, "<i4").tobytes())
        f.write(np.asarray(tokens, "<i4").tobytes())
        f.write(np.asarray(targets, "<i4").tobytes())
        for name, shape in specs:
            assert P[name].shape == tuple(shape), name
            f.write(np.asarray(P[name], "<f4").tobytes())


def main(argv):
    if len(argv) != 3:
        sys.exit("usage: gpt_ref.py IN.bin OUT.bin")
    cfg, tok, tgt, P, specs = read_in(argv[1])
    logits, loss, G = forward_backward(cfg, tok, tgt, P)
    with open(argv[2], "wb") as f:
        f.write(np.ascontiguousarray(logits, "<f8").tobytes())
        f.write(np.asarray([loss], "<f8").tobytes())
        for name, _ in specs:
            f.write(np.ascontiguousarray(G[name], "<f8").tobytes())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
