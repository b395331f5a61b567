"""Worker for the 2-process AEWGS test (gloo): each rank has its own upstream gradient."""
import torch
import torch.distributed as dist

from gdnsq.quantizers import aewgs_grads


def run(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(3, 2, 3, 3, generator=gen) * 0.3
        step = torch.full((3,), -3.0)
        z = w.reshape(3, -1).amin(1)
        g = torch.randn(w.shape, generator=torch.Generator().manual_seed(100 + rank))
        gw, _ = aewgs_grads(g, w, step, z)
        torch.save({"w": w, "g": g, "gw": gw}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
