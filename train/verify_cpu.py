#!/usr/bin/env python3
"""CPU check that train.py's model is bit-identical to transformers' BitNetForCausalLM (online mode).

    python3 train/verify_cpu.py .train/master

transformers wraps WeightQuant/ActQuant.forward in torch.compile; Inductor's generated code rounds a
few near-tie activations differently from eager PyTorch, so the compiled comparison shows small
differences. With the quantisation functions run eagerly, the logits must match exactly.
Needs torch, transformers, accelerate, tokenizers, safetensors (CPU wheels are enough).
"""
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train as T  # noqa: E402
import transformers.integrations.bitnet as tb  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(T.ROOT, ".train/master")
sd = load_file(os.path.join(d, "model.safetensors"))
ours = T.BitNetLM(T.MODEL_CFG)
ours.load_state_dict({k: v.float() for k, v in sd.items()})
ours.eval()
hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
held = T.encode_stream(T.load_tokenizer(), T.HELDOUT_TXT)
x, _ = T.windows(held, 256)
xb = x[:4]
with torch.no_grad():
    a, b = ours(xb), hf(input_ids=xb).logits
print("transformers (compiled quant fns): max|diff| %.3e argmax agreement %.5f"
      % ((a - b).abs().max().item(), (a.argmax(-1) == b.argmax(-1)).float().mean().item()))
for c in (tb.WeightQuant, tb.ActQuant):
    c.forward = staticmethod(getattr(c.forward, "_torchdynamo_orig_callable", c.forward))
with torch.no_grad():
    b = hf(input_ids=xb).logits
diff = (a - b).abs().max().item()
print("transformers (eager quant fns):    max|diff| %.3e argmax agreement %.5f"
      % (diff, (a.argmax(-1) == b.argmax(-1)).float().mean().item()))
sys.exit(0 if diff == 0.0 else 1)
