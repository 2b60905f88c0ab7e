"""DDP over gloo (CPU runs): each gradient all-reduced on its own, so that a resumed run sums exactly as the
uninterrupted one did.

DDP all-reduces gradients in buckets, flat buffers holding several parameters' gradients. It lays them out in
parameter order when a launch starts and rebuilds them in gradient-ready order after the launch's first batch. With
more than two ranks gloo's ring all-reduce adds the ranks' values in an order that depends on where an element sits
in its buffer, so the first batch after a resume (initial layout) and the same batch of the uninterrupted run
(rebuilt layout) got gradients an ulp apart, and LION's momenta then differed in their last bits (the weights, whose
LION update is a sign, stayed equal). ``exact_sums`` registers a comm hook (torch's ``register_comm_hook``) that
all-reduces every gradient of a bucket as its own tensor: each element's sum then depends on that gradient's size
and the ranks only, never on the layout. It sends one smaller message per parameter instead of one per bucket, so
it is used where bit-exact resumption is promised and speed matters little: DDP on CPU. GPU runs keep DDP's own
bucketed all-reduce (and FSDP does not use DDP at all).
"""
import torch
import torch.distributed as dist


def _each_gradient_on_its_own(group, bucket):  # no annotations: DDP checks them against its own types
    world = dist.get_world_size(group)
    for grad in bucket.gradients():  # views into bucket.buffer(): reduced in place
        dist.all_reduce(grad, group=group)
    buffer = bucket.buffer()
    buffer.div_(world)  # DDP averages over ranks
    done = torch.futures.Future()
    done.set_result(buffer)
    return done


def exact_sums(model) -> bool:
    """Register the per-gradient all-reduce on ``model`` when it is a ``DistributedDataParallel`` over CPU
    tensors; True when registered."""
    from torch.nn.parallel import DistributedDataParallel
    if not isinstance(model, DistributedDataParallel):
        return False
    if any(p.is_cuda for p in model.parameters()):
        return False
    model.register_comm_hook(None, _each_gradient_on_its_own)
    return True
