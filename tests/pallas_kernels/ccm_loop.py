"""CCM compression as a deliberately simple numpy loop: the plan-independent specification that
`kvjax.compress` (tests/kvjax/compression/test_compress.py) and the `ccm_compress` kernel
(tests/pallas_kernels/test_ccm_compress.py) are both checked against. It shares nothing with
`pallas_kernels.ccm_compress.ccm_plan`: groups, fallbacks and leftovers are walked one by one."""

from __future__ import annotations

import numpy as np


def numpy_mlp(w, x):
    """x [cf*D] through one layer's Linear-ReLU-Linear-ReLU-Linear, weights as numpy [in, out]."""
    w1, b1, w2, b2, w3, b3 = w
    h = np.maximum(x @ w1 + b1, 0)
    h = np.maximum(h @ w2 + b2, 0)
    return h @ w3 + b3


def naive_ccm(k, v, kv_len, image_len, weights, cf: int, min_seq_len: int, keep_last: int = 0):
    """k, v [L, B, H, S, D] numpy; kv_len, image_len [B]; weights a CCMWeights of numpy arrays
    (image_k None: the image span is kept as it is). Per sequence, layer and head: walk the image
    span then the text span, group by group; the text span's last keep_last tokens are appended as
    they are. -> (k, v, new_len [B]); slots past new_len are 0."""
    k, v = np.asarray(k, np.float32), np.asarray(v, np.float32)
    out_k, out_v, new_lens = np.zeros_like(k), np.zeros_like(v), []
    for b in range(k.shape[1]):
        img = min(int(image_len[b]), int(kv_len[b]))
        image_mlps = None if weights.image_k is None else (weights.image_k, weights.image_v)
        text = int(kv_len[b]) - img
        kept = min(keep_last, text)
        spans = [(0, img, image_mlps), (img, text - kept, (weights.text_k, weights.text_v)), (img + text - kept, kept, None)]
        for layer in range(k.shape[0]):
            for head in range(k.shape[2]):
                for cache, rows, which in ((k, out_k, 0), (v, out_v, 1)):
                    out = []
                    for start, length, mlps in spans:
                        tokens = cache[layer, b, head, start:start + length]
                        groups = length // cf
                        if mlps is None or groups < min_seq_len:
                            out.extend(tokens)
                            continue
                        w = [np.asarray(a[layer], np.float32) for a in mlps[which]]
                        for g in range(groups):
                            out.append(numpy_mlp(w, tokens[g * cf:(g + 1) * cf].reshape(-1)))
                        out.extend(tokens[groups * cf:])
                    if out:
                        rows[layer, b, head, :len(out)] = np.stack(out)
        new_lens.append(len(out))
    return out_k, out_v, np.array(new_lens)
