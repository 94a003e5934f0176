#!/usr/bin/python3
"""Self-check of tests/ref/gpt_ref.py on a tiny random model.

1. forward: logits/loss against a deliberately naive loop implementation
   (per position, per head, written straight from DESIGN.md s.4);
2. backward: 4th-order central finite differences of the float64 loss for a sample of
   entries of every parameter tensor (must agree to ~1e-6 relative);
3. file path: IN.bin -> gpt_ref.py -> OUT.bin round trip, and a wrong-size
   IN.bin must be refused with a non-zero exit.
Exit 0 on success.
"""
import math
import os
import subprocess
import sys
import tempfile
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpt_ref  # noqa: E402

CFG = dict(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=11)
B, T = 2, 5
FD_H = 1e-3        # step of the 4th-order central-difference stencil
REL_TOL = 1e-6     # relative agreement required
ABS_TOL = 1e-10    # floor for entries whose gradient is ~0 (e.g. unused wpe rows)
SAMPLES = 8        # entries per tensor


def random_model(rng):
    """Random parameters, larger than GPT-2 init so every nonlinearity matters."""
    specs = gpt_ref.param_specs(CFG["n_layer"], CFG["n_embd"], CFG["block_size"],
                                CFG["vocab_size"])
    P = {}
    for name, shape in specs:
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            P[name] = 1.0 + 0.3 * rng.standard_normal(shape)
        else:
            P[name] = 0.4 * rng.standard_normal(shape)
    # round to float32 values so the file round trip is exact
    P = {k: v.astype(np.float32).astype(np.float64) for k, v in P.items()}
    tok = rng.integers(0, CFG["vocab_size"], (B, T))
    tgt = rng.integers(0, CFG["vocab_size"], (B, T))
    return specs, P, tok, tgt


def naive_forward(P, tok, tgt):
    """Loop-based forward pass, independent of gpt_ref's vectorised code."""
    L, nh, C = CFG["n_layer"], CFG["n_head"], CFG["n_embd"]
    hs = C // nh

    def ln(v, w, b):
        mu = sum(v) / C
        var = sum((e - mu) ** 2 for e in v) / C
        return np.array([(v[i] - mu) / math.sqrt(var + 1e-5) * w[i] + b[i]
                         for i in range(C)])

    def lin(v, W, b):
        return np.array([sum(W[o, i] * v[i] for i in range(W.shape[1])) + b[o]
                         for o in range(W.shape[0])])

    def gelu(u):
        return 0.5 * u * (1 + math.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))

    logits = np.zeros((B, T, CFG["vocab_size"]))
    loss = 0.0
    for b in range(B):
        xs = [P["wte"][tok[b, t]] + P["wpe"][t] for t in range(T)]
        for l in range(L):
            g = lambda n: P["h.%d.%s" % (l, n)]
            qkv = [lin(ln(x, g("ln_1.weight"), g("ln_1.bias")),
                       g("attn.qkv.weight"), g("attn.qkv.bias")) for x in xs]
            new = []
            for t in range(T):
                y = np.zeros(C)
                for h in range(nh):
                    q = qkv[t][h * hs:(h + 1) * hs]
                    sc = [sum(q * qkv[s][C + h * hs:C + (h + 1) * hs]) / math.sqrt(hs)
                          for s in range(t + 1)]
                    m = max(sc)
                    e = [math.exp(v - m) for v in sc]
                    for s in range(t + 1):
                        y[h * hs:(h + 1) * hs] += e[s] / sum(e) * \
                            qkv[s][2 * C + h * hs:2 * C + (h + 1) * hs]
                x = xs[t] + lin(y, g("attn.proj.weight"), g("attn.proj.bias"))
                f = lin(ln(x, g("ln_2.weight"), g("ln_2.bias")),
                        g("mlp.fc.weight"), g("mlp.fc.bias"))
                f = np.array([gelu(u) for u in f])
                new.append(x + lin(f, g("mlp.proj.weight"), g("mlp.proj.bias")))
            xs = new
        for t in range(T):
            z = P["wte"] @ ln(xs[t], P["ln_f.weight"], P["ln_f.bias"])
            logits[b, t] = z
            loss -= z[tgt[b, t]] - math.log(sum(math.exp(v) for v in z))
    return logits, loss / (B * T)


def main():
    rng = np.random.default_rng(1234)
    specs, P, tok, tgt = random_model(rng)
    ok = True

    # 1. forward vs naive loops
    logits, loss, G = gpt_ref.forward_backward(CFG, tok, tgt, P)
    nl, nloss = naive_forward(P, tok, tgt)
    ferr = max(np.abs(logits - nl).max(), abs(loss - nloss))
    good = ferr < 1e-12
    ok &= good
    print("forward vs naive loops: loss=%.12f max|diff|=%.2e %s"
          % (loss, ferr, "ok" if good else "FAIL"))

    # 2. finite differences, every tensor
    for name, shape in specs:
        n = int(np.prod(shape))
        idx = rng.choice(n, min(SAMPLES, n), replace=False)
        if name == "wpe":   # make sure rows >= T (zero gradient) are sampled too
            idx = np.concatenate([idx[:-2], [T * CFG["n_embd"], n - 1]])
        worst = 0.0
        for i in idx:
            flat = P[name].reshape(-1)
            old = flat[i]
            f = {}
            for k in (-2, -1, 1, 2):
                flat[i] = old + k * FD_H
                f[k] = gpt_ref.forward_backward(CFG, tok, tgt, P)[1]
            flat[i] = old
            fd = (8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * FD_H)
            an = G[name].reshape(-1)[i]
            err = abs(fd - an)
            if err > REL_TOL * max(abs(fd), abs(an)) + ABS_TOL:
                ok = False
                print("  MISMATCH %s[%d]: analytic %.10e fd %.10e" % (name, i, an, fd))
            worst = max(worst, err / max(abs(fd), abs(an), ABS_TOL / REL_TOL))
        print("grad %-20s %-8s %d samples  max rel err %.2e"
              % (name, "x".join(map(str, shape)), len(idx), worst))

    # 3. file round trip through the command line
    with tempfile.TemporaryDirectory() as d:
        fin, fout = os.path.join(d, "in.bin"), os.path.join(d, "out.bin")
        gpt_ref.write_in(fin, CFG, tok, tgt, P)
        script = os.path.join(HERE, "gpt_ref.py")
        r = subprocess.run([sys.executable, script, fin, fout])
        out = np.fromfile(fout, "<f8") if r.returncode == 0 else np.zeros(0)
        ref = np.concatenate([logits.ravel(), [loss]] +
                             [G[nm].ravel() for nm, _ in specs])
        good = r.returncode == 0 and out.shape == ref.shape and np.array_equal(out, ref)
        ok &= good
        print("cli round trip: %d float64 values %s" % (ref.size, "ok" if good else "FAIL"))
        with open(fin, "ab") as f:
            f.write(b"\0\0\0\0")
        r = subprocess.run([sys.executable, script, fin, fout], stderr=subprocess.PIPE)
        good = r.returncode != 0
        ok &= good
        print("cli wrong-size input refused (rc=%d): %s %s"
              % (r.returncode, r.stderr.decode().strip(), "ok" if good else "FAIL"))

    print("SELFCHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
