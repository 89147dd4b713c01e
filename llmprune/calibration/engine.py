"""Layer-by-layer calibration: capture the first decoder layer's inputs, then for each layer
onload -> observe -> prune -> re-run (propagating the *pruned* outputs) -> offload.

Only the current decoder layer lives on the compute device; the hidden states of all calibration
windows stay on the offload device (CPU by default).

Where the layers live is the business of the model's layer store (`calibration/streaming.py`): in
memory (the default: a layer is moved to the compute device and back), or streamed from and to disk
one layer at a time (`llmprune compress`): `layerwise` opens each layer through it and closes it
when done; its *final* pass (the stage's last touch of a layer) lets the store edit, write and free it.
Under torchrun each process holds a share of the calibration batches (`CapturedInputs.batch_ids`,
global indices, so statistics reduce in one canonical order; see `llmprune.distributed`).

Capturing inputs works for any family without per-model code: every decoder layer's `forward` is
temporarily replaced by a recorder that stores the exact positional and keyword arguments the
model passes it (attention masks, position embeddings, per-layer-type masks as in Gemma 2/3, ...)
and returns its input unchanged; the last recorder stops the forward before the final norm and
lm_head. So the model builds all its masks and rotary tables itself, exactly as in inference.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from llmprune import distributed
from llmprune.arch import decoder_layers, layer_linears, weight_2d
from llmprune.calibration.observers import LayerObserver, StopForward
from llmprune.calibration.streaming import layer_store
from llmprune.errors import UserError
from llmprune.methods import LinearStats


@dataclass
class LayerCall:
    """How the model calls one decoder layer for one calibration batch (minus the hidden states)."""
    args: tuple
    kwargs: dict


@dataclass
class CapturedInputs:
    hidden: list[torch.Tensor]            # per batch: [batch, seqlen, hidden] on the offload device
    calls: list[list[LayerCall]]          # [batch][layer]
    batch_ids: list[int] = field(default_factory=list)   # global index of each batch held here

    def __post_init__(self):
        if not self.batch_ids:
            self.batch_ids = list(range(len(self.calls)))


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int,
                         offload: str = "cpu") -> CapturedInputs:
    """Run the model's own forward up to the decoder layers, recording what each layer receives (for
    this process's share of the batches under torchrun)."""
    layers = decoder_layers(model)
    n_layers = len(layers)
    batch_ids = distributed.local_batches(-(-input_ids.shape[0] // batch_size))
    hidden = layer_store(model).new_activations(batch_ids)   # a list, or one that spills to disk
    calls: list[list[LayerCall]] = []
    current: list[LayerCall] = []

    def recorder(index: int):
        def forward(*args, **kwargs):
            hidden_states = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                hidden.append(hidden_states.detach().to(offload))
            kwargs = {k: v for k, v in kwargs.items() if k not in ("use_cache", "output_attentions")}
            current.append(LayerCall(args=tuple(args[1:]), kwargs=kwargs))
            if index == n_layers - 1:
                raise StopForward
            return hidden_states
        return forward

    embed_device = model.get_input_embeddings().weight.device
    saved = [layer.forward for layer in layers]
    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        for b in batch_ids:
            current = []
            batch = input_ids[b * batch_size:(b + 1) * batch_size].to(embed_device)
            try:
                model(input_ids=batch, use_cache=False)
            except StopForward:
                pass
            if len(current) != n_layers:
                raise RuntimeError(f"captured {len(current)} of {n_layers} decoder layer calls")
            calls.append(current)
    finally:
        for layer, forward in zip(layers, saved):
            layer.forward = forward
            if "forward" in layer.__dict__:
                del layer.forward
    return CapturedInputs(hidden=hidden, calls=calls, batch_ids=batch_ids)


def run_layer(layer: nn.Module, hidden_states: torch.Tensor, call: LayerCall, device) -> torch.Tensor:
    out = layer(hidden_states.to(device), *to_device(call.args, device), **to_device(call.kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerStep:
    """One decoder layer during calibration: the layer (on the compute device), the inputs of every
    calibration batch, and the two ways to run them (see `forward_all`, `forward_lockstep`)."""
    index: int
    name: str
    layer: nn.Module
    hidden: list[torch.Tensor] = field(default_factory=list)    # per batch, on the offload device
    calls: list[LayerCall] = field(default_factory=list)        # per batch: how the model calls it
    device: str = "cpu"
    offload: str = "cpu"
    outputs: list[torch.Tensor] | None = None   # set by forward_lockstep: the layer's outputs, done
    batch_ids: list[int] = field(default_factory=list)          # global index of each batch (statistics order)

    def batch_id(self, b: int) -> int:
        return self.batch_ids[b] if self.batch_ids else b

    def forward_all(self, observer: LayerObserver | None = None) -> None:
        """Run every batch through the layer (outputs dropped), for statistics."""
        for b, hidden_states in enumerate(self.hidden):
            if observer is not None:
                observer.start_batch(self.batch_id(b))
            try:
                run_layer(self.layer, hidden_states, self.calls[b], self.device)
            except StopForward:
                pass
            if observer is not None:
                observer.end_batch(self.batch_id(b))

    def forward_lockstep(self, observer: LayerObserver,
                         prune: Callable[[str, LinearStats], None]) -> None:
        """True-sequential calibration in a single pass over the layer.

        Every batch's forward runs in its own greenlet, one at a time. A batch that reaches
        a linear (forward pre-hook) adds its input to the statistics and waits there until every
        batch has arrived; then the linear is pruned and all batches go on, so the next linears
        are calibrated on the outputs of the already-pruned ones ([q,k,v] -> [o] -> [gate,up] ->
        [down] for Llama) and each batch's forward ends with the pruned layer's output. This is
        SparseGPT's `--true-sequential` without its extra forward per group: every linear runs
        once per batch. A linear whose input was already complete (k, v share q's) is pruned at
        its first call. Costs memory: every batch's activations are alive at the same time.
        Under torchrun every rank runs its own batches in this lockstep: sealing a linear's statistics
        is the reduction across ranks, and each linear is pruned by one rank and broadcast
        (`distributed.submit`/`flush`) before any batch goes on; a layer's linears are therefore
        pruned one after another (two-pass calibration prunes them all in parallel).
        """
        pruned: set[str] = set()

        def arrive(name: str, x: torch.Tensor) -> bool:     # True: the linear may run now
            if name in pruned:
                return True
            stats = observer.observe(name, x)
            if observer.is_sealed(stats):
                prune(name, stats)
                pruned.add(name)
                distributed.flush()
                return True
            return False

        def release(name: str) -> None:                       # every batch is waiting at `name`
            stats = observer.stats[name]
            observer.seal(stats)
            prune(name, stats)
            pruned.add(name)
            distributed.flush()

        lockstep = _Lockstep(len(self.hidden), observer, [self.batch_id(b) for b in range(len(self.hidden))])
        names = {module: name for name, module in observer.linears.items()}
        handles = [module.register_forward_pre_hook(lockstep.hook(names[module], arrive))
                   for module in names]
        try:
            self.outputs = lockstep.run(
                lambda b: run_layer(self.layer, self.hidden[b], self.calls[b], self.device).to(self.offload),
                release)
        finally:
            for handle in handles:
                handle.remove()
        for name in observer.linears:            # never called during calibration
            if name not in pruned:
                prune(name, observer.stats.get(name))
        distributed.flush()


class _Lockstep:
    """One greenlet per batch, all on the calling thread: a batch runs until it waits at a linear
    (or finishes), then the coordinator resumes the next, round after round.

    Greenlets, not threads: every torch op still runs on this one thread with its full OpenMP team.
    (Parked OS threads that have used OpenMP make libgomp throttle its spin-waits for every team,
    which slowed the many small ops of the SparseGPT sweep by ~30%.)
    """

    def __init__(self, n_batches: int, observer: LayerObserver, batch_ids: list[int]):
        self.n = n_batches
        self.observer = observer
        self.batch_ids = batch_ids
        self.waiting_at: list[str | None] = [None] * n_batches
        self.current: int | None = None          # the batch whose greenlet is running
        self.coordinator: greenlet.greenlet | None = None

    def hook(self, name: str, arrive: Callable[[str, torch.Tensor], bool]):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            b = self.current
            if b is None or arrive(name, args[0]):   # not in the lockstep, or the linear may run now
                return
            self.waiting_at[b] = name
            self.coordinator.switch()                  # ... every batch arrives, `name` is pruned ...
            self.waiting_at[b] = None
        return pre_hook

    def run(self, forward: Callable[[int], torch.Tensor], release: Callable[[str], None]) -> list[torch.Tensor]:
        import greenlet  # here, not at module import: only true-sequential calibration needs it (GPU images may lack it)

        self.coordinator = greenlet.getcurrent()
        batches = [greenlet.greenlet(forward) for _ in range(self.n)]
        outputs: list = [None] * self.n
        try:
            while True:
                for b, batch in enumerate(batches):
                    if batch.dead:
                        continue
                    self.current = b
                    self.observer.start_batch(self.batch_ids[b])
                    result = batch.switch(b) if not batch else batch.switch()   # first switch starts it
                    self.current = None
                    if batch.dead:
                        outputs[b] = result
                        self.observer.end_batch(self.batch_ids[b])
                live = [b for b in range(self.n) if not batches[b].dead]
                if not live:
                    return outputs
                at = {self.waiting_at[b] for b in live}
                if len(live) != self.n or len(at) != 1:
                    raise UserError("true-sequential calibration needs every calibration batch to pass the same "
                                    "linears in the same order, and this layer's batches diverged; "
                                    "use --no-true-sequential")
                release(at.pop())
        finally:
            self.current = None
            for batch in batches:            # unwind batches left waiting (after an error)
                if batch and not batch.dead:
                    batch.throw(greenlet.GreenletExit)


@torch.no_grad()
def layerwise(model: nn.Module, captured: CapturedInputs | None, device: str, layer_prefix: str,
              step: Callable[[LayerStep], None], progress: Iterator | None = None,
              offload: str = "cpu", *, final: bool = True) -> list[float]:
    """For each decoder layer: onload, call `step` (observe + prune), propagate outputs, offload.

    `captured.hidden` is updated in place with each layer's outputs (after `step` edited it), so the
    next layer calibrates on the *pruned* model's activations; when `step` already produced them
    (`forward_lockstep`), they are used as they are. `captured=None`: no calibration data, `step`
    only (data-free methods). `final`: this pass is the stage's last touch of each layer (a dense
    scan before pruning, like OWL's, passes False); the layer store may then edit, write and free the
    layer, and a resumed run starts at the first layer not yet finished. Returns seconds per layer.
    """
    store = layer_store(model)
    n_layers = len(decoder_layers(model))
    start = store.resume_index() if final else 0
    if start and captured is not None:
        store.restore_activations(captured)     # what layer `start` received in the interrupted run
    if start and progress is not None:
        progress.update(start)
    seconds = []
    for i in range(start, n_layers):
        t0 = time.perf_counter()
        layer = store.open(i, device)
        calls = [batch_calls[i] for batch_calls in captured.calls] if captured is not None else []
        layer_step = LayerStep(index=i, name=f"{layer_prefix}.{i}", layer=layer,
                               hidden=captured.hidden if captured is not None else [], calls=calls, device=device,
                               offload=offload, batch_ids=captured.batch_ids if captured is not None else [])
        step(layer_step)
        if captured is None:
            pass
        elif layer_step.outputs is not None:
            captured.hidden[:] = layer_step.outputs
        else:
            for b, hidden_states in enumerate(captured.hidden):
                captured.hidden[b] = run_layer(layer, hidden_states, calls[b], device).to(offload)
        store.close(i, layer, done=final, hidden=captured.hidden if captured is not None else None)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        seconds.append(time.perf_counter() - t0)
        if progress is not None:
            progress.update(1)
    return seconds


def default_true_sequential(model: nn.Module, method_default: bool, calib_ids: torch.Tensor | None,
                            device: str) -> tuple[bool, str | None]:
    """The method's default schedule, unless true-sequential would not fit: it keeps every calibration
    batch's activations of one layer alive at once, so fall back to two passes if that estimate
    exceeds half of the free memory of the compute device. Returns (true_sequential, note)."""
    if not method_default or calib_ids is None:
        return False, None
    layer = decoder_layers(model)[0]
    hidden = model.get_input_embeddings().weight.shape[1]
    per_token = 2 * hidden + sum(weight_2d(m).shape[0] for m in layer_linears(layer, "").values())
    itemsize = next(layer.parameters()).element_size()
    need = calib_ids.numel() * per_token * itemsize
    free = free_memory_bytes(device)
    budget = layer_store(model).activation_budget() if not device.startswith("cuda") else None
    if budget is not None:
        free = budget if free is None else min(free, budget)
    if free is None or need <= free / 2:
        return True, None
    return False, (f"two-pass calibration: true-sequential would hold ~{need / 2**30:.1f} GiB of activations per "
                   f"layer and {device} has {free / 2**30:.1f} GiB free (force it with true_sequential: true / "
                   f"--true-sequential, or use fewer calibration tokens)")


def free_memory_bytes(device: str) -> int | None:
    """Free memory of the compute device: CUDA free memory, or the host's MemAvailable."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
