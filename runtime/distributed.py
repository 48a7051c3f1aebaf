"""torchrun / DistributedDataParallel helpers; every function is a no-op in a single process."""
import contextlib
import os

import torch
import torch.distributed as dist

from errors import GFNetDynnError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def init_distributed(device_arg: str) -> tuple[bool, torch.device | None]:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU.
    Returns (distributed, this rank's device or None to let the caller decide)."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return False, None
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    use_cuda = device_arg != 'cpu' and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
    return True, torch.device('cuda', local_rank) if use_cuda else torch.device('cpu')


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a metric tensor over ranks (in place) so every rank reports the global value."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate a per-rank tensor along `dim` across ranks (sizes may differ by rank)."""
    if not is_distributed():
        return tensor
    size = torch.tensor([tensor.shape[dim]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    pad_shape = list(tensor.shape)
    pad_shape[dim] = longest - tensor.shape[dim]
    padded = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g.narrow(dim, 0, int(s.item())) for g, s in zip(gathered, sizes)], dim=dim)


def sync_gradients(parameters) -> None:
    """Average the gradients of `parameters` over ranks, what DDP does for a whole model. The early-exit
    stages use it because each phase trains a different subset (gates, heads, backbone)."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DistributedDataParallel wrapper, or the model itself."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock timings measure it (a no-op on the CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 mixed precision on CUDA when asked; a null context otherwise. bf16 only: it keeps fp32's exponent
    range, so no gradient scaler is needed (fp16 would underflow without one)."""
    if not enabled or device.type != 'cuda':
        return contextlib.nullcontext()
    if not torch.cuda.is_bf16_supported():
        raise GFNetDynnError('--amp needs a GPU with bfloat16 support (Ampere or newer); run without --amp')
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
