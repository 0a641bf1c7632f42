"""Held-out perplexity of the shipped packed checkpoint under HF transformers (device machine).

Mirrors `bitnet perplexity --file train/heldout.txt --json` exactly: the file is tokenized once
with special tokens (one BOS), cut into non-overlapping windows of `--context` tokens (default: the
model's max_position_embeddings), each window is a fresh sequence whose first token is not scored;
the result is the mean NLL over all scored tokens. Runs in f32 (TF32 off). Not part of the product.

    python3 train/eval_packed.py models/bitnet-kjv-tiny train/heldout.txt > $OUT/eval_packed.json
"""
import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, text_file = sys.argv[1], sys.argv[2]
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
device = "cuda" if torch.cuda.is_available() else "cpu"
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").to(device)
model.eval()
ids = tok(open(text_file, encoding="utf-8").read())["input_ids"]
context = model.config.max_position_embeddings
nll = []
with torch.no_grad():
    for start in range(0, len(ids), context):
        window = ids[start:start + context]
        if len(window) < 2:
            continue
        x = torch.tensor([window], device=device)
        logp = torch.log_softmax(model(x).logits[0].float(), dim=-1)
        nll += (-logp[:-1].gather(1, x[0, 1:, None])[:, 0]).tolist()
mean = sum(nll) / len(nll)
print(json.dumps({
    "model": model_dir, "file": text_file, "tokens": len(ids), "context": context,
    "scored": len(nll), "mean_nll": mean, "ppl": float(torch.tensor(mean).exp()),
    "linear_class": type(model.model.layers[0].self_attn.q_proj).__name__,
    "transformers": transformers.__version__, "torch": torch.__version__,
    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
}, indent=1))
