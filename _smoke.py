import os, time
os.environ["TRITON_INTERPRET"]="1"
import torch, mmfast
from mmfast import reference as R
torch.manual_seed(0)
for direction in ["both","image","text"]:
  for N,M,D in [(17,17,64),(97,97,100),(5,9,3)]:
    if direction=="both" and N!=M: continue
    if direction=="text": N,M=M,N
    x=torch.randn(N,D,dtype=torch.float64); y=torch.randn(M,D,dtype=torch.float64)
    x=(x/x.norm(dim=1,keepdim=True)).float().requires_grad_(); y=(y/y.norm(dim=1,keepdim=True)).float().requires_grad_()
    s=torch.tensor(14.3,requires_grad=True)
    t=time.time()
    out=mmfast.info_nce(x,y,s,direction=direction,backend="triton")
    gx,gy,gs=torch.autograd.grad(out,(x,y,s))
    t1=time.time()-t
    xd,yd,sd=[v.detach().double().requires_grad_() for v in (x,y,s)]
    ref=R.info_nce(xd,yd,sd,direction=direction)
    rx,ry,rs=torch.autograd.grad(ref,(xd,yd,sd))
    print(direction,N,M,D,f"{t1:.2f}s",float(out-ref),float((gx-rx).abs().max()),float((gy-ry).abs().max()),float(gs-rs))
x=torch.randn(33,20); y=torch.randn(33,20); x.requires_grad_(); y.requires_grad_()
s=torch.tensor(3.0,requires_grad=True); b=torch.tensor(-2.,requires_grad=True)
out=mmfast.siglip_loss(x,y,s,b,backend="triton"); g=torch.autograd.grad(out,(x,y,s,b))
ref=R.siglip_loss(x,y,s,b); r=torch.autograd.grad(ref,(x,y,s,b))
print("siglip",float(out-ref),[float((a-c).abs().max()) for a,c in zip(g,r)])
