"""Experiment: every Linear of SmolLM2 (trunk and lm_head) on MKL pre-packed sgemm vs HF, forward over a
DynamicCache with k new tokens. Run: HF_HUB_OFFLINE=1 T=1 .venv/bin/python bench/smollm2/prepacked_trunk.py
"""
import time, torch, os
import torch.nn.functional as F
torch.set_num_threads(int(os.environ.get("T","1")))
from transformers import DynamicCache
from multitoken.hf.loading import load_smollm2
m,tok=load_smollm2()
w=m.lm_head.weight
p16=torch.ops.mkl._mkl_reorder_linear_weight(w,16)
for M in (1,2,4,16):
    x=torch.randn(M,576)
    y=torch.ops.mkl._mkl_linear(x,p16,w,None,M)
    print("packed16 used with M",M,"eq F.linear",torch.equal(y,F.linear(x,w)), (y-F.linear(x,w)).abs().max().item())

class Packed(torch.nn.Module):
    def __init__(s, lin, M):
        super().__init__(); s.w=lin.weight.detach(); s.p=torch.ops.mkl._mkl_reorder_linear_weight(s.w,M)
    def forward(s,x):
        sh=x.shape; x2=x.reshape(-1,sh[-1])
        return torch.ops.mkl._mkl_linear(x2,s.p,s.w,None,x2.shape[0]).view(*sh[:-1],-1)
ids=torch.randint(0,49152,(1,216))
def run(mod,k,reps=8):
    cache=DynamicCache(config=m.config)
    with torch.inference_mode():
        mod(ids[:,:200],cache=cache,use_cache=True)
        ts=[]
        for _ in range(reps):
            t=time.perf_counter(); out=mod(ids[:,200:200+k],cache=cache,use_cache=True).logits; ts.append(time.perf_counter()-t); cache.crop(-k)
    return min(ts), out
base={k:run(m,k) for k in (1,2,4,8,16)}
for name,mod in list(m.model.named_modules()):
    for cn,c in list(mod.named_children()):
        if isinstance(c,torch.nn.Linear): setattr(mod,cn,Packed(c,8))
m.lm_head=Packed(m.lm_head,8)
for k in (1,2,4,8,16):
    t,out=run(m,k)
    print(f"k={k}: HF {1000*base[k][0]:.0f} ms, all-linears MKL-prepacked {1000*t:.0f} ms, max|diff| {(out-base[k][1]).abs().max():.2e}, argmax eq {torch.equal(out.argmax(-1),base[k][1].argmax(-1))}  load {os.getloadavg()[0]:.1f}")
